"""The loop around a training step: epochs, accumulation boundaries, logging, evaluation that is
exact under DDP, checkpoints by steps and epochs, stop signals and non-finite losses.

The step itself (forward, loss, backward, clip, optimizer) is the caller's: lib/steps.py's for
supervised training, gan_train.py's own for the GAN. It is called as `step_fn(x, y, micro)` and
returns a dict of per-batch *sums* on the device plus "count" (see lib/metrics.py); every reported
metric is sum / count, reduced across ranks only when it is read (no host-device sync per step).
"""
import math
import signal
import time
from dataclasses import asdict, dataclass

import torch

from lib.errors import RunError
from lib.metrics import STATS, Meter


@dataclass
class LoopState:
    """Where training is. Saved in every checkpoint; restored on resume."""
    epoch: int = 0          # epoch in progress (equals epochs completed when batch == 0)
    batch: int = 0          # micro-batches of this epoch already done (by each rank)
    samples: int = 0        # samples of this epoch's global order already consumed (by all ranks)
    step: int = 0           # optimizer updates done
    best: float = None      # best value of checkpoint.monitor so far
    best_epoch: int = None
    skipped_steps: int = 0  # updates skipped for a non-finite gradient (train.on_nonfinite=skip)

    def __post_init__(self):
        self.meter = None        # the epoch in progress's running sums (a Meter), while it runs
        self.saved_meter = None  # ... as restored from a mid-epoch checkpoint, until the epoch goes on
        self.images = 0          # samples (all ranks) trained by this process in the epoch in progress

    def state_dict(self):
        return asdict(self)

    def load_state_dict(self, d):
        for k, v in d.items():
            if k == "meter":
                self.saved_meter = v
            elif k in self.__dataclass_fields__:
                setattr(self, k, v)

    def collect(self, rt):
        """What a checkpoint holds of the loop (a collective: the running epoch sums of every rank
        are added up, so a mid-epoch resume reports the same epoch metrics as an unbroken run)."""
        d = self.state_dict()
        d["meter"] = self.meter.global_state(rt) if self.meter is not None and self.samples else None
        return d


def count_updates(batches_per_epoch: int, train) -> tuple[int, int]:
    """(optimizer updates per epoch, updates in the whole run) for the `train` config section: an
    epoch's last accumulation group may be shorter, and train.max_steps cuts the run short. The
    learning-rate schedule is sized by these."""
    per_epoch = math.ceil(batches_per_epoch / train.grad_accum)
    return per_epoch, min(train.epochs * per_epoch, train.max_steps or math.inf)


@dataclass
class Micro:
    update: bool            # this micro-batch ends an optimizer step
    scale: float            # 1 / number of micro-batches in this step (gradient accumulation)
    first: bool = True      # this micro-batch starts an optimizer step (its gradients start from zero)


@torch.no_grad()
def evaluate(model, loader, loss_fn, rt, task, num_classes=None):
    """Metrics over the whole validation set, every sample counted exactly once across ranks.

    The loader shards without padding (rank r takes samples r, r+world, ...), sums are kept in
    float64 / int64 and all-reduced once, so accuracy is the same with 1 or N processes. The raw
    module is used, so no DDP collective runs inside the loop (ranks may have different counts).
    """
    rt.sync_buffers(model)          # batch-norm statistics: the same model on every rank (dist.sync_buffers)
    was_training = model.training
    model.eval()
    meter = Meter()
    confusion = None
    if task == "classification" and num_classes:
        confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=rt.device)
    loader.set_epoch(0)
    for x, y in loader:
        with rt.autocast():
            out = model(x)
            loss = loss_fn(out, y)
        out = out.float()
        meter.add(STATS[task](out, y, loss, top5=True))
        if confusion is not None:
            confusion += torch.bincount(y * num_classes + out.argmax(1), minlength=num_classes ** 2)
    if rt.lockstep_eval:   # ZeRO-3: ranks with fewer batches run throw-away forwards so gathers line up
        most = torch.tensor([len(loader)], device=rt.device)
        rt.all_reduce_(most, op="max")
        extra = int(most.item()) - len(loader)
        if extra and len(loader) == 0:
            raise RunError("a process got no validation samples under ZeRO-3; use a validation set at least as "
                           "large as the number of processes.")
        for _ in range(extra):
            with rt.autocast():                         # low-precision weights under DeepSpeed bf16
                model(next(iter(loader))[0])
    if meter.keys is None:  # this rank got no samples: add zeros with the same keys as the others
        empty = torch.zeros(0, num_classes, device=rt.device)
        target = torch.zeros(0, dtype=torch.long, device=rt.device) if task == "classification" else empty
        meter.add(STATS[task](empty, target, torch.zeros((), device=rt.device), top5=True))
    values = meter.read(rt, keep_count=True)
    model.train(was_training)
    out = {f"val/{k}": v for k, v in values.items()}
    if confusion is not None:
        rt.all_reduce_(confusion)
        out["confusion"] = confusion.view(num_classes, num_classes).cpu()
    return out


