"""DeepSpeed through Accelerate: whether it was asked for, the plugin for dist.deepspeed, the checks
before it starts, and its JSON's batch and clipping settings made to agree with this run's. Its
precision blocks ("bf16"/"fp16": {"enabled": "auto"}) follow train.precision; an explicit contradiction is
refused (check_precision), and so is fp16 on CPU, which DeepSpeed's CPU accelerator cannot run.

    deepspeed_requested(cfg)                  dist.deepspeed (torchrun) or an accelerate launch config
    resolve_accelerate_deepspeed_file()       a relative deepspeed_config_file from any directory
    plugin = deepspeed_plugin(cfg.dist)       a DeepSpeedPlugin, or None
    check_can_start(cfg.train, distributed, cuda, backend, precision, cfg.dist)
    zero_stage = configure(plugin.deepspeed_config, cfg.train, cfg.data, world_size)

The deepspeed package itself is imported only on this path (it is optional).
"""
import json
import os

from lib.errors import UserError
from lib.runtime.launch import REPO


def deepspeed_requested(cfg) -> bool:
    """DeepSpeed asked for by dist.deepspeed (torchrun) or by an accelerate launch DeepSpeed config."""
    return bool(cfg.dist.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def from_repo(path):
    """A relative path that is not there from the current directory but is in this repository
    (configs/deepspeed/zero2.json, as our accelerate configs name it) means the repository's file."""
    if os.path.isabs(path) or os.path.exists(path) or not os.path.exists(os.path.join(REPO, path)):
        return path
    return os.path.join(REPO, path)


def resolve_accelerate_deepspeed_file() -> None:
    """`accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml` from any directory."""
    key = "ACCELERATE_DEEPSPEED_CONFIG_FILE"
    path = os.environ.get(key)
    if not path or path == "none":
        return
    os.environ[key] = from_repo(path)
    if not os.path.exists(os.environ[key]):
        raise UserError(f"the accelerate config names the DeepSpeed file {path}, which does not exist (relative "
                        f"paths count from the current directory); give an absolute deepspeed_config_file.")


def require_deepspeed() -> None:
    try:
        import deepspeed  # noqa: F401
        import transformers  # noqa: F401  (Accelerate's DeepSpeed path compares its version)
    except ImportError as e:
        raise UserError(f"DeepSpeed was asked for but {e.name} is not installed; pip install -r "
                        f"requirements-dev.txt (it has deepspeed and transformers).") from None


def deepspeed_plugin(dist_cfg):
    """dist.deepspeed (torchrun launches) -> a DeepSpeedPlugin; accelerate launch configs set it by env."""
    path = dist_cfg.deepspeed
    if not path:
        return None
    path = from_repo(path)
    if not os.path.exists(path):
        raise UserError(f"dist.deepspeed={path} does not exist; point it at a DeepSpeed JSON file "
                        f"such as configs/deepspeed/zero2.json.")
    require_deepspeed()
    from accelerate.utils import DeepSpeedPlugin
    try:
        return DeepSpeedPlugin(hf_ds_config=path)
    except (ValueError, OSError) as e:
        raise UserError(f"dist.deepspeed={path} is not a usable DeepSpeed config: {e}") from None


def check_can_start(train_cfg, distributed, cuda, backend, precision=None, dist_cfg=None) -> None:
    """DeepSpeed's requirements on this run, before anything starts: installed, a launcher, a
    backend the machine has, and a JSON whose precision blocks agree with `precision`."""
    require_deepspeed()
    if precision is not None:
        check_precision(precision, dist_cfg, cuda)
    if train_cfg.on_nonfinite == "skip":
        raise UserError("train.on_nonfinite=skip cannot work under DeepSpeed, whose engine takes the step "
                        "itself; use train.on_nonfinite=stop (DeepSpeed's fp16 loss scaler already skips "
                        "overflow steps).")
    if not distributed:
        raise UserError("DeepSpeed needs a launcher: run under torchrun (--nproc_per_node=1 is fine) or "
                        "accelerate launch with a DeepSpeed config.")
    if not cuda and backend != "gloo":
        raise UserError(f"dist.backend={backend} needs GPUs; DeepSpeed on CPU runs over gloo "
                        f"(dist.backend=auto or gloo).")


def _json_file(dist_cfg):
    """The DeepSpeed JSON this run uses: dist.deepspeed, or the accelerate config's deepspeed_config_file."""
    path = dist_cfg.deepspeed if dist_cfg is not None and dist_cfg.deepspeed else \
        os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none":
        return None, None
    path = from_repo(path)
    try:
        with open(path) as f:
            return path, json.load(f)
    except (OSError, ValueError):
        return path, None               # a missing or unreadable file is refused where it is loaded


def check_precision(precision, dist_cfg, cuda) -> None:
    """train.precision is the one place precision is chosen: the JSON's "bf16" / "fp16" blocks say
    "enabled": "auto" (Accelerate fills them from it, utils/dataclasses.py set_mixed_precision) or agree.
    An explicit "enabled" that disagrees is refused here: Accelerate would silently keep the JSON's
    (fill_match(..., must_match=False)), and the forward would then meet weights of another dtype."""
    if precision == "fp16" and not cuda:
        raise UserError("train.precision=fp16 under DeepSpeed needs GPUs (DeepSpeed's CPU accelerator has no "
                        "fp16: \"Type fp16 is not supported on your device\"); use train.precision=bf16.")
    path, ds = _json_file(dist_cfg)
    if not ds:
        return
    for block in ("bf16", "fp16"):
        enabled = ds.get(block, {}).get("enabled", "auto") if isinstance(ds.get(block), dict) else "auto"
        if str(enabled).lower() == "auto":
            continue
        if (str(enabled).lower() == "true") != (precision == block):
            raise UserError(f'the DeepSpeed config {path} sets "{block}": {{"enabled": {json.dumps(enabled)}}} but '
                            f'train.precision={precision}; set "enabled": "auto" there, so that train.precision '
                            f'chooses the precision.')
    if str(ds.get("torch_autocast", {}).get("enabled", False)).lower() == "true":
        raise UserError(f'the DeepSpeed config {path} enables "torch_autocast", but precision comes from '
                        f'train.precision (its "bf16" / "fp16" blocks plus our autocast); remove that block.')


def configure(ds, train_cfg, data_cfg, world_size) -> int:
    """Make DeepSpeed's config dict `ds` agree with ours and the world size (its "auto" values are
    filled here; explicit values that disagree are a clear error instead of a wrong job). Returns
    the ZeRO stage."""
    if train_cfg.grad_accum != 1:
        raise UserError("train.grad_accum > 1 is not supported under DeepSpeed here (its engine counts "
                        "micro-steps across epochs); use a larger data.batch_size or more processes.")
    want = {"train_micro_batch_size_per_gpu": data_cfg.batch_size, "gradient_accumulation_steps": 1,
            "train_batch_size": data_cfg.batch_size * world_size}
    for key, value in want.items():
        have = ds.get(key, "auto")
        if have not in ("auto", value):
            raise UserError(f"the DeepSpeed config sets {key}={have} but this run needs {value} (data.batch_size="
                            f"{data_cfg.batch_size}, {world_size} processes, grad_accum 1); set it to "
                            f'"auto" in the JSON.')
        ds[key] = value
    clip = train_cfg.clip_grad_norm or 0.0
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = clip
    elif train_cfg.clip_grad_norm and ds["gradient_clipping"] != clip:
        raise UserError(f"the DeepSpeed config clips at {ds['gradient_clipping']} but train.clip_grad_norm="
                        f"{clip}; set gradient_clipping to \"auto\" in the JSON.")
    low = [b for b in ("bf16", "fp16") if str(ds.get(b, {}).get("enabled")).lower() == "true"]
    if low:     # DeepSpeed 0.19 casts parameters only (engine.py _cast_module_mixed_precision), so batch norm
        # met bf16 weights beside fp32 running stats ("expected scalar type BFloat16 but found Float");
        # buffers follow the weights, as DeepSpeed's blanket module.bfloat16() did before 0.19.
        ds.setdefault("data_types", {}).setdefault("buffer_dtype", low[0])
    zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0) or 0)
    if zero_stage == 3:
        ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    return zero_stage
