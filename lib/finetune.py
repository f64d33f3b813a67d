"""Transfer learning for finetune.py: weights from torchvision, a file or a checkpoint; a new (or kept,
or MLP) head; the first convolution adapted to the data's channels; freezing by child index or by
module-name pattern; frozen batch-norm kept in eval mode; gradual unfreezing as a new parameter group.
"""
import copy
import fnmatch
import os
import types
from pathlib import Path

import torch
from torch import nn

from lib import checks, models
from lib.config import to_dict, where
from lib.errors import UserError, choices_text, did_you_mean
from lib.optim import NORM_LAYERS


# ---------------------------------------------------------------------------------------------
# Pre-flight
# ---------------------------------------------------------------------------------------------

def preflight(cfg):
    f = cfg.finetune
    if not f.weights:
        raise UserError("finetune.weights is not set; give a torchvision weights name (IMAGENET1K_V1, DEFAULT), "
                        "a .pth state dict, or a checkpoint / model.pt written by train.py or finetune.py.")
    if isinstance(f.head, str) and f.head not in ("replace", "keep"):
        raise UserError(f"{where(cfg, 'finetune.head')} = {f.head} must be replace, keep, or a list of hidden "
                        f"widths such as [400, 300]{did_you_mean(f.head, ['replace', 'keep'])}.")
    if isinstance(f.head, list):
        if not f.head or min(f.head) < 1:
            raise UserError(f"{where(cfg, 'finetune.head')} must list positive widths, e.g. [400, 300].")
        if cfg.model.head:
            raise UserError("give the MLP head once: finetune.head or model.head, not both.")
    if isinstance(f.freeze, dict):
        unknown = set(f.freeze) - {"children", "plus"}
        if unknown or not isinstance(f.freeze.get("children", 0), int) or \
                not isinstance(f.freeze.get("plus", []), list):
            raise UserError(f"{where(cfg, 'finetune.freeze')} as a mapping takes children: <int> and plus: "
                            f"[module names], e.g. {{children: 6, plus: ['layer3.0']}}.")
    elif isinstance(f.freeze, str) and f.freeze != "backbone":
        f.freeze = [f.freeze]
    if f.in_channels is not None and f.in_channels < 1:
        raise UserError(f"{where(cfg, 'finetune.in_channels')} must be at least 1.")
    if f.unfreeze_at_epoch is not None:
        if not f.freeze:
            raise UserError("finetune.unfreeze_at_epoch needs finetune.freeze (there is nothing to unfreeze).")
        if not 2 <= f.unfreeze_at_epoch <= max(2, cfg.train.epochs):
            raise UserError(f"{where(cfg, 'finetune.unfreeze_at_epoch')} must be between 2 and train.epochs "
                            f"({cfg.train.epochs}).")
    if f.backbone_lr_mult <= 0:
        raise UserError(f"{where(cfg, 'finetune.backbone_lr_mult')} must be positive.")
    from lib.runtime import deepspeed_requested
    if f.unfreeze_at_epoch and deepspeed_requested(cfg):
        raise UserError("finetune.unfreeze_at_epoch does not combine with DeepSpeed (the engine's parameter "
                        "groups are fixed at start); unfreeze from the start or drop DeepSpeed.")
    return checks.preflight(cfg)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

def load_source(cfg):
    """(state_dict, description) of finetune.weights: a file, or a torchvision weights name."""
    w = cfg.finetune.weights
    if os.path.isfile(w):
        from lib import checkpoint
        ckpt = checkpoint.load_user_file(w, "finetune.weights")
        state = models.state_dict_of(ckpt)
        if not state:
            raise UserError(f"finetune.weights={w} holds no tensors; give a state dict or a checkpoint.")
        kind = "checkpoint" if "model" in ckpt and "config" in ckpt else "state dict"
        return state, f"{kind} {w}"
    if os.sep in w or w.endswith((".pt", ".pth", ".bin", ".ckpt")):
        raise UserError(f"finetune.weights={w}: no such file; give an existing .pt/.pth file or a torchvision "
                        f"weights name such as IMAGENET1K_V1.")
    name = cfg.model.name
    if not name.startswith("torchvision:"):
        raise UserError(f"finetune.weights={w} is not a file, and a weights name (like IMAGENET1K_V1) only applies "
                        f"to model.name=torchvision:<name>; give a file for model.name={name}.")
    return torchvision_weights(name.split(":", 1)[1], w)


