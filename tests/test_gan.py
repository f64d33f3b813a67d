"""gan_train.py: G/D shapes, a tiny run's files, two processes with a batch-norm D, sampling from a
checkpoint, the step's traffic under DDP, schedules and clipping, and the DeepSpeed refusal. (Exact
resume after SIGKILL, fixed noise included, is in tests/test_faults.py.)"""
import math

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
    logged = {"train/loss_D", "train/loss_G", "train/D_x", "train/D_G_z1", "train/D_G_z2", "images_per_s"}
    assert rows and logged <= set(rows[-1])
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


def test_ema_follows_its_recurrence(tmp_path):
    """The generator's EMA after step k is lerp(EMA after k-1, G after k, 1 - d_k) with the warm-up
    decay d_k = min(gan.ema, (1 + k) / (10 + k)), read from the checkpoints of steps 1, 2 and 3."""
    ok(script("gan_train.py", *TINY[:-1], "train.max_steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=5",
              "gan.ema=0.9", "log.plots=false", cwd=tmp_path))
    ckpts = [state_dict(tmp_path / f"runs/dcgan_digits/checkpoints/step_{k:08d}.pt") for k in (1, 2, 3)]
    for k in (2, 3):
        before, now = ckpts[k - 2]["ema"], ckpts[k - 1]
        assert int(now["ema"]["_ema_updates"]) == k
        decay = min(0.9, (1 + k) / (10 + k))
        params = dict(Generator(16, 1, 32, 8).named_parameters())
        for name in params:
            expected = torch.lerp(before[name], now["generator"][name], 1 - decay)
            assert torch.allclose(now["ema"][name], expected, atol=1e-6), (k, name)
            assert not torch.equal(now["ema"][name], now["generator"][name])   # an average, not a copy
            assert not torch.equal(now["ema"][name], before[name])              # it moved
        buffers = [n for n, _ in Generator(16, 1, 32, 8).named_buffers()]      # batch-norm statistics
        assert buffers and all(torch.equal(now["ema"][n], now["generator"][n]) for n in buffers)   # copied


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """TINY under torchrun, 2 processes, fp32 (the batch-norm D under DDP)."""
    cwd = tmp_path_factory.mktemp("gan2")
    return cwd, ok(torchrun("gan_train.py", *TINY, cwd=cwd))


def _moved(a, b):
    """Largest weight difference between two checkpoints' generators."""
    return max(float((a["generator"][k].float() - b["generator"][k].float()).abs().max()) for k in a["generator"])


def test_mixed_precision_fp16_and_accelerate_launch_bf16(tiny_run, two_process_run, tmp_path):
    """fp16: one GradScaler for both optimizers (scale updated once per iteration, its tracker counts
    every iteration); bf16 under accelerate launch as one 2-process DDP job with the batch-norm D.
    Both really compute in low precision: G ends near, but not at, the fp32 run's weights."""
    out = ok(script("gan_train.py", *TINY, "train.precision=fp16", "name=fp16", cwd=tmp_path))
    assert "precision fp16" in out
    ckpt = _check_run(tmp_path / "runs/fp16", 10)
    scaler = ckpt["scaler"]                       # an overflow halves the scale and restarts the tracker
    assert scaler["scale"] in (65536.0, 32768.0) and 1 <= scaler["_growth_tracker"] <= 10, scaler   # one per iteration
    fp32 = state_dict(tiny_run[0] / "runs/dcgan_digits/checkpoints/last.pt")
    assert 1e-5 < _moved(ckpt, fp32) < 0.05, _moved(ckpt, fp32)
    cmd = [helpers.PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(helpers.REPO / "gan_train.py"),
           *map(str, TINY),
           "train.precision=bf16", "name=bf16"]
    out = ok(helpers.run(cmd, tmp_path))
    assert "DDP, 2 process(es)" in out and "launcher accelerate launch" in out and "precision bf16" in out
    bf16 = _check_run(tmp_path / "runs/bf16", 10)
    assert bf16["world_size"] == 2 and bf16["scaler"] == {}
    fp32_two = state_dict(two_process_run[0] / "runs/dcgan_digits/checkpoints/last.pt")
    assert 1e-5 < _moved(bf16, fp32_two) < 0.05, _moved(bf16, fp32_two)


def test_two_processes_with_a_batch_norm_discriminator(two_process_run):
    cwd, out = two_process_run
    assert "DDP, 2 process(es)" in out
    ckpt = _check_run(cwd / "runs/dcgan_digits", 10)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


def test_d_gradients_cross_the_network_once_per_step(tmp_path):
    """Issue #15 item 7: G's backward runs through D with D frozen and DDP's sync off, so D's gradients
    are all-reduced once per step (its own), not twice, and D's gradients stay equal on every rank."""
    out = ok(torchrun("tests/gan_probe.py", cwd=tmp_path))
    for rank in (0, 1):
        line = next(s for s in out.splitlines() if s.startswith(f"rank {rank}/2:"))
        assert "D sent 3 all-reduces" in line and "1 x its gradients per step" in line, line
        assert "G sent 3 " in line and "weights agree: True; D gradients agree: True" in line, line


def test_schedule_and_gradient_clipping_apply_to_both_networks(tmp_path):
    """sched and train.clip_grad_norm are not ignored: both optimizers follow the cosine schedule (saved
    and restored with the run), and with a clip of 1e-8 and plain SGD each step moves each network's
    parameters by lr x 1e-8 at most."""
    keys = ["optim.name=sgd", "optim.lr=0.1", "optim.momentum=0", "sched.name=cosine", "train.clip_grad_norm=1e-8",
            "checkpoint.every_steps=1", "checkpoint.keep_last=5", "log.plots=false", "log.tensorboard.enabled=true"]
    ok(script("gan_train.py", *TINY[:-1], "train.max_steps=4", *keys, cwd=tmp_path))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "runs/dcgan_digits/tensorboard"), size_guidance={"images": 0})
    events.Reload()                                # the sample grids reach TensorBoard too (issue #17)
    assert [e.step for e in events.Images("samples")] == [4] and "train/loss_D" in events.Tags()["scalars"]
    ckpts = [state_dict(tmp_path / f"runs/dcgan_digits/checkpoints/step_{k:08d}.pt") for k in (1, 2)]
    for opt in ("optimizer_g", "optimizer_d"):
        lrs = [c[opt]["param_groups"][0]["lr"] for c in ckpts]
        assert lrs == pytest.approx([0.1 * (1 + math.cos(math.pi * k / 4)) / 2 for k in (1, 2)]), lrs
    assert ckpts[1]["scheduler_g"]["last_epoch"] == ckpts[1]["scheduler_d"]["last_epoch"] == 2
    for net, model in (("generator", Generator(16, 1, 32, 8)), ("discriminator", Discriminator(1, 32, 8))):
        moved = torch.cat([(ckpts[1][net][n] - ckpts[0][net][n]).flatten() for n, _ in model.named_parameters()])
        assert 0 < float(moved.norm()) <= 0.1 * 1e-8 * 1.01, (net, float(moved.norm()))


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
