"""DCGAN training on one CPU or many GPUs, with sample grids that show its progress.

    python gan_train.py --config configs/dcgan_digits.yaml       # offline: the embedded digits, 32x32x1
    python gan_train.py --config configs/dcgan.yaml               # CIFAR-10 (downloads when online)
    torchrun --nproc_per_node=4 gan_train.py --config configs/dcgan.yaml
    python gan_train.py --sample 100 --from runs/dcgan/checkpoints/last.pt     # 100 images from a checkpoint
"""
import os
import sys

from lib import cli
from lib.config import GanConfig

DEFAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "script_defaults", "gan_train.yaml")


def main(cfg):
    """Train the generator and discriminator that `cfg` describes; returns the final statistics."""
    from lib import engine, gan, optim, runlog, startup

    # 1) Check the config before touching data or files.
    gan.preflight(cfg)

    # 2) Start the runtime, open the run directory (resume, fresh, or refuse) and load the images
    #    (labels are unused). D is called twice before a backward (real, then fake), so DDP must not
    #    broadcast batch-norm buffers during forward (pytorch#22095): each rank keeps its own.
    rt, run, data = startup.start(cfg, broadcast_buffers=False)

    # 3) Build G and D (same init on every rank), their optimizers and schedules, the EMA and the
    #    fixed noise.
    g, d = gan.build_models(cfg, data)
    opt_g, opt_d = optim.build_optimizer(cfg.optim, g), optim.build_optimizer(cfg.optim, d)
    updates_per_epoch, total_updates = engine.count_updates(len(data.train), cfg.train)
    schedulers = [optim.build_scheduler(cfg.sched, opt, steps_per_epoch=updates_per_epoch, total_steps=total_updates)
                  for opt in (opt_g, opt_d)] if cfg.sched.name != "none" else []
    g, opt_g = rt.prepare(g, opt_g, compile=cfg.train.compile, channels_last=cfg.train.channels_last)
    d, opt_d = rt.prepare(d, opt_d, compile=cfg.train.compile, channels_last=cfg.train.channels_last)
    ema = gan.make_ema(cfg.gan, rt.unwrap(g))
    fixed_noise = gan.fixed_noise(cfg.gan, cfg.seed, rt.device)   # drawn once; saved in every checkpoint
    rt.print0(f"models: G {gan.count(g):,} and D {gan.count(d):,} parameters; latent {cfg.gan.latent_dim}")

    # 4) Resume (or start fresh), then write config.yaml and env.json.
    state = engine.LoopState()
    objects = {"generator": rt.unwrap(g), "discriminator": rt.unwrap(d), "optimizer_g": opt_g,
               "optimizer_d": opt_d, "scaler": rt.scaler, "fixed_noise": fixed_noise,
               **({"ema": ema} if ema is not None else {}),
               **({"scheduler_g": schedulers[0], "scheduler_d": schedulers[1]} if schedulers else {})}
    if run.restore(objects, state):
        rt.print0(f"resumed from {run.resumed_from} at epoch {state.epoch + 1}, step {state.step}")
    run.create(rt.env_info())
    log = runlog.RunLogger(run.dir, cfg, rt, state, lr_fn=lambda: opt_g.param_groups[0]["lr"],
                           plot_groups=gan.PLOT_GROUPS, started=cfg._started)
    grids = gan.Grids(run.dir / "samples", data.transform, rt)
    grids.save_reals(data.train)

    # 5) Train: lib/gan.py's step (D on real and fake, then G through a frozen D), run by
    #    engine.fit's loop of epochs and checkpoints; a sample grid every gan.sample_every steps.
    gan_step = gan.make_gan_step(g, d, opt_g, opt_d, rt, cfg, ema, schedulers)

    def on_update(state):
        if state.step % cfg.gan.sample_every == 0:
            grid = grids.save(ema.module if ema is not None else rt.unwrap(g), fixed_noise, state.step)
            if grid is not None:
                log.image("samples", grid, state.step)              # TensorBoard, when enabled

    metrics = engine.fit(cfg=cfg, rt=rt, run=run, log=log, state=state, train_loader=data.train,
                         step_fn=gan_step, eval_fn=dict, objects=objects,
                         lr_fn=lambda: opt_g.param_groups[0]["lr"], on_update=on_update)

    # 6) Finish: a last grid, the curves, the summary; leave the process group cleanly.
    if not metrics.get("stopped"):
        grid = grids.save(ema.module if ema is not None else rt.unwrap(g), fixed_noise, state.step)
        if grid is not None:
            log.image("samples", grid, state.step)
        log.finish(metrics, extra=f", samples in {grids.folder}")
    rt.shutdown()
    return metrics


def sample_args(parser):
    group = parser.add_argument_group("sampling from a checkpoint")
    group.add_argument("--sample", type=int, metavar="N", help="write N generated images and exit")
    group.add_argument("--from", dest="from_ckpt", metavar="CKPT", help="checkpoint to sample from (with --sample)")
    group.add_argument("--out", metavar="DIR", help="output folder (default: <run>/generated)")
    group.add_argument("--seed", type=int, default=0, help="seed of the latent vectors (default 0)")


def sample_command(args):
    if args.sample is None and args.from_ckpt is None:
        return None
    from lib import gan
    return gan.sample_from_checkpoint(args.sample, args.from_ckpt, args.out, args.seed)


CLI = dict(schema=GanConfig, description=__doc__, defaults=DEFAULTS,   # how lib.cli runs this script
           preflight="lib.gan:preflight", extra_args=sample_args, command=sample_command)

if __name__ == "__main__":
    sys.exit(cli.run(main, **CLI))