def torchvision_weights(arch, tag):
    """A torchvision weights enum's state dict, from the torch cache or downloaded into it."""
    import torchvision.models as tvm
    from torch.hub import get_dir
    try:
        enum = tvm.get_model_weights(arch)
    except (ValueError, KeyError):
        raise UserError(f"torchvision has no pretrained weights for {arch}.") from None
    tag = tag.split(".")[-1]
    options = [e.name for e in enum] + ["DEFAULT"]
    if tag not in options:
        raise UserError(f"finetune.weights={tag} is not a weights name of {arch}{did_you_mean(tag, options)}; "
                        f"choose one of: {', '.join(options)}.")
    weights = enum[tag] if tag != "DEFAULT" else enum.DEFAULT
    cache = Path(get_dir()) / "checkpoints"
    filename = weights.url.rsplit("/", 1)[-1]
    where_ = "the torch cache" if (cache / filename).exists() else "a download"
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # offline, proxy, corrupt download
        raise UserError(
            f"finetune.weights={tag} needs {filename}, which is not in {cache} and could not be downloaded "
            f"({type(e).__name__}); on a machine with internet run python -c \"import torchvision; "
            f"torchvision.models.get_model('{arch}', weights='{weights.name}')\" and copy {filename} into {cache} "
            f"(or set TORCH_HOME), or pass finetune.weights=/path/to/{filename}.") from None
    return state, f"torchvision {arch} {weights.name} (from {where_})"


def _source_head(state):
    """Prefix of the source's classifier: the module of its last 2-D weight ('fc', 'classifier.6')."""
    keys = [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]
    return keys[-1].rsplit(".", 1)[0] if keys else None


def _under(key, prefix):
    return prefix is not None and (key == prefix or key.startswith(prefix + "."))


def match_weights(model, state, head, first_conv, keep_head):
    """Load `state` into `model`: same-shape keys load; the source's head is dropped unless keep_head
    (ours is new); the first conv is adapted to our input channels; anything else that differs is an
    error naming the keys."""
    own = model.state_dict()
    src_head = _source_head(state)
    loaded, dropped, adapted, problems, untracked = {}, [], None, [], 0
    for key, target in own.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                untracked += 1                      # older torchvision files lack these counters
            elif keep_head and _under(key, head):
                problems.append(f"the kept head's {key} is not in the weights")
            elif not _under(key, head):
                problems.append(f"missing {key}")
            continue
        source = state[key]
        in_head = _under(key, head) or _under(key, src_head)
        if in_head and not keep_head:
            dropped.append(key)
        elif source.shape == target.shape:
            loaded[key] = source
        elif in_head:
            problems.append(f"the kept head {key} has shape {tuple(source.shape)} there but {tuple(target.shape)} here")
        elif key == first_conv and source.dim() == 4 and source.shape[0] == target.shape[0] \
                and source.shape[2:] == target.shape[2:]:
            loaded[key] = adapt_channels(source, target.shape[1])
            adapted = (source.shape[1], target.shape[1])
        else:
            problems.append(f"{key} has shape {tuple(source.shape)} there but {tuple(target.shape)} here")
    for key in state:
        if key not in own:
            if not keep_head and (_under(key, src_head) or _under(key, head)):
                dropped.append(key)
            else:
                problems.append(f"unexpected {key}")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"finetune.weights do not fit model {type(model).__name__}: {'; '.join(problems[:3])}{more}; "
                        f"check model.name and its options (depths, widths, head) against the weights"
                        + (", or use finetune.head=replace." if keep_head else "."))
    model.load_state_dict(loaded, strict=False)
    return len(loaded), sorted(set(dropped)), adapted, untracked


