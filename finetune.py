"""Transfer learning: load weights, replace or extend the head, freeze layers, per-layer learning rates.

    python finetune.py --config configs/finetune_digits.yaml finetune.weights=runs/digits04/checkpoints/best.pt
    python finetune.py --config configs/finetune_resnet18.yaml        # ImageNet weights -> CIFAR-10
    torchrun --nproc_per_node=2 finetune.py --config configs/finetune_digits.yaml finetune.weights=...
    python train.py --config runs/<name>/model.yaml                    # evaluate the exported model.pt
"""
import os
import sys

from lib import cli
from lib.config import FinetuneConfig

DEFAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "script_defaults", "finetune.yaml")


def main(cfg):
    """Fine-tune the weights that `cfg` names on its data; returns the final metrics."""
    from lib import ema as weight_ema, engine, losses, optim, runlog, startup, steps
    from lib.finetune.build import build_model
    from lib.finetune.export import export
    from lib.finetune.freeze import Unfreezer, freeze, parameter_table
    from lib.finetune.preflight import preflight

    # 1) Check the config (and the finetune section) before touching data or files.
    task, _ = preflight(cfg)

    # 2) Start the runtime (GPU selection, processes, DDP / DeepSpeed, precision, seeds), open the run
    #    directory (resume it, start fresh, or refuse; nothing is written yet) and load the data
    #    (data.classes picks and relabels a subset of classes).
    rt, run, data = startup.start(cfg, read_only=cfg.train.eval_only)

    # 3) The model: pretrained weights, a head for these classes, the first conv for these channels,
    #    then the frozen layers (frozen batch-norm stays in eval mode).
    model, head, inputs, report = build_model(cfg, data)
    frozen = freeze(model, cfg.finetune, head)
    rt.print0(report)
    table = parameter_table(model)
    rt.print0(table)

    # 4) Loss, an optimizer over the trainable parameters only (optim.param_groups sets per-group
    #    learning rates), and the schedule.
    loss_fn = losses.build_loss(cfg.loss, task).to(rt.device)
    optimizer = optim.build_optimizer(cfg.optim, model)
    updates_per_epoch, total_updates = engine.count_updates(len(data.train), cfg.train)
    scheduler = optim.build_scheduler(cfg.sched, optimizer, steps_per_epoch=updates_per_epoch,
                                      total_steps=total_updates)

    # 5) Resume (unfreezing first when the checkpoint is past finetune.unfreeze_at_epoch, so the
    #    optimizer has the same groups), wrap for DDP, then write config.yaml, env.json, parameters.txt.
    unfreezer = Unfreezer(cfg, model, frozen, optimizer, scheduler)
    position = run.resume_position()
    if position and unfreezer.due(position[0]):
        unfreezer.apply()
    wrapped, optimizer = rt.prepare(model, optimizer, compile=cfg.train.compile,
                                    channels_last=cfg.train.channels_last)
    ema, ema_hook = weight_ema.for_run(cfg.train, model, updates_per_epoch)       # train.ema
    state = engine.LoopState()
    objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": rt.scaler,
               **({"ema": ema} if ema is not None else {})}
    if run.restore(objects, state):
        rt.print0(f"resumed from {run.resumed_from} at epoch {state.epoch + 1}, batch {state.batch}, "
                  f"step {state.step}")

    evaluate = engine.make_evaluate(rt, wrapped, data.val, loss_fn, task, inputs["num_classes"], ema)   # (+ val_ema/*)

    if cfg.train.eval_only:                             # evaluate the loaded weights; write nothing
        return engine.evaluate_only(rt, evaluate)
    run.create(rt.env_info())
    if rt.is_main:
        (run.dir / "parameters.txt").write_text(report + "\n\n" + table + "\n")
    log = runlog.RunLogger(run.dir, cfg, rt, state, lr_fn=lambda: optimizer.param_groups[0]["lr"],
                           classes=data.spec.classes, started=cfg._started)

    # 6) Train with lib/steps.py's step. At finetune.unfreeze_at_epoch the frozen layers join as a new
    #    parameter group; DDP only syncs what was trainable when it wrapped, so wrap again.
    current = {"step": steps.make_train_step(wrapped, loss_fn, optimizer, scheduler, rt, cfg.train, task)}

    def on_epoch_start(state):
        if unfreezer.due(state.epoch):
            n = unfreezer.apply()
            rt.print0(f"epoch {state.epoch + 1}: unfroze {n} parameter tensors (lr {unfreezer.lr:g})")
            again, _ = rt.prepare(model, compile=cfg.train.compile, channels_last=cfg.train.channels_last)
            current["step"] = steps.make_train_step(again, loss_fn, optimizer, scheduler, rt, cfg.train, task)

    metrics = engine.fit(cfg=cfg, rt=rt, run=run, log=log, state=state, train_loader=data.train,
                         step_fn=lambda x, y, micro: current["step"](x, y, micro), eval_fn=evaluate,
                         objects=objects, lr_fn=lambda: optimizer.param_groups[0]["lr"],
                         on_update=ema_hook, on_epoch_start=on_epoch_start)

    # 7) Export model.pt (+ model.yaml, a train.py config that evaluates it) and finish.
    if not metrics.get("stopped"):
        weights = rt.full_state_dict(wrapped)         # every rank: ZeRO-3 gathers its shards
        if rt.is_main:
            path = export(run.dir, cfg, weights, inputs)
            rt.print0(f"exported {path}; evaluate it with: python train.py --config {run.dir / 'model.yaml'}")
        rt.barrier()
        log.finish(metrics, extra=runlog.best_note(state, cfg.checkpoint.monitor))
    rt.shutdown()
    return metrics


CLI = dict(schema=FinetuneConfig, description=__doc__, defaults=DEFAULTS,   # how lib.cli runs it
           preflight="lib.finetune.preflight:preflight")

if __name__ == "__main__":
    sys.exit(cli.run(main, **CLI))
