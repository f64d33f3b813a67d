"""What gan_train.py needs besides the shared pieces: its pre-flight checks, building G and D, the
GAN step, the fixed noise, sample grids, and sampling N images from a checkpoint."""
import contextlib
import math
from pathlib import Path

import torch

from lib import data
from lib.config import where
from lib.data.transforms import norm_stats
from lib.errors import UserError
from lib.io import atomic_file
from lib.plots import SPEED_PANELS
from lib.seeding import seeded

PLOT_GROUPS = [("losses", ["train/loss_D", "train/loss_G"]),
               ("discriminator outputs", ["train/D_x", "train/D_G_z1", "train/D_G_z2"]),
               ("lr", ["lr"]), *SPEED_PANELS]


def preflight(cfg) -> tuple[str, str]:
    """GAN-specific checks on top of the dataset / init / optimizer checks."""
    data_cfg, train_cfg, gan_cfg = cfg.data, cfg.train, cfg.gan
    meta = data.check(data_cfg)
    if meta["kind"] != "image":
        raise UserError(f"data.name={data_cfg.name} gives {meta['kind']}s; gan_train.py generates images.")
    if cfg.model.name != "dcgan_generator":
        raise UserError(f"{where(cfg, 'model.name')} = {cfg.model.name}: gan_train.py trains the DCGAN "
                        f"(dcgan_generator + dcgan_discriminator); leave model.name unset.")
    if cfg.loss.name != "bce_with_logits" or cfg.loss.extra:
        raise UserError(f"{where(cfg, 'loss.name')}: the DCGAN losses are fixed (BCE with logits, "
                        f"non-saturating G loss); remove the loss section.")
    from lib.runtime import deepspeed_requested
    if deepspeed_requested(cfg):
        raise UserError("gan_train.py does not run under DeepSpeed: ZeRO shards one model and one optimizer, "
                        "a GAN steps two in alternation; launch with torchrun or accelerate launch "
                        "(configs/accelerate/ddp.yaml) instead.")
    if train_cfg.ema is not None:
        raise UserError(f"{where(cfg, 'train.ema')}: gan_train.py keeps its generator's EMA with gan.ema "
                        f"(e.g. gan.ema=0.999); remove train.ema.")
    if train_cfg.grad_accum != 1:
        raise UserError(f"{where(cfg, 'train.grad_accum')} must be 1 for gan_train.py (D and G alternate "
                        f"every batch); use a larger data.batch_size or more processes.")
    if train_cfg.on_nonfinite != "stop":
        raise UserError(f"{where(cfg, 'train.on_nonfinite')}: gan_train.py only stops on a non-finite loss.")
    if data_cfg.normalize not in ("symmetric", "none"):
        raise UserError(f"{where(cfg, 'data.normalize')} = {data_cfg.normalize}: the generator ends in tanh for "
                        f"data.normalize=symmetric ([-1, 1]) or sigmoid for none ([0, 1]); pick one of those.")
    if data_cfg.augment != "none":
        raise UserError(f"{where(cfg, 'data.augment')}: augmenting real images makes G learn the "
                        f"augmentations; set data.augment=none.")
    size = data_cfg.image_size
    if size is None:
        raise UserError("data.image_size must be set for gan_train.py (e.g. 32).")
    try:
        from lib.models.dcgan import layout
        layout(size)
    except ValueError as e:
        raise UserError(f"{where(cfg, 'data.image_size')}: {e}.") from None
    for key in ("latent_dim", "g_features", "d_features", "sample_every", "grid"):
        if getattr(gan_cfg, key) < 1:
            raise UserError(f"{where(cfg, 'gan.' + key)} must be at least 1.")
    if gan_cfg.ema is not None and not 0.0 < gan_cfg.ema < 1.0:
        raise UserError(f"{where(cfg, 'gan.ema')} must be between 0 and 1 (e.g. 0.999), or null.")
    if cfg.checkpoint.monitor != "none":
        raise UserError(f"{where(cfg, 'checkpoint.monitor')}: a GAN has no validation metric to pick best.pt "
                        f"by; leave checkpoint.monitor=none.")
    from lib import init, optim, tensorboard
    tensorboard.check(cfg.log)
    init.check(cfg.model.init, origins=cfg._origins)
    optim.check(cfg)
    return "generation", "image"


