"""Supervised training: image classification (and sequence regression) from one CPU to many GPUs.

    python train.py                                             # fashion_cnn on the embedded digits
    python train.py --config configs/alexnet.yaml optim.lr=0.01 train.epochs=5
    torchrun --nproc_per_node=4 train.py --config configs/resnet18_cifar10.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml train.py --config configs/resnet18_cifar10.yaml
    python train.py --config X.yaml --print-config             # the resolved config; no work done
"""
import math
import os
import sys

from lib import cli

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.yaml")


def main(cfg):
    """Train (or only evaluate) the model that `cfg` describes; returns the final metrics."""
    # Heavy imports live here so that --help and --print-config stay fast (torch alone takes ~2 s).
    from lib import checkpoint, checks, datasets, engine, logging, losses, models, optim, runtime

    # 1) Check the config against every registry, before touching data or files.
    task, _ = checks.preflight(cfg)

    # 2) Start the runtime: GPU selection, processes (DDP / DeepSpeed), precision, seeds.
    rt = runtime.setup(cfg, runtime.prepare_env(cfg))
    rt.print0(f"runtime: {rt.describe()}" + "".join(f"\n  {n}" for n in rt.notes))

    # 3) Open the run directory: resume it, start fresh, or refuse (nothing is written yet).
    run = checkpoint.Run(cfg, rt, force=cfg._force, read_only=cfg.train.eval_only)

    # 4) Load the data: a uint8 tensor on the device (memory loader) or a DataLoader over files.
    data = datasets.build_data(cfg, rt)
    rt.print0(f"data: {data.describe()}")

    # 5) Build the model, loss, optimizer and learning-rate schedule.
    inputs = data.model_inputs(cfg.model)
    model = models.build_model(cfg.model, **inputs, seed=cfg.seed)
    models.probe(model, inputs["input_shape"], f"model.name={cfg.model.name}")
    if cfg.model.weights:
        models.load_weights(model, cfg.model.weights)
    loss_fn = losses.build_loss(cfg.loss, task).to(rt.device)
    optimizer = optim.build_optimizer(cfg.optim, model)
    updates_per_epoch = math.ceil(len(data.train) / cfg.train.grad_accum)
    total_updates = min(cfg.train.epochs * updates_per_epoch, cfg.train.max_steps or math.inf)
    scheduler = optim.build_scheduler(cfg.sched, optimizer, steps_per_epoch=updates_per_epoch,
                                      total_steps=total_updates)
    model, optimizer = rt.prepare(model, optimizer, compile=cfg.train.compile,
                                  channels_last=cfg.train.channels_last)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())   # ZeRO-3 shards them
    rt.print0(f"model: {cfg.model.name}, {n_params:,} parameters; loss {cfg.loss.name}; optimizer "
              f"{cfg.optim.name} (lr {cfg.optim.lr:g}); schedule {cfg.sched.name}")

    def evaluate():
        return engine.evaluate(rt.eval_model(model), data.val, loss_fn, rt, task, inputs["num_classes"])

    # 6) Resume where the run stopped (if it did), then write config.yaml and env.json.
    state = engine.LoopState()
    objects = {"model": rt.unwrap(model), "optimizer": optimizer, "scheduler": scheduler, "scaler": rt.scaler}
    if run.restore(objects, state):
        rt.print0(f"resumed from {run.resumed_from} at epoch {state.epoch + 1}, batch {state.batch}, "
                  f"step {state.step}")
    if cfg.train.eval_only:                             # evaluate the loaded weights; write nothing
        return engine.evaluate_only(rt, evaluate)
    run.create(rt.env_info())
    log = logging.RunLogger(run.dir, cfg, rt, state, lr_fn=lambda: optimizer.param_groups[0]["lr"],
                            classes=data.spec.classes, started=cfg._started)

    # 7) Train: the step below, run by engine.fit's loop of epochs, evaluation and checkpoints.
    train_step = make_train_step(model, loss_fn, optimizer, scheduler, rt, cfg, task)
    metrics = engine.fit(cfg=cfg, rt=rt, run=run, log=log, state=state, train_loader=data.train,
                         step_fn=train_step, eval_fn=evaluate, objects=objects,
                         lr_fn=lambda: optimizer.param_groups[0]["lr"])

    # 8) Finish: final plots and the summary line; leave the process group cleanly.
    if not metrics.get("stopped"):
        best = f", best {cfg.checkpoint.monitor} {state.best:.4f} at epoch {state.best_epoch}" if state.best is not None else ""
        log.finish(metrics, extra=best)
    rt.shutdown()
    return metrics


def make_train_step(model, loss_fn, optimizer, scheduler, rt, cfg, task):
    """One supervised step: forward and loss under autocast; backward (scaled under fp16, without DDP
    gradient sync on accumulation micro-steps); on update steps clip the *unscaled* gradients, step
    the optimizer (the fp16 scaler skips inf/NaN steps), then the schedule. finetune.py uses it too.

    Gradients are dropped (set to None) after the forward of an update's first micro-batch, right
    before its backward, as in the hand-written loop: dropping them right after the step instead
    made ResNet-18 steps 4-5% slower on CPU (BENCHMARKS.md), the freed blocks being taken by the
    next forward's activations so that backward had to fault in fresh pages for the gradients."""
    from lib import engine, optim
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.train.clip_grad_norm
    skip_nonfinite = cfg.train.on_nonfinite == "skip"
    batch_stats = engine.STATS[task]

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


CLI = dict(description=__doc__, default_config=DEFAULT_CONFIG)   # how lib.cli runs this script

if __name__ == "__main__":
    sys.exit(cli.run(main, **CLI))
