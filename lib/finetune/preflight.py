"""Pre-flight of finetune.py: the finetune section's values and combinations, then the checks that
train.py runs too (lib/checks.py), before any data is read or file written.
"""
from lib import checks
from lib.config import where
from lib.errors import UserError, did_you_mean


def preflight(cfg) -> tuple:
    """Check the finetune section (normalising a single freeze pattern to a list), then the whole
    config; returns what checks.preflight returns: (task, input kind)."""
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
