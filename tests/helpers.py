"""Helpers for the tests: run the real scripts as a user would, and write small datasets in their
real on-disk formats (gzip IDX, CIFAR-10 python batches, pixel CSV, PNG + labels CSV, image folders)."""
import contextlib
import gzip
import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def env(**extra):
    e = dict(os.environ)
    e.pop("CUDA_VISIBLE_DEVICES", None)
    for k in list(e):
        if k.startswith(("ACCELERATE_", "TORCHELASTIC_", "SLURM_")) or k in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TRAIN_LOCAL_RANK", "TRAIN_LOCAL_WORLD_SIZE"):
            e.pop(k)
    e.update({"PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "PYTHONHASHSEED": "0"})
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run(cmd, cwd, timeout=300, **env_extra):
    """Run a command in its own session; kill the whole group on timeout. Returns CompletedProcess."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def script(name, *args, cwd, timeout=300, **env_extra):
    """python <repo>/<name> args... (e.g. script('train.py', 'train.epochs=1', cwd=tmp_path))."""
    return run([PY, str(REPO / name), *map(str, args)], cwd, timeout, **env_extra)


def torchrun(name, *args, cwd, nproc=2, timeout=300, extra=(), **env_extra):
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--monitor-interval=0.5",
           *extra, str(REPO / name), *map(str, args)]
    return run(cmd, cwd, timeout, **env_extra)


def ok(result):
    """Assert success and return stdout (showing both streams on failure)."""
    assert result.returncode == 0, \
        f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-4000:]}"
    return result.stdout


def user_error(result):
    """Assert the exit-2 contract: one message line on stderr, no traceback. Returns the message."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    lines = [s for s in result.stderr.strip().splitlines() if s.strip() and "Warning" not in s]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def final_metrics(stdout):
    """The numbers of the 'done:' summary line."""
    line = [s for s in stdout.splitlines() if s.startswith("done:")][-1]
    return {k: float(v) for k, v in re.findall(r"([\w/]+) (-?[\d.]+(?:e-?\d+)?)", line.split(" in ")[0])}


def state_dict(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# Small real datasets. The images are the UCI digits scaled up, so every format is learnable.
# ---------------------------------------------------------------------------------------------

def digit_images(n, size=28, channels=1, seed=0):
    """(n, channels, size, size) uint8 images of handwritten digits and their labels (n,)."""
    from lib.data.sources import sklearn_digits
    table = sklearn_digits()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(table))[:n] if n <= len(table) else rng.integers(0, len(table), n)
    img = (table[idx, :64] * (255.0 / 16.0)).reshape(-1, 8, 8)
    reps = -(-size // 8)
    big = np.kron(img, np.ones((reps, reps)))[:, :size, :size]
    big = np.clip(big + rng.normal(0, 8, big.shape), 0, 255).astype(np.uint8)
    out = np.repeat(big[:, None], channels, axis=1)
    if channels == 3:
        out[:, 1] = 255 - out[:, 1]        # make the channels differ
    return out, table[idx, 64].astype(np.int64)


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_mnist_like(root, folder="FashionMNIST", n_train=600, n_val=200, gz=True):
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for stem_img, stem_lbl, n, seed in (("train-images-idx3-ubyte", "train-labels-idx1-ubyte", n_train, 1),
                                        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", n_val, 2)):
        x, y = digit_images(n, 28, seed=seed)
        write_idx(raw / (stem_img + suffix), x[:, 0])
        write_idx(raw / (stem_lbl + suffix), y)
    return Path(root)


def write_cifar10(root, n_per_batch=100, n_val=100):
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, n) in enumerate([(f"data_batch_{b}", n_per_batch) for b in range(1, 6)] + [("test_batch", n_val)]):
        x, y = digit_images(n, 32, channels=3, seed=10 + i)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": y.tolist(), "data": x.reshape(n, -1),
                         "filenames": [f"{name}_{j}.png" for j in range(n)]}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)], "num_cases_per_batch": n_per_batch}, f)
    return Path(root)


def write_pixel_csv(path, n=300, size=28, seed=3):
    x, y = digit_images(n, size, seed=seed)
    with open(path, "w") as f:
        f.write("label," + ",".join(f"pixel{i + 1}" for i in range(size * size)) + "\n")
        for img, lab in zip(x[:, 0].reshape(n, -1), y):
            f.write(f"{lab}," + ",".join(map(str, img.tolist())) + "\n")
    return Path(path)


def write_png(path, array):
    from PIL import Image
    a = np.asarray(array)
    Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)).save(path)


def write_image_csv(root, n=120, size=16, channels=1, named_labels=False):
    """root/images/*.png + root/labels.csv (Image_index,label) + train_list.txt / test_list.txt."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    x, y = digit_images(n, size, channels=channels, seed=4)
    names = []
    for i in range(n):
        name = f"img_{i:04d}.png"
        write_png(root / "images" / name, x[i])
        names.append(name)
    with open(root / "labels.csv", "w") as f:
        f.write("Image_index,label\n")
        for name, lab in zip(names, y):
            f.write(f"{name},{'digit_' + str(lab) if named_labels else lab}\n")
    cut = int(n * 0.75)
    (root / "train_list.txt").write_text("\n".join(names[:cut]) + "\n")
    (root / "test_list.txt").write_text("\n".join(names[cut:]) + "\n")
    return root


def write_image_folder(root, n=100, size=16, split=True):
    root = Path(root)
    x, y = digit_images(n, size, channels=3, seed=5)
    for i in range(n):
        part = ("train" if i < int(n * 0.75) else "val") if split else ""
        folder = root / part / f"class_{y[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        write_png(folder / f"{i:04d}.png", x[i])
    return root


def read_jsonl(path):
    return [json.loads(s) for s in Path(path).read_text().splitlines() if s.strip()]


def in_process(script_name, args, cwd):
    """Run <script>.main through lib.cli exactly as `python <script> args` does; (code, stdout, stderr)."""
    import importlib
    module = importlib.import_module(script_name[:-3])
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = module.cli.run(module.main, argv=[str(a) for a in args], **module.CLI)
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()


def kill_tree(proc):
    """SIGKILL a launcher and everything under it (torchrun's workers live in their own sessions)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def start(cmd, cwd, **extra_env):
    """Start a command in its own session (stdout and stderr together), for tests that kill it."""
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env(**extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_step(run_dir, step, proc, timeout=120):
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"finished before step {step}:\n{proc.stdout.read()[-3000:]}")
        if path.exists():
            rows = path.read_text().splitlines()
            if rows and json.loads(rows[-1])["step"] >= step:
                return
        time.sleep(0.05)
    kill_tree(proc)                                   # never leave a held run behind
    raise AssertionError(f"step {step} not reached in {timeout}s")