def make_evaluate(rt, model, loader, loss_fn, task, num_classes=None, ema=None):
    """The eval_fn of train.py and finetune.py: evaluate(model) (the module rt.eval_model picks), and
    with a weight EMA (train.ema) the EMA's module too, reported as val_ema/*."""
    def run():
        metrics = evaluate(rt.eval_model(model), loader, loss_fn, rt, task, num_classes)
        if ema is not None:
            ema_metrics = evaluate(ema.module, loader, loss_fn, rt, task, num_classes)
            metrics.update({k.replace("val/", "val_ema/", 1): v for k, v in ema_metrics.items()
                            if k.startswith("val/")})
        return metrics
    return run


class NonFiniteGuard:
    """Finds the first step whose loss is NaN/inf without a per-step host sync or kernel: it keeps
    references to the steps' loss tensors and looks at them only when checked (log lines,
    checkpoints, epoch ends), so it can name the exact step."""

    def __init__(self, rt, policy):
        self.rt, self.policy = rt, policy
        self.pending = []                        # (step, loss tensor) since the last check

    def watch(self, stats, step):
        """Remember this step's loss; under policy skip, drop a non-finite batch from the sums (the
        update itself is skipped, and counted, by rt.step on the all-reduced gradient norm)."""
        loss = sum(v for k, v in stats.items() if k.startswith("loss"))
        if self.policy == "skip":
            finite = torch.isfinite(loss)
            return {k: torch.where(finite, torch.as_tensor(v, device=finite.device), 0) for k, v in stats.items()}
        self.pending.append((step, loss))
        return stats

    def check(self, where):
        """Raise RunError on every rank if any rank saw a non-finite loss (policy stop)."""
        if self.policy == "skip":
            return
        first = 2**62
        if self.pending:
            finite = torch.isfinite(torch.stack([loss for _, loss in self.pending]))
            bad = torch.nonzero(~finite).flatten()
            if len(bad):
                first = self.pending[int(bad[0])][0]
        self.pending = []
        t = torch.tensor([first], dtype=torch.int64, device=self.rt.device)
        self.rt.all_reduce_(t, op="min")
        step = int(t.item())
        if step < 2**62:
            raise RunError(f"the loss became NaN or infinite at optimizer step {step + 1} ({where}); nothing was "
                           f"saved after it, so the last checkpoint is intact. Lower optim.lr, set "
                           f"train.clip_grad_norm, check the data, or set train.on_nonfinite=skip.")


