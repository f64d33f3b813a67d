"""Transfer learning: load weights, replace or extend the head, freeze layers, per-layer learning rates.

    python finetune.py --config configs/finetune_digits.yaml finetune.weights=runs/digits04/checkpoints/best.pt
    python finetune.py --config configs/finetune_resnet18.yaml        # ImageNet weights -> CIFAR-10
    torchrun --nproc_per_node=2 finetune.py --config configs/finetune_digits.yaml finetune.weights=...
    python train.py --config runs/<name>/model.yaml                    # evaluate the exported model.pt
"""
import sys

from lib import cli
from lib.config import FinetuneConfig

DEFAULTS = {"name": "finetune", "model": {"name": "torchvision:resnet18"}, "optim": {"lr": 1.0e-3}}


def main(cfg):
    """Fine-tune the weights that `cfg` names on its data; returns the final metrics."""
    import math

    from lib import checkpoint, datasets, engine, finetune, logging, losses, optim, runtime
    from train import make_train_step

    # 1) Check the config (and the finetune section) before touching data or files.
    task, _ = finetune.preflight(cfg)

    # 2) Start the runtime: GPU selection, processes (DDP / DeepSpeed), precision, seeds.
    rt = runtime.setup(cfg, runtime.prepare_env(cfg))
    rt.print0(f"runtime: {rt.describe()}" + "".join(f"\n  {n}" for n in rt.notes))

    # 3) Open the run directory: resume, start fresh, or refuse (nothing is written yet).
    run = checkpoint.Run(cfg, rt, force=cfg._force, read_only=cfg.train.eval_only)

    # 4) Load the data (data.classes picks and relabels a subset of classes).
    data = datasets.build_data(cfg, rt)
    rt.print0(f"data: {data.describe()}")

    # 5) The model: pretrained weights, a head for these classes, the first conv for these channels,
    #    then the frozen layers (frozen batch-norm stays in eval mode).
    model, head, inputs, report = finetune.build_model(cfg, data)
    frozen = finetune.freeze(model, cfg.finetune, head)
    rt.print0(report)
    table = finetune.parameter_table(model)
    rt.print0(table)

    # 6) Loss, an optimizer over the trainable parameters only (optim.param_groups sets per-group
    #    learning rates), and the schedule.
    loss_fn = losses.build_loss(cfg.loss, task).to(rt.device)
    optimizer = optim.build_optimizer(cfg.optim, model)
    updates_per_epoch = math.ceil(len(data.train) / cfg.train.grad_accum)
    total_updates = min(cfg.train.epochs * updates_per_epoch, cfg.train.max_steps or math.inf)
    scheduler = optim.build_scheduler(cfg.sched, optimizer, steps_per_epoch=updates_per_epoch,
                                      total_steps=total_updates)

    # 7) Resume (unfreezing first when the checkpoint is past finetune.unfreeze_at_epoch, so the
    #    optimizer has the same groups), wrap for DDP, then write config.yaml, env.json, parameters.txt.
    unfreezer = finetune.Unfreezer(cfg, model, frozen, optimizer, scheduler)
    position = run.resume_position()
    if position and unfreezer.due(position[0]):
        unfreezer.apply()
    wrapped, optimizer = rt.prepare(model, optimizer, compile=cfg.train.compile,
                                    channels_last=cfg.train.channels_last)
    state = engine.LoopState()
    objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": rt.scaler}
    if run.restore(objects, state):
        rt.print0(f"resumed from {run.resumed_from} at epoch {state.epoch + 1}, batch {state.batch}, "
                  f"step {state.step}")

    def evaluate():
        return engine.evaluate(rt.eval_model(wrapped), data.val, loss_fn, rt, task, inputs["num_classes"])

    if cfg.train.eval_only:                             # evaluate the loaded weights; write nothing
        return engine.evaluate_only(rt, evaluate)
    run.create(rt.env_info())
    if rt.is_main:
        (run.dir / "parameters.txt").write_text(report + "\n\n" + table + "\n")
    log = logging.RunLogger(run.dir, cfg, rt, state, lr_fn=lambda: optimizer.param_groups[0]["lr"],
                            classes=data.spec.classes, started=cfg._started)

    # 8) Train with train.py's step. At finetune.unfreeze_at_epoch the frozen layers join as a new
    #    parameter group; DDP only syncs what was trainable when it wrapped, so wrap again.
    current = {"step": make_train_step(wrapped, loss_fn, optimizer, scheduler, rt, cfg, task)}

    def on_epoch_start(state):
        if unfreezer.due(state.epoch):
            n = unfreezer.apply()
            rt.print0(f"epoch {state.epoch + 1}: unfroze {n} parameter tensors (lr {unfreezer.lr:g})")
            again, _ = rt.prepare(model, compile=cfg.train.compile, channels_last=cfg.train.channels_last)
            current["step"] = make_train_step(again, loss_fn, optimizer, scheduler, rt, cfg, task)

    metrics = engine.fit(cfg=cfg, rt=rt, run=run, log=log, state=state, train_loader=data.train,
                         step_fn=lambda x, y, micro: current["step"](x, y, micro), eval_fn=evaluate,
                         objects=objects, lr_fn=lambda: optimizer.param_groups[0]["lr"],
                         on_epoch_start=on_epoch_start)

    # 9) Export model.pt (+ model.yaml, a train.py config that evaluates it) and finish.
    if not metrics.get("stopped"):
        weights = rt.full_state_dict(wrapped)         # every rank: ZeRO-3 gathers its shards
        if rt.is_main:
            path = finetune.export(run.dir, cfg, weights, inputs)
            rt.print0(f"exported {path}; evaluate it with: python train.py --config {run.dir / 'model.yaml'}")
        rt.barrier()
        best = f", best {cfg.checkpoint.monitor} {state.best:.4f} at epoch {state.best_epoch}" if state.best is not None else ""
        log.finish(metrics, extra=best)
    rt.shutdown()
    return metrics


CLI = dict(schema=FinetuneConfig, description=__doc__, script_defaults=DEFAULTS,   # how lib.cli runs it
           preflight="lib.finetune:preflight")

if __name__ == "__main__":
    sys.exit(cli.run(main, **CLI))
