"""The config: a typed schema with defaults, YAML files, `dotted.key=value` overrides, validation.

Precedence is schema defaults < the script's own defaults < YAML file < command line. Every error a
user can make here raises UserError naming the key, where it was set and the nearest valid key.
This module imports only the standard library and PyYAML, so `--help` and `--print-config` are fast.

Open sections (model, loss, optim, sched, model.init) also take the keyword arguments of the thing
they name (`optim: {name: sgd, momentum: 0.9}`); those land in the section's `extra` dict and are
checked against the builder's signature by lib/checks.py.
"""
import copy
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import yaml

from lib.errors import UserError, did_you_mean


def F(default, help_text):
    """A schema field: its default and one line of help (shown by `--help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


def S(cls, help_text):
    """A nested section."""
    return field(default_factory=cls, metadata={"help": help_text})


# ---------------------------------------------------------------------------------------------
# The schema. Keep every knob here, with its default; YAML files and the command line only override.
# ---------------------------------------------------------------------------------------------

@dataclass
class DataCfg:
    name: str = F("digits", "dataset: digits, fashion_mnist, mnist, cifar10, csv, image_csv, image_folder, synthetic, sine")
    root: str = F("data", "where datasets live (and are downloaded to)")
    download: bool = F(True, "download torchvision datasets when missing (needs a network)")
    image_size: Optional[int] = F(28, "side of the square images the model sees; null = the dataset's own")
    channels: Optional[int] = F(None, "1 or 3 converts images (grayscale <-> RGB); null = the dataset's own")
    batch_size: int = F(256, "per-process batch size; the global batch is batch_size x processes x grad_accum")
    eval_batch_size: Optional[int] = F(None, "per-process evaluation batch; null = 2 x batch_size")
    num_workers: int = F(2, "DataLoader worker processes (DataLoader path only)")
    loader: Literal["auto", "memory", "dataloader"] = F(
        "auto", "memory: decode once and keep a uint8 tensor on the device; auto picks it when it fits memory_limit_gb")
    memory_limit_gb: float = F(4.0, "largest decoded dataset the memory loader takes under loader=auto")
    cache: bool = F(True, "cache decoded datasets on disk next to the data (refreshed when the source changes)")
    shuffle: bool = F(True, "shuffle training data each epoch (order = f(seed, epoch))")
    augment: Literal["none", "crop", "crop_flip"] = F(
        "none", "training augmentation, per batch on the device: random crop with padding, and horizontal flip")
    normalize: Literal["dataset", "imagenet", "symmetric", "none"] = F(
        "dataset", "per-channel statistics: dataset, imagenet, symmetric ([0,1] -> [-1,1], for tanh GANs), none")
    val_fraction: float = F(0.2, "held-out fraction for datasets without an official validation split")
    classes: Optional[list[int]] = F(None, "keep only these classes, relabelled 0..K-1 (e.g. [5, 6, 7, 8, 9])")
    csv: Optional[str] = F(None, "csv: pixel CSV (label, pixel1..pixelN); image_csv: labels CSV")
    val_csv: Optional[str] = F(None, "csv: validation pixel CSV; null = split off val_fraction")
    images: Optional[str] = F(None, "image_csv: directory of the image files")
    split_list: Optional[str] = F(None, "image_csv: text file listing the training images; null = all rows")
    val_list: Optional[str] = F(None, "image_csv: text file listing validation images; null = rows not in split_list")
    image_col: str = F("Image_index", "image_csv: column holding the file name")
    label_col: str = F("label", "image_csv: column holding the label (integer or class name)")
    num_samples: Optional[int] = F(None, "synthetic / sine: number of training samples (null = 10000 / 4000)")
    seq_len: int = F(32, "sine: input sequence length")
    on_bad_sample: Literal["error", "skip"] = F("error", "an unreadable image stops the run (error) or is skipped and counted")


@dataclass
class ModelCfg:
    name: str = F("fashion_cnn", "mlp, lenet, alexnet, fashion_cnn, convnet, lstm, resnet, or torchvision:<name>")
    num_classes: Optional[int] = F(None, "outputs; null = from the data")
    in_channels: Optional[int] = F(None, "input channels; null = from the data")
    init: dict = F({"name": "default"}, "weight init: {name, bias, conv: {...}, linear: {...}, norm: {...}, <scheme args>}")
    weights: Optional[str] = F(None, "start from these weights: a state_dict .pt/.pth or a checkpoint of this package")
    head: Optional[list[int]] = F(None, "hidden widths of an MLP head replacing the last linear layer, e.g. [400, 300]")
    extra: dict = F({}, "")
    OPEN = True


@dataclass
class LossCfg:
    name: str = F("cross_entropy", "any torch.nn loss by snake_case name (cross_entropy, mse, ...) or our own")
    extra: dict = F({}, "")
    OPEN = True


@dataclass
class OptimCfg:
    name: str = F("adam", "any torch.optim optimizer by lower-case name (sgd, adam, adamw, lbfgs, ...)")
    lr: float = F(1.0e-3, "base learning rate")
    weight_decay: float = F(0.0, "weight decay of the default parameter group")
    param_groups: list[dict] = F([], "[{params: 'fc.*', lr: 1e-2, weight_decay: 0}, ...]; first match wins")
    no_decay_norm_bias: bool = F(False, "no weight decay on biases and normalization-layer parameters")
    extra: dict = F({}, "")
    OPEN = True


@dataclass
class SchedCfg:
    name: str = F("none", "none, step, multistep, exponential, cosine, linear, onecycle")
    warmup_epochs: float = F(0.0, "linear warmup length in epochs (fractions allowed)")
    warmup_start: float = F(0.0, "lr multiplier at the start of warmup")
    extra: dict = F({}, "")
    OPEN = True


@dataclass
class TrainCfg:
    epochs: int = F(20, "training epochs")
    max_steps: Optional[int] = F(None, "stop after this many optimizer steps (null = no limit)")
    precision: Literal["no", "fp16", "bf16"] = F("no", "mixed precision: fp16 uses a GradScaler, bf16 none")
    grad_accum: int = F(1, "micro-batches per optimizer step (no gradient sync on the others)")
    clip_grad_norm: Optional[float] = F(None, "clip the global gradient norm (on unscaled gradients)")
    channels_last: bool = F(False, "use the channels_last memory format for 4-D activations")
    compile: bool = F(False, "torch.compile the model")
    compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = F(
        None, "torch.compile mode (null = torch's default)")
    compile_backend: str = F("inductor", "torch.compile backend (inductor; eager / aot_eager to debug)")
    log_every: int = F(50, "optimizer steps between progress / metrics.jsonl updates")
    eval_every_epochs: int = F(1, "evaluate every N epochs (and always after the last)")
    on_nonfinite: Literal["stop", "skip"] = F("stop", "a NaN/inf loss stops the run (stop) or its step is skipped")
    eval_only: bool = F(False, "only evaluate the loaded weights (see checkpoint.resume / finetune.weights)")


@dataclass
class DistCfg:
    gpus: Optional[Union[str, int, list[int]]] = F(None, "GPUs to use, e.g. '2,3' (sets CUDA_VISIBLE_DEVICES); null = all visible")
    backend: Literal["auto", "nccl", "gloo"] = F("auto", "process-group backend; auto = nccl on GPU, gloo on CPU")
    deepspeed: Optional[str] = F(None, "DeepSpeed JSON config for torchrun launches (configs/deepspeed/*.json)")
    timeout_s: int = F(1800, "collective timeout in seconds (NCCL/gloo)")
    find_unused_parameters: bool = F(False, "DDP option for models with unused parameters")


@dataclass
class CheckpointCfg:
    every_epochs: int = F(1, "write a checkpoint every N epochs (0 = only at the end)")
    every_steps: Optional[int] = F(None, "also write one every N optimizer steps")
    keep_last: int = F(3, "periodic checkpoints kept besides last.pt and best.pt")
    resume: str = F("auto", "auto (continue the run in its directory), never, or a checkpoint path")
    monitor: str = F("val/acc", "metric that picks best.pt (val/acc, val/loss, val/top5, val/mse, ...; none = no best.pt)")
    mode: Literal["auto", "max", "min"] = F("auto", "whether a larger monitor value is better; auto = min for loss/mse")


@dataclass
class WandbCfg:
    enabled: bool = F(False, "log to Weights & Biases (rank 0 only)")
    project: Optional[str] = F(None, "wandb project (null = the run name)")
    entity: Optional[str] = F(None, "wandb entity (team or user)")
    mode: Literal["offline", "online", "disabled"] = F("offline", "offline runs can be synced later with `wandb sync`")
    tags: list[str] = F([], "wandb tags")


@dataclass
class LogCfg:
    wandb: WandbCfg = S(WandbCfg, "Weights & Biases")
    plots: bool = F(True, "write curves.png (and confusion.png) in the run directory")
    progress: bool = F(True, "show a progress bar on rank 0")


@dataclass
class Config:
    name: str = F("default", "run name; outputs go to <output_dir>/<name>/")
    output_dir: str = F("runs", "parent directory of run directories")
    seed: int = F(42, "seed of init, data order, augmentation and dropout")
    data: DataCfg = S(DataCfg, "data")
    model: ModelCfg = S(ModelCfg, "model")
    loss: LossCfg = S(LossCfg, "loss")
    optim: OptimCfg = S(OptimCfg, "optimizer")
    sched: SchedCfg = S(SchedCfg, "learning-rate schedule")
    train: TrainCfg = S(TrainCfg, "training loop")
    dist: DistCfg = S(DistCfg, "distributed runtime")
    checkpoint: CheckpointCfg = S(CheckpointCfg, "checkpoints")
    log: LogCfg = S(LogCfg, "logging")


@dataclass
class GanCfg:
    latent_dim: int = F(64, "size of the latent vector z (latent_dim x 1 x 1)")
    g_features: int = F(64, "generator width (channels of its last hidden layer)")
    d_features: int = F(64, "discriminator width (channels of its first layer)")
    sample_every: int = F(200, "optimizer steps between sample grids in samples/")
    grid: int = F(64, "images in each sample grid (a square number looks best)")
    ema: Optional[float] = F(None, "decay of an EMA of the generator used for the grids, e.g. 0.999; null = off")
    real_label: float = F(1.0, "target for real images in the D loss (0.9 = one-sided label smoothing)")


@dataclass
class GanConfig(Config):
    gan: GanCfg = S(GanCfg, "DCGAN")


@dataclass
class FinetuneCfg:
    weights: Optional[str] = F(None, "IMAGENET1K_V1 / DEFAULT (torchvision weights), a .pth state dict, or a "
                                     "checkpoint / model.pt of train.py or finetune.py")
    head: Union[str, list[int]] = F("replace", "replace (a new linear layer), keep, or MLP hidden widths, e.g. [400, 300]")
    freeze: Optional[Union[str, list[str], dict]] = F(
        None, "backbone, module-name patterns ['conv1', 'layer1.*'], or {children: 6, plus: ['layer3.0']}")
    freeze_bn: bool = F(True, "frozen batch-norm layers stay in eval mode (their statistics do not move)")
    in_channels: Optional[int] = F(None, "adapt the first convolution to this many input channels (1 = grayscale)")
    unfreeze_at_epoch: Optional[int] = F(None, "at this epoch (1-based) the frozen layers join training")
    backbone_lr_mult: float = F(0.1, "learning rate of the unfrozen layers = optim.lr x this")


@dataclass
class FinetuneConfig(Config):
    finetune: FinetuneCfg = S(FinetuneCfg, "transfer learning")


# ---------------------------------------------------------------------------------------------
# Loading: defaults < script defaults < YAML < overrides
# ---------------------------------------------------------------------------------------------

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def load(schema, path=None, overrides=(), script_defaults=None):
    """Build a validated config of class `schema`; `origins` maps each set key to its source."""
    cfg = schema()
    origins = {}
    if script_defaults:
        _merge(cfg, script_defaults, "", "the script defaults", origins, schema)
    if path:
        _merge(cfg, read_yaml(path), "", str(path), origins, schema)
    for item in overrides:
        key, value = parse_override(item)
        _merge(cfg, _nest(key, value), "", "the command line", origins, schema)
    cfg._origins = origins
    cfg._file = str(path) if path else None
    check_values(cfg)
    return cfg


def read_yaml(path):
    """A YAML mapping from `path` (safe_load: a config can never run code)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass an existing file to --config "
                        f"(the files in configs/ are examples).") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise UserError(f"{path} cannot be read as a YAML text file ({type(e).__name__}); pass a YAML config "
                        f"to --config.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path} is not valid YAML{where}: {problem}; fix the file "
                        f"(only plain YAML is read: no Python tags).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a YAML mapping of config sections (name:, data:, model:, ...), "
                        f"not a {type(data).__name__}.")
    return data


