"""The supervised training step of train.py and finetune.py: forward and loss under autocast, the
backward (scaled under fp16, without DDP gradient sync on accumulation micro-steps), then on update
steps the clip of the *unscaled* gradients, the optimizer step and the schedule; and LBFGS's step,
which re-evaluates the loss in a closure.

The step is what lib/engine.py's loop calls for every micro-batch: `step(x, y, micro)` returns the
batch's statistics as sums (lib/metrics.py). The runtime object `rt` does what depends on the launch
(autocast, no_sync, the scaled backward, clipping, the optimizer step).
"""
import math
from typing import Callable

from lib import optim
from lib.metrics import STATS


def make_train_step(model, loss_fn, optimizer, scheduler, rt, train, task: str) -> Callable:
    """The step for `model` under the `train` config section (clip_grad_norm, on_nonfinite) and
    `task` (classification or regression, which picks the statistics).

    Gradients are dropped (set to None) after the forward of an update's first micro-batch, right
    before its backward, as in the hand-written loop: dropping them right after the step instead
    made ResNet-18 steps 4-5% slower on CPU (BENCHMARKS.md), the freed blocks being taken by the
    next forward's activations so that backward had to fault in fresh pages for the gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    clip = train.clip_grad_norm
    skip_nonfinite = train.on_nonfinite == "skip"
    batch_stats = STATS[task]

    def train_step(x, y, micro):
        if optim.needs_closure(optimizer):             # LBFGS re-evaluates the loss in its step
            return lbfgs_step(x, y)
        with rt.no_sync(model, skip_sync=not micro.update):
            with rt.autocast():
                out = model(x)                          # (B, num_classes) logits or (B, D) predictions
                loss = loss_fn(out, y)                  # mean over this micro-batch
            if micro.first:
                optimizer.zero_grad(set_to_none=True)
            rt.backward(loss * micro.scale if micro.scale != 1 else loss)   # 1 / micro-batches per update
        if micro.update:
            norm = None
            if clip or skip_nonfinite:
                norm = rt.clip_grad_norm_(optimizer, params, clip or math.inf)
            rt.step(optimizer, skip_if_nonfinite=norm if skip_nonfinite else None)
            scheduler.step()
        return batch_stats(out.detach().float(), y, loss)

    def lbfgs_step(x, y):
        def closure():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            return rt.mean(loss.detach())               # every rank decides on the same (global) loss
        optimizer.step(closure)
        scheduler.step()
        with rt.autocast():
            out = model(x)
        return batch_stats(out.detach().float(), y, loss_fn(out, y))

    return train_step