def adapt_channels(weight, channels):
    """RGB filters for `channels` inputs: summed for 1 (a gray image repeated 3 times gives the same
    response), mean-tiled otherwise (Keras/timm convention)."""
    if channels == 1:
        return weight.sum(1, keepdim=True)
    mean = weight.mean(1, keepdim=True)
    return mean.repeat(1, channels, 1, 1) * (weight.shape[1] / channels)


def build_model(cfg, data):
    """The model with pretrained weights, its head for the data and its first conv for the channels.
    Returns (model, head module name, a report for the log)."""
    state, described = load_source(cfg)
    f = cfg.finetune
    inputs = data.model_inputs(cfg.model)
    if f.in_channels is not None:
        inputs["in_channels"] = f.in_channels
        if data.transform.dst_channels != f.in_channels:
            raise UserError(f"finetune.in_channels={f.in_channels} but the data has {data.transform.dst_channels} "
                            f"channel(s); set data.channels={f.in_channels} too.")
    if f.head == "keep":
        if _source_head(state) is None:
            raise UserError(f"finetune.head=keep, but {described} has no linear classifier to keep; use "
                            f"finetune.head=replace.")
        rows = state[_source_head(state) + ".weight"].shape[0]
        if inputs["num_classes"] > rows:
            raise UserError(f"finetune.head=keep keeps a head of {rows} classes but the data has "
                            f"{inputs['num_classes']}; use finetune.head=replace.")
        inputs["num_classes"] = rows
    base = copy.deepcopy(cfg.model)
    base.head = None
    model = models.build_model(base, **inputs, seed=cfg.seed)
    head = models.head_name(model)
    first_conv = next((n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    hidden = f.head if isinstance(f.head, list) else cfg.model.head
    if hidden:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            models.replace_head(model, inputs["num_classes"], hidden)
    count, dropped, adapted, untracked = match_weights(model, state, head, first_conv, keep_head=f.head == "keep")
    report = [f"weights: {described}: loaded {count} of {len(model.state_dict())} tensors; missing: "
              + (f"{untracked} batch-norm counters (num_batches_tracked, reset to 0)" if untracked else "none")
              + "; unexpected: none (besides the head)"]
    if f.head == "keep":
        report.append(f"head {head} kept ({inputs['num_classes']} classes)")
    else:
        report.append(f"head {head} rebuilt for {inputs['num_classes']} classes (dropped {', '.join(dropped) or 'nothing'})")
    if hidden:
        report.append(f"MLP head {head}: {' -> '.join(map(str, hidden))} -> {inputs['num_classes']}")
    if adapted:
        report.append(f"first conv {first_conv} adapted from {adapted[0]} to {adapted[1]} input channel(s)")
    models.probe(model, inputs["input_shape"], f"model.name={cfg.model.name}")
    return model, head, inputs, "\n  ".join(report)


# ---------------------------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------------------------

def frozen_modules(model, spec, head):
    """Module names the freeze spec selects; an unmatched pattern is an error naming it."""
    names = [n for n, _ in model.named_modules() if n]
    if spec == "backbone":
        return [n for n, _ in model.named_children() if not _under(head, n)]
    if isinstance(spec, dict):
        children = [n for n, _ in model.named_children()]
        k = spec.get("children", 0)
        if not 0 <= k <= len(children):
            raise UserError(f"finetune.freeze.children={k} but the model has {len(children)} children "
                            f"({choices_text(children)}).")
        plus = spec.get("plus", [])
        for p in plus:
            if p not in names:
                raise UserError(f"finetune.freeze.plus names '{p}', which is not a module{did_you_mean(p, names)}; "
                                f"module names look like {choices_text(names[:8], limit=8)}.")
        return children[:k] + list(plus)
    selected = []
    for pattern in spec:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            top = [n for n in names if "." not in n]
            raise UserError(f"finetune.freeze pattern '{pattern}' matches no module{did_you_mean(pattern, names)}; "
                            f"top-level modules are: {choices_text(top)}.")
        selected += hits
    return selected


def freeze(model, f, head):
    """Freeze the selected modules; returns the names of the parameters frozen."""
    if not f.freeze:
        return []
    modules = frozen_modules(model, f.freeze, head)
    frozen = []
    for name in modules:
        module = model.get_submodule(name)
        for pn, p in module.named_parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(f"{name}.{pn}")
        if f.freeze_bn:
            for m in module.modules():
                if isinstance(m, NORM_LAYERS):
                    keep_in_eval(m)
    if any(_under(n, head) for n in frozen):
        raise UserError(f"finetune.freeze also freezes the head ({head}); leave the head trainable.")
    return frozen


def _always_eval(self, mode=True):
    return nn.Module.train(self, False)


def keep_in_eval(module):
    """model.train() will leave this (frozen) batch-norm in eval mode: its statistics stay put."""
    module.train = types.MethodType(_always_eval, module)
    module.eval()


def release(module):
    if "train" in module.__dict__:
        del module.train


def parameter_table(model):
    lines = [f"{'parameter':50s} {'shape':>20s}  trainable"]
    for n, p in model.named_parameters():
        lines.append(f"{n:50s} {str(tuple(p.shape)):>20s}  {'yes' if p.requires_grad else 'no'}")
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines.append(f"trainable {train:,} of {total:,} parameters ({100 * train / max(total, 1):.2f}%)")
    return "\n".join(lines)


class Unfreezer:
    """At finetune.unfreeze_at_epoch the frozen parameters join training as one new optimizer group
    with lr = optim.lr x finetune.backbone_lr_mult (Lightning's BackboneFinetuning, in one method)."""

    def __init__(self, cfg, model, frozen, optimizer, scheduler):
        self.epoch = cfg.finetune.unfreeze_at_epoch     # 1-based
        self.lr = cfg.optim.lr * cfg.finetune.backbone_lr_mult
        self.wd = cfg.optim.weight_decay
        self.model, self.frozen, self.optimizer, self.scheduler = model, frozen, optimizer, scheduler
        self.done = not self.epoch

    def due(self, epoch0):
        """True once epoch (0-based) has reached the unfreeze epoch and it has not happened yet."""
        return not self.done and epoch0 + 1 >= self.epoch

    def apply(self):
        from lib.optim import add_param_group
        params = dict(self.model.named_parameters())
        group = [params[n] for n in self.frozen]
        for p in group:
            p.requires_grad_(True)
        for m in self.model.modules():
            release(m)
        self.model.train()
        add_param_group(self.optimizer, self.scheduler, group, self.lr, self.wd)
        self.done = True
        return len(group)


def export(run_dir, cfg, state, inputs):
    """model.pt (the unwrapped state dict `state`) and model.yaml, a train.py config that evaluates it:
    python train.py --config <run>/model.yaml"""
    import yaml
    from lib.checkpoint import atomic_save, atomic_write_text
    path = Path(run_dir) / "model.pt"
    atomic_save(state, path)
    d = to_dict(cfg)
    m = d["model"]
    m.update(num_classes=inputs["num_classes"], in_channels=inputs["in_channels"], weights=str(path.resolve()))
    if isinstance(cfg.finetune.head, list):
        m["head"] = cfg.finetune.head
    spec = {"name": f"{cfg.name}-eval", "output_dir": cfg.output_dir, "seed": cfg.seed, "data": d["data"],
            "model": m, "loss": d["loss"], "train": {"eval_only": True}, "checkpoint": {"resume": "never"}}
    atomic_write_text(Path(run_dir) / "model.yaml",
                      "# A train.py config that evaluates this fine-tuned model:\n"
                      f"#   python train.py --config {Path(run_dir) / 'model.yaml'}\n" + yaml.safe_dump(spec, sort_keys=False))
    return path
