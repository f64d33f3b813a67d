"""DeepSpeed through Accelerate: whether it was asked for, the plugin for dist.deepspeed, the checks
before it starts, and its JSON's batch and clipping settings made to agree with this run's.

    deepspeed_requested(cfg)                  dist.deepspeed (torchrun) or an accelerate launch config
    resolve_accelerate_deepspeed_file()       a relative deepspeed_config_file from any directory
    plugin = deepspeed_plugin(cfg.dist)       a DeepSpeedPlugin, or None
    check_can_start(cfg.train, distributed, cuda, backend)
    zero_stage = configure(plugin.deepspeed_config, cfg.train, cfg.data, world_size)

The deepspeed package itself is imported only on this path (it is optional).
"""
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


def check_can_start(train_cfg, distributed, cuda, backend) -> None:
    """DeepSpeed's requirements on this run, before anything starts: installed, a launcher, and a
    backend the machine has."""
    require_deepspeed()
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
    zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0) or 0)
    if zero_stage == 3:
        ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    return zero_stage
