"""gan_train.py: G/D shapes, a tiny run's files, two processes with a batch-norm D, sampling from a
checkpoint, and the DeepSpeed refusal. (Exact resume after SIGKILL, fixed noise included, is in
tests/test_faults.py.)"""
import pytest
import torch

import helpers
from helpers import ok, script, state_dict, torchrun, user_error
from lib.models.dcgan import Discriminator, Generator, layout

TINY = ["--config", helpers.REPO / "configs/dcgan_digits.yaml", "gan.g_features=8", "gan.d_features=8",
        "gan.latent_dim=16", "data.batch_size=32", "gan.sample_every=5", "gan.grid=16", "train.log_every=2",
        "train.max_steps=10"]
KEYS = {"generator", "discriminator", "optimizer_g", "optimizer_d", "scaler", "ema", "fixed_noise", "epoch",
        "batch", "step", "rng", "config"}


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_and_discriminator_shapes(size, channels):
    g, d = Generator(16, channels, size, 8), Discriminator(channels, size, 8)
    x = g(torch.randn(5, 16, 1, 1))
    assert x.shape == (5, channels, size, size) and x.min() >= -1 and x.max() <= 1
    assert d(x).shape == (5,)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    with pytest.raises(ValueError, match="image side"):
        layout(30)


def _check_run(run, steps):
    for name in ("samples/reals.png", "samples/step_0000005.png", f"samples/step_{steps:07d}.png", "curves.png",
                 "metrics.csv", "metrics.jsonl", "config.yaml", "env.json", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    rows = helpers.read_jsonl(run / "metrics.jsonl")
    assert rows and {"train/loss_D", "train/loss_G", "train/D_x", "train/D_G_z1", "train/D_G_z2", "images_per_s"} <= set(rows[-1])
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss_D", "train/loss_G", "train/D_x", "train/D_G_z1", "train/D_G_z2"} <= set(header)
    ckpt = state_dict(run / "checkpoints/last.pt")
    assert KEYS <= set(ckpt) and ckpt["step"] == steps
    assert ckpt["fixed_noise"].shape == (16, 16, 1, 1)
    assert not (run / "checkpoints/best.pt").exists()
    return ckpt


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("gan")
    return cwd, ok(script("gan_train.py", *TINY, cwd=cwd))


def test_tiny_run_writes_grids_metrics_and_checkpoint(tiny_run):
    cwd, out = tiny_run
    assert "samples in runs/dcgan_digits/samples" in out
    _check_run(cwd / "runs/dcgan_digits", 10)


def _render(ckpt, part, noise):
    """What the grid of `noise` looks like through the checkpoint's generator or EMA (uint8 tiles)."""
    state = {k: v for k, v in ckpt[part].items() if not k.startswith("_")}
    g = Generator(16, 1, 32, 8)
    g.load_state_dict(state)
    with torch.no_grad():
        x = g.eval()(noise)
    return ((x * 0.5 + 0.5).clamp(0, 1) * 255).round().byte()[:, 0]          # (N, 32, 32)


def _tiles(png, n=16, size=32, pad=2):
    import numpy as np
    from PIL import Image
    a = np.asarray(Image.open(png))
    per_row = int(n ** 0.5)
    return torch.from_numpy(np.stack([a[pad + r * (size + pad): pad + r * (size + pad) + size,
                                        pad + c * (size + pad): pad + c * (size + pad) + size]
                                      for r in range(per_row) for c in range(per_row)]))


def test_grids_use_the_checkpointed_noise_and_the_ema(tiny_run, tmp_path):
    """Resume from a checkpoint whose fixed noise was replaced: the next grid is drawn from that noise
    (the checkpoint's, not a fresh draw), through the EMA of G (not G itself)."""
    import shutil
    from lib import checkpoint
    cwd, _ = tiny_run
    shutil.copytree(cwd / "runs", tmp_path / "runs")
    ckpt_path = tmp_path / "runs/dcgan_digits/checkpoints/step_00000010.pt"
    ckpt = state_dict(ckpt_path)
    ckpt["fixed_noise"] = torch.randn(16, 16, 1, 1, generator=torch.Generator().manual_seed(123))
    checkpoint.atomic_save(ckpt, ckpt_path, commit=True)
    ok(script("gan_train.py", *TINY[:-1], "train.max_steps=11", cwd=tmp_path))
    final = state_dict(tmp_path / "runs/dcgan_digits/checkpoints/last.pt")
    assert torch.equal(final["fixed_noise"], ckpt["fixed_noise"])
    grid = _tiles(tmp_path / "runs/dcgan_digits/samples/step_0000011.png")
    assert torch.equal(grid, _render(final, "ema", final["fixed_noise"]))
    assert not torch.equal(grid, _render(final, "generator", final["fixed_noise"]))


def test_mixed_precision_fp16_and_accelerate_launch_bf16(tmp_path):
    """fp16: one GradScaler for both optimizers (scale updated once per iteration); bf16 under
    accelerate launch as one 2-process DDP job with the batch-norm D."""
    out = ok(script("gan_train.py", *TINY, "train.precision=fp16", "name=fp16", cwd=tmp_path))
    assert "precision fp16" in out
    ckpt = _check_run(tmp_path / "runs/fp16", 10)
    assert ckpt["scaler"]["scale"] > 0 and ckpt["scaler"]["_growth_tracker"] >= 0
    cmd = [helpers.PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(helpers.REPO / "gan_train.py"), *map(str, TINY),
           "train.precision=bf16", "name=bf16"]
    out = ok(helpers.run(cmd, tmp_path))
    assert "DDP, 2 process(es)" in out and "launcher accelerate launch" in out and "precision bf16" in out
    rows = helpers.read_jsonl(tmp_path / "runs/bf16/metrics.jsonl")
    assert all(all(v == v and abs(v) < 1e6 for k, v in r.items() if k.startswith("train/")) for r in rows)
    assert _check_run(tmp_path / "runs/bf16", 10)["world_size"] == 2


def test_two_processes_with_a_batch_norm_discriminator(tmp_path):
    out = ok(torchrun("gan_train.py", *TINY, cwd=tmp_path))
    assert "DDP, 2 process(es)" in out
    ckpt = _check_run(tmp_path / "runs/dcgan_digits", 10)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


def test_sample_n_images_from_a_checkpoint(tiny_run):
    tmp_path, _ = tiny_run
    out = ok(script("gan_train.py", "--sample", "7", "--from", "runs/dcgan_digits/checkpoints/last.pt",
                    "--out", "gen", cwd=tmp_path))
    assert "wrote 7 images" in out and "EMA generator" in out
    assert len(list((tmp_path / "gen").glob("sample_*.png"))) == 7 and (tmp_path / "gen/grid.png").exists()
    from PIL import Image
    assert Image.open(tmp_path / "gen/sample_00000.png").size == (32, 32)
    msg = user_error(script("gan_train.py", "--sample", "3", "--from", "nothing.pt", cwd=tmp_path))
    assert "no such file" in msg


def test_deepspeed_and_bad_options_are_refused(tmp_path):
    msg = user_error(script("gan_train.py", *TINY, "dist.deepspeed=configs/deepspeed/zero2.json", cwd=tmp_path))
    assert "does not run under DeepSpeed" in msg
    msg = user_error(script("gan_train.py", *TINY, "data.normalize=dataset", cwd=tmp_path))
    assert "tanh" in msg
    assert not (tmp_path / "runs").exists()
