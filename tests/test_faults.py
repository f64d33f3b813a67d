"""Faults, provoked for real: SIGKILL mid-epoch then exact resume (train / finetune / gan, 1 and 2
processes), torchrun --max-restarts after a killed worker, damaged and uncommitted checkpoints, a
full disk, non-finite losses, one rank failing, malicious checkpoints, and a fuzz of bad configs
and bad data files (exit 2, one line, no traceback, nothing written)."""
import os
import re
import resource
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

import helpers
from helpers import PY, REPO, ok, read_jsonl, script, state_dict, torchrun

QUIET = ["log.plots=false", "log.progress=false"]
# Every augmentation on (issue 17), on the memory path: per-image RandomResizedCrop + TrivialAugmentWide,
# random erasing, mixup / cutmix.
AUGMENT = ["data.train_crop=28", "data.eval_resize=32", "data.auto_augment=trivialaugment", "data.random_erasing=0.25",
           "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0"]
TRAIN = [*AUGMENT, "model.name=mlp", "model.hidden=[64]", "model.dropout=0.2", "model.init={name: default}",
         "data.batch_size=64",
         "train.epochs=2", "train.ema=0.99", "train.log_every=1", "checkpoint.every_steps=4", "name=run", *QUIET]
GAN = ["--config", REPO / "configs/dcgan_digits.yaml", "gan.g_features=8", "gan.d_features=8", "gan.latent_dim=16",
       "data.batch_size=64", "gan.sample_every=100", "gan.grid=16", "gan.ema=0.9", "train.log_every=1",
       "train.epochs=1", "checkpoint.every_steps=4", "name=run", *QUIET]
FINETUNE = ["model.name=mlp", "model.hidden=[64]", "model.dropout=0.2", "data.classes=[5, 6, 7, 8, 9]",
            "finetune.freeze=backbone",
            "finetune.weights={source}", "data.batch_size=32", "train.epochs=2", "train.log_every=1",
            "checkpoint.every_steps=4", "name=run", *QUIET]
CASES = {"train.py": TRAIN, "gan_train.py": GAN, "finetune.py": FINETUNE}


def _launch(script_name, launcher):
    prefix = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--monitor-interval=0.5"] \
        if launcher == "torchrun" else [PY]
    return prefix + [REPO / script_name]


