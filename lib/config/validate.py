"""Value checks that need no registry: ranges and combinations of config values (batch sizes at
least 1, fractions between 0 and 1, a plain run name, GPU lists), each failure naming the key and where
it was set. Names that must exist in a registry (a model, a loss, ...) are checked by lib/checks.py.
"""
import re

from lib.config.coerce import show
from lib.errors import UserError


def where(cfg, key):
    """'optim.lr (set in configs/x.yaml)' for messages; defaults say so too."""
    return f"{key} (set in {cfg._origins.get(key, 'the defaults')})"


def check_values(cfg):
    """Raise UserError for the first out-of-range value or bad combination (the whole config: the checks
    span sections); also normalizes dist.gpus to '2,3' form."""
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
    if d.train_crop is not None:
        need(d.train_crop >= 4, "data.train_crop", "must be at least 4 (or null)")
        need(d.augment == "none", "data.augment", "must be none with data.train_crop (RandomResizedCrop and "
             "data.hflip replace the padded crop)")
    need(d.decode_on != "device" or d.train_crop is not None, "data.decode_on",
         "is device, which needs data.train_crop (the crops are made where the images are decoded); "
         "set data.train_crop, or data.decode_on=workers")
    need(d.decode_on != "device" or d.decoder != "pil", "data.decode_on",
         "is device, which decodes with TorchCodec; set data.decoder=torchcodec (or auto), or "
         "data.decode_on=workers")
    need(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale",
         "must be [min, max] with 0 < min <= max <= 1")
    need(len(d.crop_ratio) == 2 and 0 < d.crop_ratio[0] <= d.crop_ratio[1], "data.crop_ratio",
         "must be [min, max] with 0 < min <= max")
    need(d.eval_resize >= 4, "data.eval_resize", "must be at least 4")
    need(d.eval_crop is None or 4 <= d.eval_crop <= d.eval_resize, "data.eval_crop",
         "must be between 4 and data.eval_resize (or null)")
    for key in ("hflip", "random_erasing", "mix_switch_prob"):
        need(0.0 <= getattr(d, key) <= 1.0, f"data.{key}", f"must be between 0 and 1, not {getattr(d, key)}")
    for key in ("mixup_alpha", "cutmix_alpha"):
        need(getattr(d, key) >= 0.0, f"data.{key}", "must be 0 (off) or more")
    need(0 <= d.ra_magnitude <= 30, "data.ra_magnitude", "must be between 0 and 30")
    need(d.ra_num_ops >= 1, "data.ra_num_ops", "must be at least 1")
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
    need(t.ema is None or 0.0 < t.ema < 1.0, "train.ema", f"must be between 0 and 1 (e.g. 0.9998) or null, not {t.ema}")
    need(t.ema_every >= 1, "train.ema_every", "must be at least 1")
    need(t.ema_warmup_epochs >= 0, "train.ema_warmup_epochs", "must be 0 or more")
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
            raise UserError(f"{key} must list GPU indices like '0,1' or [0, 1], not {show(value)}.")
        out.append(str(int(item)))
    if len(set(out)) != len(out):
        raise UserError(f"{key} lists a GPU twice: {show(value)}.")
    return ",".join(out)
