"""What a run shows and leaves behind while it trains: a progress bar, metrics.jsonl (per log step),
metrics.csv (per epoch), the plots (drawn by lib/plots.py), wandb and TensorBoard (lib/tensorboard.py),
and the summary line at the end. Rank 0 only; elsewhere every method is a no-op. wandb and
TensorBoard are imported only when enabled.
"""
import csv
import json
import math
import sys
import time
from pathlib import Path

from lib.io import atomic_file
from lib.plots import plot_confusion, plot_curves

PLOT_EVERY_S = 60.0   # redraw curves.png at most this often during training (and always at the end)
_OPEN_WANDB = []      # the wandb run still open, for close_wandb() on the error and fast-exit paths


class RunLogger:
    """The run's output on rank 0: called by lib/engine.py's loop at each epoch start, micro-batch,
    log step and epoch end, and by the script when it finishes or is stopped."""

    def __init__(self, run_dir, cfg, rt, state, lr_fn, classes=None, plot_groups=None, started=None):
        self.enabled = rt.is_main
        self.lr_fn = lr_fn
        self.classes = classes
        self.confusion = None
        self.cfg, self.rt = cfg, rt
        self.dir = Path(run_dir)
        self.rows = []
        self.bar = None
        self.plot_groups = plot_groups
        self.started = started or time.time()
        self.first_step_s = None
        self.last_plot = 0.0
        self.wandb = None
        self.tb = None
        self.tty = sys.stderr.isatty()
        self.epoch_total = 0
        if not self.enabled:
            return
        self._truncate_history(state)
        if cfg.log.wandb.enabled:
            self.wandb = _start_wandb(self.dir, cfg, rt)
        if cfg.log.tensorboard.enabled:
            from lib.tensorboard import TensorBoard
            self.tb = TensorBoard(self.dir, purge_step=state.step + 1 if state.step else None)

    # -- files -------------------------------------------------------------------------------

    def _truncate_history(self, state):
        """On resume keep only what happened up to the checkpoint (the rest is redone, not duplicated)."""
        csv_path, jsonl_path = self.dir / "metrics.csv", self.dir / "metrics.jsonl"
        if csv_path.exists():
            with open(csv_path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(float(r.get("epoch", 0))) <= state.epoch]
            self._write_csv()
        if jsonl_path.exists():
            keep = []
            with open(jsonl_path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= state.step:
                            keep.append(line)
                    except json.JSONDecodeError:
                        pass
            with open(jsonl_path, "w") as f:
                f.writelines(keep)

    def _write_csv(self):
        keys = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with atomic_file(self.dir / "metrics.csv", "w") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)

    def _jsonl(self, record):
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- progress ----------------------------------------------------------------------------

    def start_epoch(self, state, total):
        if not self.enabled:
            return
        self.epoch_total = total
        if self.cfg.log.progress and self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=state.batch, desc=f"epoch {state.epoch + 1}/{self.cfg.train.epochs}",
                            leave=False, dynamic_ncols=True, file=sys.stderr)

    def advance(self, state):
        if self.first_step_s is None and self.enabled:
            self.first_step_s = time.time() - self.started
        if self.bar is not None:
            self.bar.update(1)

    def log_step(self, state, metrics, images_per_s):
        """Every train.log_every optimizer steps: metrics.jsonl, the bar's postfix, wandb."""
        if not self.enabled:
            return
        lr = self._lr()
        record = {"step": state.step, "epoch": state.epoch + 1, "batch": state.batch,     # epochs count from 1
                  **{f"train/{k}": _round(v) for k, v in metrics.items()}, "lr": lr,
                  "images_per_s": round(images_per_s, 1), "time_s": round(time.time() - self.started, 3)}
        self._jsonl(record)
        short = {k: v for k, v in metrics.items() if not k.startswith("_")}
        text = " ".join(f"{k} {_fmt(v)}" for k, v in short.items()) + f" lr {lr:.3g} {images_per_s:,.0f} img/s"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        elif self.cfg.log.progress:
            print(f"epoch {state.epoch + 1} batch {state.batch}/{self.epoch_total} step {state.step}: {text}",
                  flush=True)
        if self.wandb is not None:
            self._wandb_log({**{f"train/{k}": v for k, v in metrics.items()}, "lr": lr,
                             "images_per_s": images_per_s}, state.step)
        self._tb("scalars", {k: v for k, v in record.items() if k.startswith("train/")}
                 | {"lr": lr, "images_per_s": record["images_per_s"]}, state.step)

    def _lr(self):
        return float(self.lr_fn())

    def log_epoch(self, state, metrics, improved, confusion=None):
        """One row of metrics.csv, one printed line, wandb, and (now and then) the plots."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.rows = [r for r in self.rows if int(float(r["epoch"])) < metrics["epoch"]]
        self.rows.append({k: _round(v) for k, v in metrics.items()})
        self._write_csv()
        shown = {k: v for k, v in metrics.items() if "/" in k and not k.endswith("/samples")}
        line = "  ".join(f"{k} {_fmt(v)}" for k, v in shown.items())
        mark = "  (best)" if improved else ""
        print(f"epoch {metrics['epoch']}/{self.cfg.train.epochs}  step {metrics['step']}  {line}  "
              f"lr {metrics['lr']:.3g}  {metrics['time_s']:.1f}s{mark}", flush=True)
        if self.wandb is not None:
            self._wandb_log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, state.step)
        self._tb("scalars", {f"epoch/{k}": v for k, v in self.rows[-1].items() if k not in ("epoch", "step")},
                 state.step)
        if confusion is not None:
            self.confusion = confusion
            self._tb("confusion", confusion, state.step)
        if self.cfg.log.plots and time.time() - self.last_plot > PLOT_EVERY_S:
            self.plot()

    def stopped(self, state, signal_name, requeue_note):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        note = f"; {requeue_note}" if requeue_note else ""
        print(f"stopped by {signal_name} at epoch {state.epoch + 1}, step {state.step}; checkpoint written to "
              f"{self.dir / 'checkpoints' / 'last.pt'}{note}", flush=True)
        if self.cfg.log.plots:
            self.plot()
        if self.wandb is not None:
            try:
                self.wandb.mark_preempting()     # to be resumed (wandb_id.txt keeps the run id)
            except Exception:
                pass
        self._close_tb()
        # The process exits 0 (a clean stop), but wandb takes exit code 0 for a finished run: it gets the
        # signal's 128 + number, so a preempted run shows as preempted, not finished.
        import signal
        self._finish_wandb(exit_code=128 + getattr(signal, signal_name, signal.SIGTERM))

    # -- plots ---------------------------------------------------------------------------------

    def plot(self):
        """curves.png (and confusion.png for classification), written atomically."""
        if not self.enabled or not self.rows:
            return
        try:
            plot_curves(self.rows, self.dir / "curves.png", self.plot_groups)
            if self.confusion is not None:
                plot_confusion(self.confusion, self.classes, self.dir / "confusion.png")
        except Exception as e:  # a plot must never kill a run
            print(f"warning: could not draw plots ({type(e).__name__}: {e})", flush=True)
        self.last_plot = time.time()

    # -- end ---------------------------------------------------------------------------------------

    def finish(self, metrics, extra=""):
        """Final plots and the one-line summary."""
        if not self.enabled:
            return
        if self.cfg.log.plots:
            self.plot()
        keys = [k for k in metrics if (k.startswith("val/") or k == "train/loss") and not k.endswith("/samples")]
        if not keys:                              # no validation (a GAN): the last epoch's training numbers
            keys = [k for k in metrics if k.startswith("train/")]
        summary = ", ".join(f"{k} {_fmt(metrics[k])}" for k in keys)
        if extra.startswith(", ") and not summary:
            extra = extra[2:]
        first = f", first step after {self.first_step_s:.1f}s" if self.first_step_s else ""
        total = time.time() - self.started
        print(f"done: {summary}{extra} in {total:.1f}s{first}; run directory {self.dir}", flush=True)
        if self.tb is not None:
            from lib.config import to_dict
            self._tb("hparams", to_dict(self.cfg), metrics)
        self._close_tb()
        self._finish_wandb()

    def image(self, tag, chw, step):
        """An image for TensorBoard (a GAN's sample grid): (C, H, W) floats in [0, 1]."""
        self._tb("image", tag, chw, step)

    # -- TensorBoard and wandb -----------------------------------------------------------------

    def _tb(self, what, *args):
        if self.tb is None:
            return
        try:
            getattr(self.tb, what)(*args)
        except Exception as e:  # TensorBoard must never stop training
            print(f"warning: TensorBoard failed ({type(e).__name__}: {e}); continuing without it", flush=True)
            self.tb = None

    def _close_tb(self):
        if self.tb is not None:
            self._tb("close")
            self.tb = None

    def _wandb_log(self, data, step):
        try:
            self.wandb.log(data, step=step)
        except Exception as e:
            print(f"warning: wandb.log failed ({e}); continuing without wandb", flush=True)
            self.wandb = None

    def _finish_wandb(self, exit_code=0):
        if self.wandb is not None:
            _close(self.wandb, exit_code)
            self.wandb = None


def close_wandb(exit_code: int) -> None:
    """End a wandb run the script left open (it raised, or was interrupted) with the process's exit code,
    so that a failed run is not recorded as exit_code 0. Called by lib/cli.py with the code it returns."""
    while _OPEN_WANDB:
        _close(_OPEN_WANDB[-1], exit_code)


def _close(run, exit_code):
    try:
        run.finish(exit_code=exit_code)
    except Exception:
        pass
    if run in _OPEN_WANDB:
        _OPEN_WANDB.remove(run)


def _start_wandb(run_dir, cfg, rt):
    """wandb.init with a run id kept in the run directory (a resumed run continues the same wandb run).
    Any failure is a warning: wandb must never stop training."""
    w = cfg.log.wandb
    id_file = Path(run_dir) / "wandb_id.txt"
    try:
        import secrets

        import wandb
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        run = wandb.init(project=w.project or cfg.name, entity=w.entity, name=cfg.name, id=run_id, resume="allow",
                         dir=str(run_dir), mode=w.mode, tags=w.tags, config=_wandb_config(cfg),
                         settings=wandb.Settings(init_timeout=60, silent=True))
        id_file.write_text(run_id + "\n")
        _OPEN_WANDB.append(run)
        return run
    except Exception as e:
        print(f"warning: wandb could not start ({type(e).__name__}: {str(e)[:200]}); continuing without it",
              flush=True)
        return None


def _wandb_config(cfg):
    from lib.config import to_dict
    return to_dict(cfg)


def _round(v):
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.6g}")
    return v


def _fmt(v):
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def best_note(state, monitor: str) -> str:
    """', best <monitor> <value> at epoch <n>' for the summary line, or '' when nothing was best."""
    if state.best is None:
        return ""
    return f", best {monitor} {state.best:.4f} at epoch {state.best_epoch}"