def build_models(cfg, data) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(generator, discriminator) for the data's channels and size, initialised identically on
    every rank (from cfg.seed, by cfg.model.init), with widths and latent size from cfg.gan."""
    from lib.init import apply_init
    from lib.models.dcgan import Discriminator, Generator
    gan_cfg = cfg.gan
    channels, size = data.transform.dst_channels, data.transform.size[0]
    output = "tanh" if cfg.data.normalize == "symmetric" else "sigmoid"
    with seeded(cfg.seed):
        generator = Generator(gan_cfg.latent_dim, channels, size, gan_cfg.g_features, output)
        discriminator = Discriminator(channels, size, gan_cfg.d_features)
        apply_init(generator, cfg.model.init)
        apply_init(discriminator, cfg.model.init)
    return generator, discriminator


def make_gan_step(g, d, opt_g, opt_d, rt, cfg, ema=None, schedulers=()):
    """The DCGAN step `step(real, _, micro)` for engine.fit: (1) D learns real -> 1 and detached
    fake -> 0; (2) G learns to make D say 1 on its fakes (the non-saturating loss). Both under
    autocast; fp16 scales each backward and updates the scale once, after both optimizer steps.

    G's backward runs through D with D's parameters frozen and DDP's gradient sync off, so D computes
    no weight gradients there and no D gradients cross the network (only G's do): without this each
    iteration all-reduced D's gradients twice. train.clip_grad_norm clips each network's unscaled
    gradients before its step; `schedulers` (G's and D's) step once per iteration.
    """
    import torch.nn.functional as F
    latent, real_label, clip = cfg.gan.latent_dim, cfg.gan.real_label, cfg.train.clip_grad_norm
    d_params = [p for p in rt.unwrap(d).parameters() if p.requires_grad]
    g_params = [p for p in rt.unwrap(g).parameters() if p.requires_grad]

    def step(real, _, micro):
        b = real.shape[0]
        z = torch.randn(b, latent, 1, 1, device=rt.device)
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
        if clip:
            rt.clip_grad_norm_(opt_d, d_params, clip)
        rt.step(opt_d, update_scale=False)

        with rt.no_sync(d, skip_sync=True), frozen(d_params):
            with rt.autocast():
                d_fake_for_g = d(fake)
                loss_g = F.binary_cross_entropy_with_logits(d_fake_for_g.float(), torch.ones_like(ones))
            opt_g.zero_grad(set_to_none=True)
            rt.backward(loss_g)
        if clip:
            rt.clip_grad_norm_(opt_g, g_params, clip)
        rt.step(opt_g)
        for scheduler in schedulers:
            scheduler.step()
        if ema is not None:
            ema.update(rt.unwrap(g))
        return {"loss_D": loss_d.detach() * b, "loss_G": loss_g.detach() * b,
                "D_x": torch.sigmoid(d_real.detach().float()).sum(),              # D on reals
                "D_G_z1": torch.sigmoid(d_fake.detach().float()).sum(),           # D on fakes, before D's step
                "D_G_z2": torch.sigmoid(d_fake_for_g.detach().float()).sum(),     # D on fakes, after D's step
                "count": b}

    return step


@contextlib.contextmanager
def frozen(params):
    """Parameters that take no gradient inside the block (their requires_grad is put back after)."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def make_ema(gan_cfg, generator: torch.nn.Module):
    """An EMA of the generator's weights with decay gan.ema, or None when gan.ema is null."""
    if gan_cfg.ema is None:
        return None
    from lib.ema import EMA
    return EMA(generator, gan_cfg.ema)


def fixed_noise(gan_cfg, seed: int, device) -> torch.Tensor:
    """The latent vectors of every sample grid: gan.grid of them, drawn from seed + 1."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(gan_cfg.grid, gan_cfg.latent_dim, 1, 1, generator=gen).to(device)


def count(model):
    return sum(p.numel() for p in model.parameters())


def to_unit(x, transform):
    """Model-space images -> [0, 1] (undo the data normalization)."""
    return (x.float() * transform.std + transform.mean).clamp_(0, 1)


def save_grid(images, path, nrow=None, pad=2):
    """images (N, C, H, W) in [0, 1] -> one PNG grid with `pad`-pixel borders, written atomically;
    returns the grid (C, H', W')."""
    from PIL import Image
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, img in enumerate(images.cpu()):
        r, col = divmod(i, nrow)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    array = (canvas * 255).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if c == 1 else array)
    with atomic_file(path) as f:
        image.save(f, format="PNG")
    return canvas


class Grids:
    """samples/step_XXXXXXX.png from the fixed noise, and reals.png once (rank 0 only)."""

    def __init__(self, folder, transform, rt):
        self.folder, self.transform, self.rt = Path(folder), transform, rt
        if rt.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)

    def save_reals(self, loader):
        if not self.rt.is_main or (self.folder / "reals.png").exists():
            return
        loader.set_epoch(0)
        x, _ = next(iter(loader))
        save_grid(to_unit(x[:64], self.transform), self.folder / "reals.png")

    @torch.no_grad()
    def save(self, generator, noise, step):
        """Write samples/step_XXXXXXX.png; returns the grid (rank 0) or None."""
        if not self.rt.is_main:
            return None
        was = generator.training
        generator.eval()
        with self.rt.autocast():
            images = generator(noise)
        generator.train(was)
        return save_grid(to_unit(images, self.transform), self.folder / f"step_{step:07d}.png")


def sample_from_checkpoint(n, ckpt_path, out, seed):
    """`gan_train.py --sample N --from CKPT`: N images (and a grid) from the EMA or the generator."""
    from lib import checkpoint
    from lib.config import GanConfig, from_dict
    from lib.models.dcgan import Generator
    if not n or n < 1 or not ckpt_path:
        raise UserError("give both --sample N (N >= 1) and --from <checkpoint.pt>.")
    ckpt = checkpoint.load_user_file(ckpt_path, "--from", "a checkpoint written by gan_train.py")
    if "generator" not in ckpt or "config" not in ckpt:
        raise UserError(f"{ckpt_path} is not a gan_train.py checkpoint (it has no generator).")
    cfg = from_dict(GanConfig, ckpt["config"], source=str(ckpt_path))
    state = {k: v for k, v in (ckpt.get("ema") or ckpt["generator"]).items() if not k.startswith("_")}
    first = state["net.0.weight"]                     # (latent_dim, width, base, base)
    last = [k for k in state if k.endswith(".weight")][-1]
    channels = state[last].shape[1]
    base, layers = first.shape[2], sum(1 for k in state if k.endswith(".weight") and state[k].dim() == 4)
    size = base * 2 ** (layers - 1)
    generator = Generator(first.shape[0], channels, size, cfg.gan.g_features,
                          "tanh" if cfg.data.normalize == "symmetric" else "sigmoid")
    generator.load_state_dict(state)
    generator.eval()
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in norm_stats(cfg.data.normalize, channels))
    out = Path(out) if out else Path(ckpt_path).resolve().parent.parent / "generated"
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    images = []
    with torch.no_grad():
        for start in range(0, n, 256):
            z = torch.randn(min(256, n - start), first.shape[0], 1, 1, generator=gen)
            images.append((generator(z) * std + mean).clamp(0, 1))
    images = torch.cat(images)
    for i, img in enumerate(images):
        save_grid(img[None], out / f"sample_{i:05d}.png", nrow=1, pad=0)
    save_grid(images[:64], out / "grid.png")
    print(f"wrote {n} images and grid.png to {out} ({'EMA generator' if 'ema' in ckpt else 'generator'}, "
          f"step {ckpt.get('step')})", flush=True)
    return 0