def _losses(run_dir):
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return [(r["step"], {k: v for k, v in r.items() if k.startswith("train/")}) for r in rows]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder holding the fine-tuning source weights (a train.py checkpoint on digits 0-4)."""
    root = tmp_path_factory.mktemp("faults")
    ok(script("train.py", "model.name=mlp", "model.hidden=[64]", "data.classes=[0, 1, 2, 3, 4]", "train.epochs=1",
              "name=source", *QUIET, cwd=root))
    (root / "source.pt").write_bytes((root / "runs/source/checkpoints/last.pt").read_bytes())
    return root


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
@pytest.mark.parametrize("script_name", list(CASES))
def test_sigkill_mid_epoch_then_resume_is_bit_exact(work, script_name, launcher):
    args = [str(a).replace("{source}", str(work / "source.pt")) for a in CASES[script_name]]
    base = work / f"{script_name[:-3]}_{launcher}"
    ref_dir, cut_dir = base / "reference", base / "interrupted"
    for d in (ref_dir, cut_dir):
        d.mkdir(parents=True)
    cmd = _launch(script_name, launcher) + args
    ref = helpers.start(cmd, ref_dir)
    assert ref.wait(timeout=300) == 0, ref.stdout.read()[-3000:]
    cut = helpers.start(cmd, cut_dir, TRAIN_FAULT_PAUSE_AT_STEP=7)   # every rank holds after step 7 ...
    helpers.wait_for_step(cut_dir / "runs/run", 7, cut)            # past the step-4 checkpoint, mid-epoch
    helpers.kill_tree(cut)                                          # ... and is killed there
    killed_at = read_jsonl(cut_dir / "runs/run/metrics.jsonl")[-1]["step"]
    assert killed_at == 7
    again = helpers.start(cmd, cut_dir)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out[-3000:]
    resumed = int(re.search(r"resumed from \S+ at epoch \d+, (?:batch \d+, )?step (\d+)", out).group(1))
    assert resumed == 4                                      # the newest committed checkpoint
    a = state_dict(ref_dir / "runs/run/checkpoints/last.pt")
    b = state_dict(cut_dir / "runs/run/checkpoints/last.pt")
    parts = [k for k in ("model", "generator", "discriminator", "ema") if k in a]
    for part in parts:                                       # weights: bit for bit
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k}"
    if "fixed_noise" in a:
        assert torch.equal(a["fixed_noise"], b["fixed_noise"])
    assert _losses(ref_dir / "runs/run") == _losses(cut_dir / "runs/run")   # every step's losses
    tables = [_epoch_rows(d / "runs/run/metrics.csv") for d in (ref_dir, cut_dir)]
    assert tables[0] == tables[1]              # one row per epoch, none lost or doubled, the same metrics
    assert [r["epoch"] for r in tables[0]] == [str(e + 1) for e in range(len(tables[0]))]


def _epoch_rows(path):
    """metrics.csv as dicts, without the wall-clock columns."""
    import csv
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in ("time_s", "images_per_s", "epoch_time_s")}
                for row in csv.DictReader(f)]


def test_torchrun_max_restarts_recovers_a_killed_worker(work):
    cwd = work / "restarts"
    cwd.mkdir()
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--monitor-interval=0.5",
           "--max-restarts=1", REPO / "train.py", *TRAIN]
    proc = helpers.start(cmd, cwd, TRAIN_FAULT_PAUSE_AT_STEP=6)     # the first attempt holds after step 6
    helpers.wait_for_step(cwd / "runs/run", 6, proc)
    workers = psutil.Process(proc.pid).children(recursive=True)
    victim = [w for w in workers if "train.py" in " ".join(w.cmdline())][-1]
    victim.kill()                                            # kill -9 one rank
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"resumed from \S+step_00000004.pt at epoch 1, batch 4, step 4", out), out[-3000:]
    final = state_dict(cwd / "runs/run/checkpoints/last.pt")
    assert final["step"] == 2 * (1438 // 2 // 64 + 1) and final["world_size"] == 2
    reference = work / "train_torchrun/reference"            # written by the SIGKILL test; else made here
    if not (reference / "runs/run/checkpoints/last.pt").exists():
        reference.mkdir(parents=True, exist_ok=True)
        ok(torchrun("train.py", *TRAIN, cwd=reference))
    for k, v in state_dict(reference / "runs/run/checkpoints/last.pt")["model"].items():
        assert torch.equal(v, final["model"][k]), k


@pytest.fixture
def trained(tmp_path):
    ok(script("train.py", *TRAIN, "train.epochs=1", cwd=tmp_path))
    return tmp_path, tmp_path / "runs/run/checkpoints"


def test_damaged_or_uncommitted_newest_checkpoint_falls_back_with_a_warning(trained):
    cwd, ckpts = trained
    newest = max(ckpts.glob("step_*.pt"))
    older = sorted(ckpts.glob("step_*.pt"))[-2]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF                             # one flipped byte: torch.load alone misses it
    newest.write_bytes(data)
    (ckpts / "step_99999999.pt").write_bytes(b"half a checkpoint")   # a save cut short: no .sha256
    out = ok(script("train.py", *TRAIN, cwd=cwd))
    name = newest.relative_to(cwd)
    assert f"warning: skipping damaged checkpoint: {name} is damaged (its SHA-256 does not match" in out
    assert "step_99999999.pt was never committed" in out
    assert f"resumed from {older.relative_to(cwd)}" in out


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(trained):
    cwd, ckpts = trained
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}

    def small_files():                                       # any file over 1 MB fails like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    model = ["model.hidden=[2048]"]                           # checkpoints of ~20 MB
    ok(script("train.py", *TRAIN, "train.epochs=1", "name=big", *model, cwd=cwd))
    big = cwd / "runs/big/checkpoints"
    before = {p.name: p.read_bytes() for p in big.iterdir()}
    p = subprocess.run([PY, REPO / "train.py", *TRAIN, "name=big", *model], cwd=cwd, env=helpers.env(),
                       capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert "stopped: could not write checkpoint" in p.stderr and "the disk is full" in p.stderr
    assert "the previous checkpoint is intact" in p.stderr
    after = {q.name: q.read_bytes() for q in big.iterdir()}
    assert after == before                                   # nothing lost, no temporary files left


def test_atomic_writes_keep_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    """A checkpoint or text file being replaced survives a write that fails half-way (a full disk
    while torch.save writes, an I/O error at fsync): the old bytes stay, no temporary file is left."""
    import errno
    from lib import checkpoint, io
    ckpt, text = tmp_path / "last.pt", tmp_path / "config.yaml"
    checkpoint.atomic_save({"step": 1, "w": torch.ones(4)}, ckpt, commit=True)
    io.write_text(text, "old: 1\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_save = torch.save

    def half_written(obj, f):                                  # the disk fills up half-way through
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError):
        checkpoint.atomic_save({"step": 2, "w": torch.zeros(1000)}, ckpt, commit=True)
    monkeypatch.undo()

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        checkpoint.atomic_save({"step": 3, "w": torch.zeros(1000)}, ckpt, commit=True)
    with pytest.raises(OSError):
        io.write_text(text, "new: 2\n")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert checkpoint.load(ckpt)["step"] == 1 and text.read_text() == "old: 1\n"


def test_stop_signals_set_a_flag_that_every_check_sees():
    """SIGUSR1 / SIGTERM only set the stop flag (no I/O in the handler); should_stop() then says stop,
    a repeated signal is the same request, and shutdown() puts the previous handlers back."""
    from lib import config, runtime
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    rt = runtime.setup(config.load(config.Config, None, []))
    try:
        assert rt.stop_signal is None and not rt.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)                                       # delivered at the next bytecode boundary
        assert rt.stop_signal == "SIGUSR1" and rt.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)                   # a cluster asks again: still the first request
        time.sleep(0.01)
        assert rt.stop_signal == "SIGUSR1" and rt.should_stop()
    finally:
        rt.shutdown()
    assert {s: signal.getsignal(s) for s in before} == before


def test_nonfinite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    diverge = ["optim.name=sgd", "optim.lr=1.0e+6"]
    r = script("train.py", *TRAIN, *diverge, "checkpoint.every_steps=1", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    bad = int(re.search(r"the loss became NaN or infinite at optimizer step (\d+)", r.stderr).group(1))
    assert "nothing was saved after it" in r.stderr
    last = state_dict(tmp_path / "runs/run/checkpoints/last.pt")
    assert last["step"] < bad and all(torch.isfinite(v).all() for v in last["model"].values())
    ok(script("train.py", *TRAIN, *diverge, "train.on_nonfinite=skip", "name=skip", cwd=tmp_path))
    rows = (tmp_path / "runs/skip/metrics.csv").read_text().splitlines()
    skipped = int(float(rows[-1].split(",")[rows[0].split(",").index("train/skipped_steps")]))
    assert skipped > 0
    final = state_dict(tmp_path / "runs/skip/checkpoints/last.pt")
    assert all(torch.isfinite(v).all() for v in final["model"].values())


def test_one_failing_rank_ends_the_job_with_its_own_error(tmp_path):
    root = helpers.write_image_folder(tmp_path / "imgs", n=96, size=8, split=False)
    from lib import config
    from lib.data import DATASETS
    cfg = config.load(config.Config, None, ["data.name=image_folder", f"data.images={root}", "data.image_size=8"])
    spec = DATASETS.get("image_folder")(cfg.data, None)
    victim = Path(spec.train.files[9])                       # odd index: rank 1 of 2 reads it (no shuffle)
    victim.write_bytes(b"not a png")
    t = time.perf_counter()
    r = torchrun("train.py", "data.name=image_folder", f"data.images={root}", "data.image_size=8",
                 "data.loader=dataloader", "data.num_workers=0", "data.shuffle=false", "data.batch_size=4",
                 "model.name=mlp", "dist.timeout_s=20", "train.epochs=3", *QUIET, cwd=tmp_path, timeout=200)
    elapsed = time.perf_counter() - t
    assert r.returncode != 0 and elapsed < 90, elapsed
    output = r.stdout + r.stderr
    assert f"[rank 1] error: could not read image {victim}" in output
    assert "Watchdog" not in output and "Traceback" not in output.split("[rank 1] error")[0]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_checkpoints_are_refused_without_running_code(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Evil()}, tmp_path / "evil.pt")
    for arg in ("model.weights=evil.pt", "checkpoint.resume=evil.pt"):
        msg = helpers.user_error(script("train.py", arg, *QUIET, cwd=tmp_path))
        assert "evil.pt is damaged or not a checkpoint of this package" in msg
    msg = helpers.user_error(script("finetune.py", "finetune.weights=evil.pt", "model.name=mlp", *QUIET, cwd=tmp_path))
    assert "damaged or not a checkpoint" in msg
    assert not (tmp_path / "PWNED").exists()


def test_no_unsafe_loading_in_the_code_base():
    patterns = [r"weights_only\s*=\s*False", r"yaml\.load\(", r"yaml\.unsafe_load", r"(?<![\w.])exec\(",
                r"(?<![\w.])eval\(", r"pickle\.loads?\(", r"torch\.load\((?![^)]*weights_only=True)"]
    offenders = []
    for path in list(REPO.glob("*.py")) + list((REPO / "lib").rglob("*.py")):
        text = path.read_text()
        offenders += [f"{path.name}: {p}" for p in patterns if re.search(p, text)]
    assert offenders == []


# ---------------------------------------------------------------------------------------------
# Fuzz: bad configs and bad data files through the real command line, in this process
# ---------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    "optim.lrr=0.1", "optimizer.lr=0.1", "train.epoch=3", "train.epochs=ten", "train.epochs=-1",
    "train.precision=fp8", "train.grad_accum=0", "data.batch_size=0", "data.batch_size=1.5", "data.name=imagenet",
    "data.image_size=2", "data.channels=2", "data.classes=3", "data.classes=[1, 1]", "data.val_fraction=1.5",
    "data.augment=heavy", "data.loader=fast", "model.name=resnet19", "model.hidden=wide", "model.init={name: kaiming}",
    "model.init={name: eye, conv: {name: dirac}, gain: 2}", "loss.name=triplet_margin", "loss.name=crossentropy",
    "loss.reduction=sum", "optim.name=adamm", "optim.lr=0", "optim.momentum=0.9",
    "optim.param_groups=[{lr: 0.1}]", "sched.name=cosin", "sched.warmup_epochs=-1", "sched.step_size=oops",
    "checkpoint.keep_last=0", "checkpoint.monitor=val/f1", "checkpoint.resume=nowhere.pt", "dist.gpus=x",
    "dist.timeout_s=0", "name=../escape", "log.wandb.mode=cloud", "data.name=csv", "train.clip_grad_norm=-1",
    "=5", "justaword",
]


@pytest.mark.parametrize("override", BAD_CONFIGS)
def test_fuzz_bad_configs(tmp_path, override):
    code, out, err = helpers.in_process("train.py", [override, *QUIET], tmp_path)
    lines = [s for s in err.strip().splitlines() if s.strip()]
    assert code == 2, (override, out[-500:], err[-1500:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err + out, err
    assert list(tmp_path.iterdir()) == [], "something was written"


BAD_YAML = {
    "syntax": "optim: {lr: [1, 2\n", "list": "- a\n- b\n", "scalar": "just text\n",
    "python_tag": "!!python/object/apply:os.system ['touch PWNED']\n", "section_not_mapping": "optim: 5\n",
    "float_epochs": "train: {epochs: 1.5}\n", "tab_indent": "optim:\n\tlr: 0.1\n",
    "null_batch": "data: {batch_size: }\n", "unknown_section": "optimiser: {lr: 0.1}\n", "binary": "\x00\x01\xff\xfe",
    "nested_typo": "model: {init: {nme: x}}\n",
}


@pytest.mark.parametrize("name", list(BAD_YAML) + ["missing_file"])
def test_fuzz_bad_config_files(tmp_path, name):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cwd").mkdir()
    path = tmp_path / "cfg" / f"{name}.yaml"
    if name != "missing_file":
        path.write_bytes(BAD_YAML[name].encode("latin-1"))
    code, out, err = helpers.in_process("train.py", ["--config", path, *QUIET], tmp_path / "cwd")
    lines = [s for s in err.strip().splitlines() if s.strip()]
    assert code == 2, (name, out[-500:], err[-1500:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err + out, err
    assert str(path) in lines[0] or name in ("float_epochs", "null_batch"), lines[0]   # names the file
    assert list((tmp_path / "cwd").iterdir()) == [] and not Path("PWNED").exists()


def _bad_data_files(root):
    """(name, overrides) of malformed data files in their real formats."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cases = []
    good = helpers.write_pixel_csv(root / "good.csv", n=30)
    lines = good.read_text().splitlines()
    for name, text in {
        "short_row.csv": "\n".join(lines[:5] + [lines[5].rsplit(",", 3)[0]] + lines[6:]),
        "text_cell.csv": "\n".join(lines[:3] + ["7," + ",".join(["x"] * 784)] + lines[4:]),
        "negative_label.csv": "\n".join(lines[:2] + ["-1" + lines[2][1:]] + lines[3:]),
        "pixel_300.csv": "\n".join(lines[:2] + [lines[2].rsplit(",", 1)[0] + ",300"] + lines[3:]),
        "not_square.csv": "label,a,b\n1,2,3\n",
        "empty.csv": "label," + ",".join(f"pixel{i}" for i in range(784)) + "\n",
    }.items():
        (root / name).write_text(text + "\n")
        cases.append((name, ["data.name=csv", f"data.csv={root / name}"]))
    damage = [("trunc", lambda b: b[:-50]), ("magic", lambda b: b"\x00\x00\x09\x03" + b[4:])]
    for i, (stem, mutate) in enumerate(damage):
        d = root / f"mnist_{stem}"
        helpers.write_mnist_like(d, "MNIST", n_train=20, n_val=10, gz=False)
        f = d / "MNIST" / "raw" / "train-images-idx3-ubyte"
        f.write_bytes(mutate(f.read_bytes()))
        cases.append((f"idx_{stem}", ["data.name=mnist", f"data.root={d}", "data.download=false"]))
    cifar = root / "cifar_bad"
    helpers.write_cifar10(cifar, n_per_batch=10, n_val=10)
    (cifar / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    cases.append(("cifar_garbage", ["data.name=cifar10", f"data.root={cifar}", "data.download=false"]))
    ic = helpers.write_image_csv(root / "ic", n=20, size=8)
    (ic / "labels.csv").write_text("Image_index,label\nimg_0000.png,0\nimg_0001.png,\n")
    cases.append(("image_csv_no_label", ["data.name=image_csv", f"data.csv={ic / 'labels.csv'}",
                                         f"data.images={ic / 'images'}", "model.num_classes=2"]))
    folder = helpers.write_image_folder(root / "folder", n=20, size=8, split=False)
    next(folder.rglob("*.png")).write_bytes(b"\x89PNG broken")
    cases.append(("image_folder_corrupt", ["data.name=image_folder", f"data.images={folder}", "data.image_size=8"]))
    empty = root / "empty_folder"
    (empty / "class_a").mkdir(parents=True)
    cases.append(("image_folder_empty", ["data.name=image_folder", f"data.images={empty}"]))
    labels = root / "mnist_labels"                            # a label byte of 200 in a real IDX label file
    helpers.write_mnist_like(labels, "MNIST", n_train=20, n_val=10, gz=False)
    f = labels / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    f.write_bytes(f.read_bytes()[:8 + 3] + bytes([200]) + f.read_bytes()[8 + 4:])
    cases.append(("idx_label_200", ["data.name=mnist", f"data.root={labels}", "data.download=false"]))
    extra = helpers.write_image_csv(root / "ic_extra", n=20, size=8)
    table = (extra / "labels.csv").read_text().splitlines()
    (extra / "labels.csv").write_text("\n".join(table[:3] + [table[3] + ",surplus"] + table[4:]) + "\n")
    cases.append(("image_csv_extra_field", ["data.name=image_csv", f"data.csv={extra / 'labels.csv'}",
                                            f"data.images={extra / 'images'}"]))
    return cases


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def test_fuzz_bad_data_files(tmp_path):
    data_root = tmp_path / "data_files"
    cases = _bad_data_files(data_root)
    assert len(cases) >= 10
    before = _tree(data_root)
    for name, args in cases:                  # the decode cache is on (the default): it must stay empty too
        cwd = tmp_path / f"cwd_{name}"
        cwd.mkdir()
        code, out, err = helpers.in_process("train.py", [*args, *QUIET], cwd)
        lines = [s for s in err.strip().splitlines() if s.strip()]
        assert code == 2, (name, out[-500:], err[-1500:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err + out, (name, err)
        assert list(cwd.iterdir()) == [], f"{name}: something was written"
        assert _tree(data_root) == before, f"{name}: something was written next to the data"


def test_the_control_group_honours_dist_timeout_s(monkeypatch):
    """Under NCCL the control plane is a separate gloo group: created with dist.timeout_s, not the
    30-minute default of new_group."""
    import datetime

    import torch.distributed as tdist

    from lib.runtime import dist
    made = {}
    monkeypatch.setattr(tdist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(tdist, "new_group", lambda **kw: made.update(kw) or "group")
    assert dist.make_control_group(10) == "group"
    assert made == {"backend": "gloo", "timeout": datetime.timedelta(seconds=10)}


def test_a_hanging_rank_is_named_within_the_timeout(tmp_path):
    """Rank 1 stops answering (held after step 3, alive): rank 0's next collective times out, and the
    job ends within 20 s of a 10 s dist.timeout_s with one sentence that names rank 1, not a stack
    trace or a watchdog dump."""
    proc = helpers.start(_launch("train.py", "torchrun") + [*TRAIN, "dist.timeout_s=10", "train.epochs=1"], tmp_path,
                         TRAIN_FAULT_PAUSE_AT_STEP=3, TRAIN_FAULT_PAUSE_RANK=1)
    lines, paused = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if paused is None and "[rank 1] paused for a fault test" in line:
                paused = time.perf_counter()
        proc.wait(timeout=60)
    finally:
        helpers.kill_tree(proc)
    out = "".join(lines)
    assert paused is not None and proc.returncode != 0, out[-3000:]
    waited = time.perf_counter() - paused
    assert waited < 20, (waited, out[-3000:])
    print(f"ended {waited:.1f} s after rank 1 stopped answering")
    assert "another process of this job stopped answering: rank 1 (" in out and "dist.timeout_s=10 s" in out
    assert "[rank0]: Traceback" not in out and "[rank 0] Traceback" not in out and "Watchdog" not in out


def test_an_out_of_memory_error_exits_1_with_advice_and_the_checkpoint_intact(tmp_path):
    import hashlib
    r = script("train.py", *TRAIN, "checkpoint.every_steps=2", cwd=tmp_path, timeout=200,
               TRAIN_FAULT_RAISE_AT_STEP=5, TRAIN_FAULT_RAISE="oom")
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.count("Traceback (most recent call last)") == 1 and "torch.OutOfMemoryError: injected" in r.stderr
    assert "lower data.batch_size (and raise train.grad_accum" in r.stderr and "train.channels_last" in r.stderr
    ckpt = tmp_path / "runs/run/checkpoints"
    last = (ckpt / "last.pt").read_bytes()
    assert hashlib.sha256(last).hexdigest() in (ckpt / "last.pt.sha256").read_text()
    assert last == (ckpt / "step_00000004.pt").read_bytes() and state_dict(ckpt / "last.pt")["step"] == 4


def test_an_exception_from_the_model_exits_1_cleanly_in_every_launch(tmp_path):
    """Rank 1's forward raises at step 2 under torchrun: every launch exits 1 (no abort: no SIGABRT,
    'terminate called' or 'Aborted'), rank 1's traceback is shown once and named, rank 0 names rank 1.
    2 launches in the suite (~6 s each on 2 cores); TRAIN_TEST_CRASH_LAUNCHES=20 for the full check."""
    tiny = ["model.name=mlp", "model.hidden=[8]", "data.batch_size=64", "train.epochs=1", "train.max_steps=4",
            "train.log_every=1", *QUIET]
    t, launches = time.perf_counter(), int(os.environ.get("TRAIN_TEST_CRASH_LAUNCHES", "2"))
    for i in range(launches):
        r = torchrun("train.py", *tiny, f"name=run{i}", cwd=tmp_path, timeout=60,
                     TRAIN_FAULT_RAISE_AT_STEP=2, TRAIN_FAULT_RAISE_RANK=1)
        out = r.stdout + r.stderr
        assert r.returncode == 1, (i, r.returncode, out[-3000:])
        for sign in ("terminate called", "Aborted", "exitcode: -6", "Signals.SIGABRT"):
            assert sign not in out, (i, sign, out[-3000:])
        assert out.count("[rank 1] Traceback (most recent call last)") == 1, out[-3000:]
        assert "[rank 0] Traceback" not in out and "[rank0]: Traceback" not in out and "[rank1]: " not in out
        assert "[rank 1] Traceback (most recent call last)" in out and "[rank 1] RuntimeError: injected" in out
        assert "stopped answering: rank 1 (" in out, out[-3000:]
    print(f"{launches} launches in {time.perf_counter() - t:.0f} s")


def test_one_summary_line_of_the_ranks_unless_log_verbose(tmp_path):
    tiny = ["model.name=mlp", "model.hidden=[8]", "train.epochs=1", "train.max_steps=2", *QUIET]
    out = ok(torchrun("train.py", *tiny, "name=a", cwd=tmp_path, timeout=120))
    assert len(re.findall(r"^ranks: 2 ranks on 1 host\(s\): \S+ \[0 cpu\S*, 1 cpu\S*\]; CUDA_VISIBLE_DEVICES=", out,
                          re.M)) == 1, out
    assert "[rank 0/2] host" not in out and "[rank 1/2] host" not in out
    out = ok(torchrun("train.py", *tiny, "name=b", "log.verbose=true", cwd=tmp_path, timeout=120))
    assert len(re.findall(r"\[rank [01]/2\] host \S+, device cpu\S*, CUDA_VISIBLE_DEVICES=", out)) == 2, out
    assert "ranks: 2 ranks" not in out
