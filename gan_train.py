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
    import torch
    import torch.nn.functional as F

    from lib import engine, gan, optim, runlog, startup

    # 1) Check the config before touching data or files.
    gan.preflight(cfg)

    # 2) Start the runtime, open the run directory (resume, fresh, or refuse) and load the images
    #    (labels are unused). D is called twice before a backward (real, then fake), so DDP must not
    #    broadcast batch-norm buffers during forward (pytorch#22095): each rank keeps its own.
    rt, run, data = startup.start(cfg, broadcast_buffers=False)

    # 3) Build G and D (same init on every rank), their optimizers, the EMA and the fixed noise.
    g, d = gan.build_models(cfg, data)
    opt_g, opt_d = optim.build_optimizer(cfg.optim, g), optim.build_optimizer(cfg.optim, d)
    g, opt_g = rt.prepare(g, opt_g, compile=cfg.train.compile, channels_last=cfg.train.channels_last)
    d, opt_d = rt.prepare(d, opt_d, compile=cfg.train.compile, channels_last=cfg.train.channels_last)
    ema = gan.make_ema(cfg.gan, rt.unwrap(g))
    fixed_noise = gan.fixed_noise(cfg.gan, cfg.seed, rt.device)   # drawn once; saved in every checkpoint
    rt.print0(f"models: G {gan.count(g):,} and D {gan.count(d):,} parameters; latent {cfg.gan.latent_dim}")

    # 4) Resume (or start fresh), then write config.yaml and env.json.
    state = engine.LoopState()
    objects = {"generator": rt.unwrap(g), "discriminator": rt.unwrap(d), "optimizer_g": opt_g,
               "optimizer_d": opt_d, "scaler": rt.scaler, "fixed_noise": fixed_noise,
               **({"ema": ema} if ema is not None else {})}
    if run.restore(objects, state):
        rt.print0(f"resumed from {run.resumed_from} at epoch {state.epoch + 1}, step {state.step}")
    run.create(rt.env_info())
    log = runlog.RunLogger(run.dir, cfg, rt, state, lr_fn=lambda: opt_g.param_groups[0]["lr"],
                           plot_groups=gan.PLOT_GROUPS, started=cfg._started)
    grids = gan.Grids(run.dir / "samples", data.transform, rt)
    grids.save_reals(data.train)

    # 5) Train. (1) D learns real -> 1 and detached fake -> 0; (2) G learns to make D say 1 on its
    #    fakes (the non-saturating loss). Both under autocast; fp16 scales each backward and updates
    #    the scale once per iteration, after both optimizer steps.
    real_label = cfg.gan.real_label

    def gan_step(real, _, micro):
        b = real.shape[0]
        z = torch.randn(b, cfg.gan.latent_dim, 1, 1, device=rt.device)
        ones = torch.full((b,), real_label, device=rt.device)
        zeros = torch.zeros(b, device=rt.device)
        with rt.autocast():
            fake = g(z)                                          # (B, C, H, W)
            d_real = d(real)                                     # (B,) logits
            d_fake = d(fake.detach())
            loss_d = F.binary_cross_entropy_with_logits(d_real.float(), ones) + \
                F.binary_cross_entropy_with_logits(d_fake.float(), zeros)
        opt_d.zero_grad(set_to_none=True)
        rt.backward(loss_d)
        rt.step(opt_d, update_scale=False)

        with rt.autocast():
            d_fake_for_g = d(fake)
            loss_g = F.binary_cross_entropy_with_logits(d_fake_for_g.float(), torch.ones_like(ones))
        opt_g.zero_grad(set_to_none=True)
        rt.backward(loss_g)
        rt.step(opt_g)
        if ema is not None:
            ema.update(rt.unwrap(g))
        return {"loss_D": loss_d.detach() * b, "loss_G": loss_g.detach() * b,
                "D_x": torch.sigmoid(d_real.detach().float()).sum(),              # D on reals
                "D_G_z1": torch.sigmoid(d_fake.detach().float()).sum(),           # D on fakes, before D's step
                "D_G_z2": torch.sigmoid(d_fake_for_g.detach().float()).sum(),     # D on fakes, after D's step
                "count": b}

    def on_update(state):
        if state.step % cfg.gan.sample_every == 0:
            grids.save(ema.module if ema is not None else rt.unwrap(g), fixed_noise, state.step)

    metrics = engine.fit(cfg=cfg, rt=rt, run=run, log=log, state=state, train_loader=data.train,
                         step_fn=gan_step, eval_fn=dict, objects=objects,
                         lr_fn=lambda: opt_g.param_groups[0]["lr"], on_update=on_update)

    # 6) Finish: a last grid, the curves, the summary; leave the process group cleanly.
    if not metrics.get("stopped"):
        grids.save(ema.module if ema is not None else rt.unwrap(g), fixed_noise, state.step)
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
