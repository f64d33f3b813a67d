"""train.py as a user runs it: the default run's promise, the run directory, resume, precision,
accumulation, clipping order, evaluation-only mode."""
import json
import time

import pytest
import torch
import yaml

import helpers
from helpers import ok, script, state_dict, user_error

CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "scaler", "epoch", "batch", "step", "best", "best_epoch",
                   "rng", "config", "world_size", "format", "saved_at", "metrics"}
TINY = ["model.name=mlp", "model.hidden=[64]", "data.batch_size=128", "sched.name=none", "log.plots=false"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python train.py` with no arguments, exactly as the README's first command runs it."""
    cwd = tmp_path_factory.mktemp("default")
    t = time.perf_counter()
    out = ok(script("train.py", cwd=cwd, timeout=240))
    return cwd, out, time.perf_counter() - t


def test_default_run_reaches_95_percent_in_under_two_minutes(default_run):
    cwd, out, seconds = default_run
    metrics = helpers.final_metrics(out)
    assert metrics["val/acc"] >= 0.95, out[-2000:]
    assert seconds < 120, f"took {seconds:.0f}s"


def test_default_run_leaves_the_documented_run_directory(default_run):
    cwd, out, _ = default_run
    run = cwd / "runs" / "default"
    for name in ("config.yaml", "env.json", "metrics.csv", "metrics.jsonl", "curves.png", "confusion.png",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert len(list((run / "checkpoints").glob("step_*.pt"))) == 3           # keep_last
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 1 and env["torch"] == torch.__version__ and "git_commit" in env
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,lr,") and len(rows) == 1 + 8
    assert len(helpers.read_jsonl(run / "metrics.jsonl")) >= 1
    ckpt = state_dict(run / "checkpoints" / "last.pt")                      # weights_only=True
    assert CHECKPOINT_KEYS <= set(ckpt) and ckpt["epoch"] == 8 and ckpt["batch"] == 0
    assert ckpt["config"] == yaml.safe_load((run / "config.yaml").read_text())
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    best = state_dict(run / "checkpoints" / "best.pt")
    assert best["best"] == pytest.approx(max(float(r.split(",")[rows[0].split(",").index("val/acc")]) for r in rows[1:]), abs=1e-6)


def test_a_different_config_is_refused_then_kept_aside_with_force(tmp_path):
    TINY = globals()["TINY"] + ["train.max_steps=1"]
    ok(script("train.py", *TINY, "name=r", "train.epochs=1", cwd=tmp_path))
    before = (tmp_path / "runs/r/checkpoints/last.pt").read_bytes()
    msg = user_error(script("train.py", *TINY, "name=r", "train.epochs=1", "optim.lr=0.01", cwd=tmp_path))
    assert "holds a run with a different config (optim.lr: 0.002 -> 0.01)" in msg and "--force" in msg
    assert (tmp_path / "runs/r/checkpoints/last.pt").read_bytes() == before
    ok(script("train.py", *TINY, "name=r", "train.epochs=1", "optim.lr=0.01", "--force", cwd=tmp_path))
    kept = list((tmp_path / "runs").glob("r.old-*"))
    assert len(kept) == 1 and (kept[0] / "checkpoints/last.pt").read_bytes() == before
    msg = user_error(script("train.py", *TINY, "name=r", "train.epochs=1", "optim.lr=0.01",
                            "checkpoint.resume=never", cwd=tmp_path))
    assert "already holds checkpoints and checkpoint.resume=never" in msg


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tmp_path, precision):
    out = ok(script("train.py", *TINY, f"train.precision={precision}", "train.epochs=1", "train.clip_grad_norm=5",
                    cwd=tmp_path))
    assert f"precision {precision}" in out
    scaler = state_dict(tmp_path / "runs/default/checkpoints/last.pt")["scaler"]
    if precision == "fp16":
        assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    else:
        assert scaler == {}


def test_eval_only_evaluates_the_checkpoint_and_writes_nothing(tmp_path):
    ok(script("train.py", *TINY, "train.epochs=1", "train.max_steps=4", cwd=tmp_path))
    files = sorted(p.name for p in (tmp_path / "runs/default").rglob("*"))
    out = ok(script("train.py", *TINY, "train.epochs=1", "train.max_steps=4", "--eval-only", cwd=tmp_path))
    metrics = json.loads(out.split("eval: ")[1].splitlines()[0])
    trained = state_dict(tmp_path / "runs/default/checkpoints/last.pt")["metrics"]
    assert metrics["val/samples"] == 359 and metrics["val/acc"] == pytest.approx(trained["val/acc"])
    assert sorted(p.name for p in (tmp_path / "runs/default").rglob("*")) == files


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    """batch B x accumulate 2 == batch 2B: the accumulated gradient is the mean over 2B samples."""
    common = ["model.name=lenet", "data.shuffle=false", "train.epochs=1", "optim.name=sgd", "optim.lr=0.5",
              "data.image_size=28", "sched.name=none", "train.max_steps=8", "log.plots=false"]
    ok(script("train.py", *common, "name=big", "data.batch_size=64", cwd=tmp_path))
    ok(script("train.py", *common, "name=acc", "data.batch_size=32", "train.grad_accum=2", cwd=tmp_path))
    big = state_dict(tmp_path / "runs/big/checkpoints/last.pt")
    acc = state_dict(tmp_path / "runs/acc/checkpoints/last.pt")
    assert big["step"] == acc["step"] == 8
    for k in big["model"]:
        assert torch.allclose(big["model"][k], acc["model"][k], atol=1e-5), k


def test_clipping_sees_unscaled_gradients_under_fp16():
    """rt.clip_grad_norm_ unscales first: the norm it reports equals the fp32 gradient norm."""
    from lib import config, runtime
    cfg = config.load(config.Config, None, ["train.precision=fp16"])
    rt = runtime.setup(cfg)
    try:
        assert rt.scaler.is_enabled() and rt.scaler.get_scale() == 65536.0
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 4)
        x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ref = torch.nn.utils.get_total_norm(torch.autograd.grad(
            torch.nn.functional.cross_entropy(model(x), y), list(model.parameters())))
        with rt.autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        rt.backward(loss)
        scaled = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        assert scaled > 1000 * ref                      # the raw grads are scaled by 65536
        norm = rt.clip_grad_norm_(opt, list(model.parameters()), max_norm=0.01)
        assert torch.allclose(norm, ref, rtol=1e-2)          # the norm before clipping, unscaled
        assert torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) <= 0.0101
        rt.step(opt)
    finally:
        rt.shutdown()


def test_lbfgs_trains_with_its_closure(tmp_path):
    out = ok(script("train.py", *TINY, "optim.name=lbfgs", "optim.lr=0.5", "optim.max_iter=4", "train.epochs=2",
                    cwd=tmp_path))
    assert helpers.final_metrics(out)["val/acc"] > 0.8


def test_lstm_regression(tmp_path):
    out = ok(script("train.py", "--config", helpers.REPO / "configs/lstm_sine.yaml", "train.epochs=3",
                    "data.num_samples=1024", cwd=tmp_path))
    m = helpers.final_metrics(out)
    assert m["val/mse"] < 0.05 and "val/acc" not in m


def test_wandb_offline_needs_no_network_or_account(tmp_path):
    args = ["train.py", *TINY, "train.max_steps=3", "train.epochs=1", "log.wandb.enabled=true"]
    first = script(*args, cwd=tmp_path, WANDB_MODE="offline", WANDB_API_KEY="secret-key-123")
    ok(first)
    assert "secret-key-123" not in first.stdout + first.stderr                # never printed
    run = tmp_path / "runs/default"
    run_id = (run / "wandb_id.txt").read_text().strip()
    assert list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    ok(script(*args[:-2], "train.epochs=2", "train.max_steps=6", "log.wandb.enabled=true", cwd=tmp_path,
              WANDB_MODE="offline"))
    assert (run / "wandb_id.txt").read_text().strip() == run_id          # the resumed run continues it
    stored = [p for p in run.rglob("*") if p.is_file()]                 # config, env, checkpoints, wandb/
    assert any(p.suffix == ".wandb" for p in stored)
    for f in stored:
        assert b"secret-key-123" not in f.read_bytes(), f


def test_compile_and_channels_last_train_and_save_plain_keys(tmp_path):
    """train.compile (the eager backend: dynamo traces the model without inductor's 35 s of C++
    compilation) + channels_last train end to end; the checkpoint holds the raw module's keys and
    an uncompiled, contiguous model evaluates it to the same accuracy."""
    fast = ["train.compile=true", "train.compile_backend=eager", "train.channels_last=true", "train.max_steps=4",
            "log.plots=false"]
    ok(script("train.py", *fast, cwd=tmp_path))
    ckpt = state_dict(tmp_path / "runs/default/checkpoints/last.pt")
    from lib import config, models
    plain = models.build_model(config.load(config.Config, helpers.REPO / "configs/default.yaml", []).model,
                               num_classes=10, in_channels=1, image_size=28)
    assert list(ckpt["model"]) == list(plain.state_dict()) and ckpt["step"] == 4
    out = ok(script("train.py", "log.plots=false", "--eval-only", cwd=tmp_path))
    evaluated = json.loads(out.split("eval: ")[1].splitlines()[0])
    assert evaluated["val/acc"] == ckpt["metrics"]["val/acc"]


def test_compiled_and_ddp_wrapped_models_save_plain_keys():
    """train.compile wraps the model in torch.compile (and DDP under several processes); checkpoints
    hold the raw module's keys, so they load into an uncompiled model (compilation itself: 35 s on
    this CPU, measured by hand and recorded in BENCHMARKS.md, not repeated here)."""
    from lib import config, runtime
    rt = runtime.setup(config.load(config.Config, None, []))
    try:
        raw = torch.nn.Sequential(torch.nn.Linear(4, 3))
        wrapped, _ = rt.prepare(raw, compile=True)
        assert wrapped is not raw and hasattr(wrapped, "_orig_mod")
        assert rt.unwrap(wrapped) is raw and list(rt.unwrap(wrapped).state_dict()) == ["0.weight", "0.bias"]
        from lib.models import state_dict_of
        assert list(state_dict_of({"model": {"module._orig_mod.0.weight": torch.zeros(1)}})) == ["0.weight"]
    finally:
        rt.shutdown()