def parse_override(item):
    """'optim.lr=1e-3' -> ('optim.lr', 0.001); the value is parsed as YAML."""
    if "=" not in item or item.startswith("="):
        raise UserError(f"command line: '{item}' is not an override; write dotted.key=value "
                        f"(for example optim.lr=0.01), or use --config for a file.")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # an unparsable value stays a string; the type check below reports it
    return key.strip(), value


def _nest(dotted, value):
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _merge(obj, data, prefix, source, origins, root):
    """Merge the mapping `data` into the dataclass `obj`, type-checking every value."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: '{prefix.rstrip('.') or 'the config'}' must be a mapping of keys, "
                        f"not {_show(data)}.")
    fields = {f.name: f for f in dataclasses.fields(obj) if f.name != "extra"}
    for key, value in data.items():
        key = str(key)
        dotted = prefix + key
        if key in fields:
            f = fields[key]
            current = getattr(obj, key)
            if dataclasses.is_dataclass(current):
                _merge(current, value, dotted + ".", source, origins, root)
                continue
            setattr(obj, key, _coerce(value, f.type, dotted, source))
            origins[dotted] = source
        elif getattr(obj, "OPEN", False):
            if key.startswith("_"):
                raise UserError(f"{source}: '{dotted}' is not a valid option name.")
            obj.extra[key] = value
            origins[dotted] = source
        else:
            here = [prefix + k for k in fields]
            everywhere = all_keys(root) + [f.name for f in dataclasses.fields(root)]
            hint = did_you_mean(dotted, here) or did_you_mean(dotted, everywhere)
            raise UserError(f"{source}: unknown config key '{dotted}'{hint}; "
                            f"`--help` lists every key.")


def _coerce(value, tp, key, source):
    """Check `value` against the annotation `tp`; returns the (possibly converted) value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except UserError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise UserError(f"{source}: {key} must be {_type_name(tp)}, not {_show(value)}.")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off/false as False, yes/on/true as True
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((w for w in words if w in args), value)
        if value not in args:
            raise UserError(f"{source}: {key} must be one of {', '.join(map(str, args))}, "
                            f"not {_show(value)}{did_you_mean(value, args)}.")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{source}: {key} must be a list (e.g. [1, 2]), not {_show(value)}.")
        inner = args[0] if args else typing.Any
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key} must be a mapping (e.g. {{name: ...}}), not {_show(value)}.")
        return value
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: {key} must be true or false, not {_show(value)}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{source}: {key} must be an integer, not {_show(value)}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # PyYAML reads 1e-3 (no dot) as a string
        raise UserError(f"{source}: {key} must be a number, not {_show(value)}.")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{source}: {key} must be a string, not {_show(value)}.")
    raise TypeError(f"unsupported schema type {tp} for {key}")


