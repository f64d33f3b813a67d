"""TensorBoard beside wandb (log.tensorboard.enabled): the same scalars as metrics.jsonl (every log
step) and metrics.csv (every epoch), the confusion matrix and GAN sample grids as images, and the
run's hyperparameters with its final metrics. Rank 0 writes <run>/tensorboard/; many clusters block
outbound traffic, and TensorBoard is what their users open. `torch.utils.tensorboard` needs the
optional `tensorboard` package: pre-flight names it when missing (check()).
"""
from lib.errors import UserError


def check(log_cfg) -> None:
    """Pre-flight: log.tensorboard.enabled needs the tensorboard package."""
    if not log_cfg.tensorboard.enabled:
        return
    import importlib.util
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError("log.tensorboard.enabled=true needs the tensorboard package: pip install tensorboard "
                        "(or set log.tensorboard.enabled=false).")


class TensorBoard:
    """A SummaryWriter on <run_dir>/tensorboard; any failure after it opened is a warning, never a stop."""

    def __init__(self, run_dir, purge_step=None):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: a resumed run drops what the first one logged after its checkpoint (no doubled curves)
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)

    def scalars(self, values: dict, step: int):
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                self.writer.add_scalar(k, v, step)

    def image(self, tag, chw, step: int):
        """A (C, H, W) float image in [0, 1]."""
        self.writer.add_image(tag, chw.clamp(0, 1), step)

    def confusion(self, matrix, step: int):
        """The validation confusion matrix as an image: rows true, columns predicted, row-normalised."""
        m = matrix.double()
        rates = (m / m.sum(1, keepdim=True).clamp_min(1)).float()
        self.image("val/confusion", rates[None], step)

    def hparams(self, config: dict, metrics: dict):
        flat = {}

        def walk(d, prefix=""):
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                elif isinstance(v, (int, float, str, bool)):
                    flat[prefix + k] = v
                elif v is not None:
                    flat[prefix + k] = str(v)
        walk(config)
        final = {f"hparam/{k}": v for k, v in metrics.items()
                 if isinstance(v, (int, float)) and "/" in k and not isinstance(v, bool)}
        self.writer.add_hparams(flat, final, run_name="hparams")

    def close(self):
        self.writer.close()
