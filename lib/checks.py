"""Pre-flight: check a whole config against every registry before any data or file is touched, so
a typo fails in a second with one sentence instead of after a download or an hour of training.
"""
from lib import data, init, losses, models, optim, tensorboard
from lib.config import where
from lib.errors import UserError

MONITORS = {"classification": ("val/acc", "val/loss", "val/top5", "train/loss", "train/acc"),
            "regression": ("val/loss", "val/mse", "train/loss", "train/mse")}


def preflight(cfg) -> tuple[str, str]:
    """Returns (task, kind) of the run: ('classification' | 'regression', 'image' | 'sequence')."""
    meta = data.check(cfg.data)
    task, kind = meta["task"], meta["kind"]
    models.check(cfg, task, kind)
    init.check(cfg.model.init, origins=cfg._origins)
    losses.check(cfg, task)
    optim.check(cfg)
    tensorboard.check(cfg.log)
    d, t = cfg.data, cfg.train
    if kind == "sequence":
        for key, bad in (("data.augment", d.augment != "none"), ("train.channels_last", t.channels_last),
                         ("data.channels", d.channels is not None)):
            if bad:
                raise UserError(f"{where(cfg, key)} applies to images, but data.name={d.name} gives sequences; "
                                f"remove it.")
    if task != "classification" and d.classes is not None:
        raise UserError(f"{where(cfg, 'data.classes')} selects classes, but data.name={d.name} is a "
                        f"{task} dataset; remove it.")
    if t.ema is not None:
        from lib.runtime import deepspeed_requested
        if deepspeed_requested(cfg):
            raise UserError(f"{where(cfg, 'train.ema')}: a weight EMA needs the whole model on every rank, and "
                            f"DeepSpeed ZeRO shards it; remove train.ema or train without DeepSpeed.")
    c = cfg.checkpoint
    monitors = MONITORS[task] + (tuple(k.replace("val/", "val_ema/") for k in MONITORS[task] if k.startswith("val/"))
                                 if t.ema is not None else ())
    if c.monitor != "none" and c.monitor not in monitors:
        if "checkpoint.monitor" not in cfg._origins and task == "regression":
            c.monitor = "val/loss"
        else:
            raise UserError(f"{where(cfg, 'checkpoint.monitor')} = {c.monitor} is not a metric of {task} runs"
                            f"{' with train.ema' if t.ema is not None else ''}; use one of: {', '.join(monitors)}.")
    dry_build(cfg, kind)
    return task, kind


def dry_build(cfg, kind):
    """Build the model on the meta device (no memory, no data needed) and run the optimizer checks
    that need its parameters (param-group patterns, SparseAdam, Muon), so they fail here instead of
    after the processes started and the data was read. The real sizes come from the data later;
    parameter names do not depend on them. If a guessed size does not fit the model, the check is
    left to the real build."""
    meta = optim.OPTIMIZERS.meta(cfg.optim.name)
    if not (cfg.optim.param_groups or meta["sparse"] or meta["matrices_only"]):
        return                  # nothing to check: keep --print-config fast (a meta build costs ~1 s)
    import torch
    m, d = cfg.model, cfg.data
    size = d.image_size or 32
    channels = m.in_channels or d.channels or 3
    shape = (d.seq_len, channels) if kind == "sequence" else (channels, size, size)
    try:
        with torch.device("meta"):
            model = models.build_model(m, num_classes=m.num_classes or 10, in_channels=channels,
                                       image_size=size, input_shape=shape)
    except Exception:           # a guessed size that does not fit: the real build decides
        return
    optim.groups_for(cfg.optim, model, cfg._origins)
