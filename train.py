"""Supervised training: image classification (and sequence regression) from one CPU to many GPUs.

    python train.py                                             # fashion_cnn on the embedded digits
    python train.py --config configs/alexnet.yaml optim.lr=0.01 train.epochs=5
    torchrun --nproc_per_node=4 train.py --config configs/resnet18_cifar10.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml train.py --config configs/resnet18_cifar10.yaml
    python train.py --config X.yaml --print-config             # the resolved config; no work done
"""
import os
import sys

from lib import cli

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.yaml")


def main(cfg):
    """Train (or only evaluate) the model that `cfg` describes; returns the final metrics."""
    # Heavy imports live here so that --help and --print-config stay fast (torch alone takes ~2 s).
    from lib import checks, ema as weight_ema, engine, losses, models, optim, runlog, startup, steps
    from lib.models.weights import load_weights

    # 1) Check the config against every registry, before touching data or files.
    task, _ = checks.preflight(cfg)

    # 2) Start the runtime (GPU selection, processes, DDP / DeepSpeed, precision, seeds), open the run
    #    directory (resume it, start fresh, or refuse; nothing is written yet) and load the data.
    rt, run, data = startup.start(cfg, read_only=cfg.train.eval_only)

    # 3) Build the model, loss, optimizer and learning-rate schedule.
    inputs = data.model_inputs(cfg.model)
    model = models.build_model(cfg.model, **inputs, seed=cfg.seed)
    models.probe(model, inputs["input_shape"], f"model.name={cfg.model.name}")
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)
    loss_fn = losses.build_loss(cfg.loss, task).to(rt.device)
    optimizer = optim.build_optimizer(cfg.optim, model)
    updates_per_epoch, total_updates = engine.count_updates(len(data.train), cfg.train)
    scheduler = optim.build_scheduler(cfg.sched, optimizer, steps_per_epoch=updates_per_epoch,
                                      total_steps=total_updates)
    model, optimizer = rt.prepare(model, optimizer, compile=cfg.train.compile,
                                  channels_last=cfg.train.channels_last)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())   # ZeRO-3 shards them
    ema, ema_hook = weight_ema.for_run(cfg.train, rt.unwrap(model), updates_per_epoch)   # train.ema
    rt.print0(f"model: {cfg.model.name}, {n_params:,} parameters; loss {cfg.loss.name}; optimizer "
              f"{cfg.optim.name} (lr {cfg.optim.lr:g}); schedule {cfg.sched.name}"
              + (f"; weight EMA (decay {cfg.train.ema:g}, every {cfg.train.ema_every} steps)" if ema else ""))

    evaluate = engine.make_evaluate(rt, model, data.val, loss_fn, task, inputs["num_classes"], ema)   # (+ val_ema/*)

    # 4) Resume where the run stopped (if it did), then write config.yaml and env.json.
    state = engine.LoopState()
    objects = {"model": rt.unwrap(model), "optimizer": optimizer, "scheduler": scheduler, "scaler": rt.scaler,
               **({"ema": ema} if ema is not None else {})}
    if run.restore(objects, state):
        rt.print0(f"resumed from {run.resumed_from} at epoch {state.epoch + 1}, batch {state.batch}, "
                  f"step {state.step}")
    if cfg.train.eval_only:                             # evaluate the loaded weights; write nothing
        return engine.evaluate_only(rt, evaluate)
    run.create(rt.env_info())
    log = runlog.RunLogger(run.dir, cfg, rt, state, lr_fn=lambda: optimizer.param_groups[0]["lr"],
                           classes=data.spec.classes, started=cfg._started)

    # 5) Train: lib/steps.py's step (forward, loss, backward, clip, optimizer, schedule), run by
    #    engine.fit's loop of epochs, evaluation and checkpoints.
    train_step = steps.make_train_step(model, loss_fn, optimizer, scheduler, rt, cfg.train, task)
    metrics = engine.fit(cfg=cfg, rt=rt, run=run, log=log, state=state, train_loader=data.train,
                         step_fn=train_step, eval_fn=evaluate, objects=objects,
                         lr_fn=lambda: optimizer.param_groups[0]["lr"], on_update=ema_hook)

    # 6) Finish: final plots and the summary line; leave the process group cleanly.
    if not metrics.get("stopped"):
        log.finish(metrics, extra=runlog.best_note(state, cfg.checkpoint.monitor))
    rt.shutdown()
    return metrics


CLI = dict(description=__doc__, default_config=DEFAULT_CONFIG)   # how lib.cli runs this script

if __name__ == "__main__":
    sys.exit(cli.run(main, **CLI))