def train_one_epoch(state, loader, step_fn, rt, log, run, objects, cfg, guard, on_update=None):
    """One epoch (or its rest, when resuming mid-epoch). Returns (train metrics, stopped by signal?)."""
    t = cfg.train
    loader.set_epoch(state.epoch, start_sample=state.samples)
    n = state.batch + loader.remaining()            # micro-batches of this epoch, done and to do
    meter = state.meter = Meter()
    if state.samples and state.saved_meter:             # resuming mid-epoch: the sums so far go on
        meter.load_global_state(state.saved_meter, rt)
    state.saved_meter = None
    log.start_epoch(state, n)
    state.images = 0
    tick, images = time.perf_counter(), 0
    for x, y in loader:
        group_start = state.batch - state.batch % t.grad_accum
        group = min(t.grad_accum, n - group_start)
        micro = Micro(update=state.batch + 1 == group_start + group, scale=1.0 / group,
                      first=state.batch == group_start)
        meter.add(guard.watch(step_fn(x, y, micro), state.step))
        images += y.shape[0]
        state.batch += 1
        state.samples += y.shape[0] * rt.world_size
        state.images += y.shape[0] * rt.world_size
        log.advance(state)
        if not micro.update:
            continue
        state.step += 1
        state.skipped_steps = rt.skipped_steps
        if on_update is not None:
            on_update(state)
        if state.step % t.log_every == 0:
            guard.check(f"epoch {state.epoch + 1}")
            elapsed = time.perf_counter() - tick
            log.log_step(state, meter.read(rt, since_mark=True), images * rt.world_size / max(elapsed, 1e-9))
            tick, images = time.perf_counter(), 0
        if rt.should_stop():
            return meter.read(rt), True
        if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
            guard.check(f"epoch {state.epoch + 1}")
            run.save(objects, state)
        if state.step == rt.fault_pause_step:   # fault-injection tests: hold here until killed
            rt.pause_for_fault_test()
        if t.max_steps and state.step >= t.max_steps:
            break
    metrics = meter.read(rt)
    if state.batch >= n:
        state.epoch, state.batch, state.samples = state.epoch + 1, 0, 0
        state.meter = None
    return metrics, False


def fit(*, cfg, rt, run, log, state, train_loader, step_fn, eval_fn, objects, lr_fn, on_update=None,
        on_epoch_start=None):
    """Epochs of train_one_epoch + evaluation + best tracking + checkpoints; returns final metrics.

    on_update(state) runs on every rank after each optimizer step (e.g. GAN sample grids);
    on_epoch_start(state) before each epoch (e.g. gradual unfreezing)."""
    t = cfg.train
    guard = NonFiniteGuard(rt, t.on_nonfinite)
    rt.skipped_steps = state.skipped_steps          # the count goes on across a resume
    rt.install_signal_handlers()
    metrics, started = {}, time.perf_counter()
    try:
        while state.epoch < t.epochs and not (t.max_steps and state.step >= t.max_steps):
            if on_epoch_start is not None:
                on_epoch_start(state)
            number = state.epoch + 1                    # this epoch's number, counted from 1 everywhere
            epoch_label = f"epoch {number}"             # (before train_one_epoch moves the counter on)
            tick = time.perf_counter()
            train_metrics, stopped = train_one_epoch(state, train_loader, step_fn, rt, log, run, objects, cfg,
                                                     guard, on_update)
            seconds = time.perf_counter() - tick        # training only, evaluation apart
            guard.check(epoch_label)
            if stopped:
                path = run.save(objects, state) or run.ckpt_dir / "last.pt"
                requeued = rt.requeue_slurm_job()
                log.stopped(state, rt.stop_signal, requeued)
                rt.write_stop_marker(f"stopped by {rt.stop_signal} at step {state.step}; checkpoint {path}"
                                     + (f"; {requeued}" if requeued else ""))
                return {"stopped": True, "step": state.step, "epoch": state.epoch}
            finished = state.epoch >= t.epochs or (t.max_steps and state.step >= t.max_steps)
            evaluate_now = finished or state.epoch % t.eval_every_epochs == 0
            val = eval_fn() if evaluate_now else {}
            confusion = val.pop("confusion", None)
            metrics = {"epoch": number, "step": state.step, "lr": lr_fn(),
                       **{f"train/{k}": v for k, v in train_metrics.items()}, **val,
                       "images_per_s": round(state.images / max(seconds, 1e-9), 1),
                       "epoch_time_s": round(seconds, 3), "time_s": round(time.perf_counter() - started, 3)}
            if guard.policy == "skip":
                metrics["train/skipped_steps"] = state.skipped_steps
            improved = run.update_best(state, metrics)
            log.log_epoch(state, metrics, improved, confusion)
            every = cfg.checkpoint.every_epochs
            if finished or improved or (every and state.epoch % every == 0):
                run.save(objects, state, best=improved, metrics=metrics)
    finally:
        rt.restore_signal_handlers(only=(signal.SIGINT,))
    return metrics


def evaluate_only(rt, eval_fn):
    """--eval-only: evaluate, print the metrics as one JSON line, leave the process group; no files."""
    import json
    metrics = eval_fn()
    metrics.pop("confusion", None)
    rt.print0("eval: " + json.dumps(metrics))
    rt.shutdown()
    return metrics
