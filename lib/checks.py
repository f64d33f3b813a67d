"""Pre-flight: check a whole config against every registry before any data or file is touched, so
a typo fails in a second with one sentence instead of after a download or an hour of training.
"""
from lib import datasets, init, losses, models, optim
from lib.config import where
from lib.errors import UserError

MONITORS = {"classification": ("val/acc", "val/loss", "val/top5", "train/loss", "train/acc"),
            "regression": ("val/loss", "val/mse", "train/loss", "train/mse")}


def preflight(cfg):
    """Returns (task, kind) of the run: ('classification' | 'regression', 'image' | 'sequence')."""
    meta = datasets.check(cfg)
    task, kind = meta["task"], meta["kind"]
    models.check(cfg, task, kind)
    init.check(cfg.model.init)
    losses.check(cfg, task)
    optim.check(cfg)
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
    c = cfg.checkpoint
    if c.monitor != "none" and c.monitor not in MONITORS[task]:
        if "checkpoint.monitor" not in cfg._origins and task == "regression":
            c.monitor = "val/loss"
        else:
            raise UserError(f"{where(cfg, 'checkpoint.monitor')} = {c.monitor} is not a metric of {task} runs; "
                            f"use one of: {', '.join(MONITORS[task])}.")
    if cfg.dist.deepspeed and t.precision == "fp16" and "train.precision" in cfg._origins:
        pass  # DeepSpeed's own fp16 section decides; checked when the engine starts
    return task, kind