def _type_name(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
    return " or ".join(names.get(a, "a list" if typing.get_origin(a) is list else str(a)) for a in args)


def _show(value):
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) < 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------
# Value checks that need no registry (ranges and combinations); registries are checked in checks.py
# ---------------------------------------------------------------------------------------------

def where(cfg, key):
    """'optim.lr (set in configs/x.yaml)' for messages; defaults say so too."""
    return f"{key} (set in {cfg._origins.get(key, 'the defaults')})"


def check_values(cfg):
    def need(ok, key, text):
        if not ok:
            raise UserError(f"{where(cfg, key)} {text}.")

    d, t = cfg.data, cfg.train
    need(re.fullmatch(r"[A-Za-z0-9_.+-]+", cfg.name or "") is not None, "name",
         f"must be a plain folder name (letters, digits, _ . + -), not '{cfg.name}'")
    need(d.batch_size >= 1, "data.batch_size", f"must be at least 1, not {d.batch_size}")
    need(d.eval_batch_size is None or d.eval_batch_size >= 1, "data.eval_batch_size", "must be at least 1")
    need(d.num_workers >= 0, "data.num_workers", "must be 0 or more")
    need(d.image_size is None or d.image_size >= 4, "data.image_size", "must be at least 4 (or null)")
    need(d.channels in (None, 1, 3), "data.channels", f"must be 1, 3 or null, not {d.channels}")
    need(0.0 < d.val_fraction < 1.0, "data.val_fraction", f"must be between 0 and 1, not {d.val_fraction}")
    need(d.memory_limit_gb > 0, "data.memory_limit_gb", "must be positive")
    need(d.num_samples is None or d.num_samples >= 2, "data.num_samples", "must be at least 2")
    need(d.seq_len >= 2, "data.seq_len", "must be at least 2")
    if d.classes is not None:
        need(len(d.classes) >= 2, "data.classes", "must list at least two classes")
        need(len(set(d.classes)) == len(d.classes), "data.classes", "must not repeat a class")
        need(min(d.classes) >= 0, "data.classes", "must hold class indices >= 0")
    m = cfg.model
    need(m.num_classes is None or m.num_classes >= 1, "model.num_classes", "must be at least 1")
    need(m.in_channels is None or m.in_channels >= 1, "model.in_channels", "must be at least 1")
    need(cfg.optim.lr > 0, "optim.lr", f"must be positive, not {cfg.optim.lr}")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be 0 or more")
    need(cfg.sched.warmup_epochs >= 0, "sched.warmup_epochs", "must be 0 or more")
    need(t.epochs >= 0, "train.epochs", f"must be 0 or more, not {t.epochs}")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be at least 1 (or null)")
    need(t.grad_accum >= 1, "train.grad_accum", f"must be at least 1, not {t.grad_accum}")
    need(t.clip_grad_norm is None or t.clip_grad_norm > 0, "train.clip_grad_norm", "must be positive (or null)")
    need(t.log_every >= 1, "train.log_every", "must be at least 1")
    need(t.eval_every_epochs >= 1, "train.eval_every_epochs", "must be at least 1")
    c = cfg.checkpoint
    need(c.every_epochs >= 0, "checkpoint.every_epochs", "must be 0 or more")
    need(c.every_steps is None or c.every_steps >= 1, "checkpoint.every_steps", "must be at least 1 (or null)")
    need(c.keep_last >= 1, "checkpoint.keep_last", f"must be at least 1, not {c.keep_last}")
    need(cfg.dist.timeout_s >= 1, "dist.timeout_s", "must be at least 1 second")
    if cfg.dist.gpus is not None:
        cfg.dist.gpus = normalize_gpus(cfg.dist.gpus, where(cfg, "dist.gpus"))


def normalize_gpus(value, key="dist.gpus"):
    """2 | '2,3' | [2, 3] -> '2' | '2,3'."""
    items = value if isinstance(value, list) else str(value).replace(" ", "").split(",")
    out = []
    for item in items:
        if not re.fullmatch(r"\d+", str(item)):
            raise UserError(f"{key} must list GPU indices like '0,1' or [0, 1], not {_show(value)}.")
        out.append(str(int(item)))
    if len(set(out)) != len(out):
        raise UserError(f"{key} lists a GPU twice: {_show(value)}.")
    return ",".join(out)


# ---------------------------------------------------------------------------------------------
# Output: dicts, YAML, help
# ---------------------------------------------------------------------------------------------

def to_dict(obj):
    """The config as plain nested dicts (open sections' extra keys flattened into their section)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "extra":
            out.update(copy.deepcopy(value))
        elif dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        else:
            out[f.name] = copy.deepcopy(value)
    return out


def from_dict(schema, data, source="a checkpoint"):
    """Rebuild a config from to_dict() output (e.g. the one stored in a checkpoint)."""
    cfg = schema()
    origins = {}
    _merge(cfg, data, "", source, origins, schema)
    cfg._origins, cfg._file = origins, source
    return cfg


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, short lists of scalars inline: `milestones: [30, 60]`."""


def _represent_list(dumper, data):
    flow = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def dump(cfg):
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def all_keys(schema, prefix=""):
    keys = []
    for f in dataclasses.fields(schema):
        if f.name == "extra":
            continue
        tp = f.type
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def describe(schema, prefix=""):
    """One line per key: 'optim.lr = 0.001   base learning rate' (for --help)."""
    lines = []
    inst = schema()
    for f in dataclasses.fields(schema):
        if f.name == "extra":
            continue
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(value):
            lines += describe(type(value), prefix + f.name + ".")
            continue
        shown = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
        shown = shown.removesuffix("...").strip()
        lines.append(f"  {prefix + f.name} = {shown}".ljust(44) + f"  {f.metadata.get('help', '')}")
    if getattr(schema, "OPEN", False):
        lines.append(f"  {prefix}<arg> = ...".ljust(44) + "  any keyword argument of the chosen "
                     f"{prefix.rstrip('.')}")
    return lines
