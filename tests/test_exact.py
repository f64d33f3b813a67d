"""Exact on every data path: a stop signal sent to the whole process group (DataLoader workers
included) under torchrun and under the SLURM template, kill -9 on the file path with and without
workers, augmentation on; the resumed run always ends bit-identical to the unbroken one."""
import os
import random
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch

import helpers
from helpers import PY, REPO, ok, read_jsonl, script, state_dict

QUIET = ["log.plots=false", "log.progress=false"]
# A small file-path run: ~100 training images, 2 processes x 8 per batch -> 6-7 steps an epoch, 2 epochs,
# with every augmentation on (issue 17): RandomResizedCrop + flip in the workers, RandAugment, random
# erasing, and mixup / cutmix (which pair samples within a rank's micro-batch, so a new layout has no
# mixing: MIX_OFF).
MIX_OFF = ("data.mixup_alpha=0", "data.cutmix_alpha=0")
FILES = ["model.name=mlp", "model.hidden=[32]", "data.train_crop=16", "data.eval_resize=18",
         "data.auto_augment=randaugment", "data.random_erasing=0.25", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0",
         "data.batch_size=8", "data.loader=dataloader", "data.num_workers=2",
         "data.cache=false", "train.epochs=2", "train.log_every=1", "checkpoint.every_steps=2", "name=run", *QUIET]
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--monitor-interval=0.5"]


def _data_args(root, kind):
    if kind == "image_folder":
        folder = helpers.write_image_folder(root / "folder", n=128, size=16, split=True)
        return ["data.name=image_folder", f"data.images={folder}"]
    folder = helpers.write_image_csv(root / "csv", n=128, size=16, channels=3)
    return ["data.name=image_csv", f"data.images={folder / 'images'}", f"data.csv={folder / 'labels.csv'}"]


def _wait_for_pauses(read_text, proc, ranks=2, timeout=120):
    """Wait until every rank has printed that it holds in its fault-test pause (past the step's
    stop-signal check), so a signal now is seen at the next step boundary on every rank."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("the run ended before pausing")
        if all(f"[rank {r}] paused for a fault test" in read_text() for r in range(ranks)):
            return
        time.sleep(0.1)
    helpers.kill_tree(proc)
    raise AssertionError(f"not every rank paused within {timeout}s")


def _read_until_paused(proc, ranks=2, timeout=120):
    """The launcher's output so far, read line by line (by a thread, so a silent run cannot block the
    test) until every rank holds in its pause."""
    import queue
    import threading
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)], daemon=True).start()
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            raise AssertionError("the run ended before pausing:\n" + "".join(seen)[-3000:])
        seen.append(line)
        text = "".join(seen)                  # two ranks' lines can share one line of the launcher's output
        if all(f"[rank {r}] paused for a fault test" in text for r in range(ranks)):
            proc.pending = lines                  # the rest of the output, for _rest()
            return "".join(seen)
    helpers.kill_tree(proc)
    raise AssertionError(f"not every rank paused within {timeout}s:\n" + "".join(seen)[-3000:])


def _rest(proc, timeout=120):
    """What the launcher printed after _read_until_paused, once it has ended."""
    proc.wait(timeout=timeout)
    out = []
    while (line := proc.pending.get(timeout=30)) is not None:
        out.append(line)
    return "".join(out)


def _same_run(a_dir, b_dir):
    """Bit-identical weights and optimizer state, and the same loss at every step."""
    a, b = (state_dict(d / "runs/run/checkpoints/last.pt") for d in (a_dir, b_dir))
    assert a["step"] == b["step"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    losses = [[(r["step"], r["train/loss"]) for r in read_jsonl(d / "runs/run/metrics.jsonl") if "train/loss" in r]
              for d in (a_dir, b_dir)]
    assert losses[0] == losses[1]


_REFERENCES = {}


def _reference(kind, tmp_path_factory, extra=()):
    """(data args, folder of the unbroken 2-process torchrun run) for a file-path dataset kind (and
    extra arguments), made once."""
    if (kind, extra) not in _REFERENCES:
        root = tmp_path_factory.mktemp(kind)
        args = [*_data_args(root, kind), *extra]
        ref = root / "reference"
        ref.mkdir()
        proc = helpers.start([*TORCHRUN, REPO / "train.py", *FILES, *args], ref)
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out[-3000:]
        assert state_dict(ref / "runs/run/checkpoints/last.pt")["step"] in (12, 14)   # 6 or 7 steps an epoch
        _REFERENCES[kind, extra] = args, ref
    return _REFERENCES[kind, extra]


@pytest.fixture(scope="module", params=["image_folder", "image_csv"])
def files_reference(request, tmp_path_factory):
    return _reference(request.param, tmp_path_factory)


def test_sigterm_to_the_process_group_stops_cleanly_with_loader_workers(files_reference, tmp_path):
    """Issue #16 item 1: SIGTERM to a torchrun job's process group (`kill -- -PGID`, as scancel does):
    torchrun passes it on to each worker's process group, DataLoader workers included. The loader
    workers ignore it, each rank finishes the step it is in, writes the stop checkpoint there and
    exits 0; no worker traceback. The resumed run ends bit-identical to the unbroken one."""
    args, ref = files_reference
    cmd = [*TORCHRUN, REPO / "train.py", *FILES, *args]
    proc = helpers.start(cmd, tmp_path, TRAIN_FAULT_PAUSE_AT_STEP=3, TRAIN_FAULT_PAUSE_THEN="continue")
    before = _read_until_paused(proc)                          # mid-epoch, the workers' queues full
    os.killpg(proc.pid, signal.SIGTERM)
    out = before + _rest(proc)
    assert "stopped by SIGTERM at epoch 1, step 4; checkpoint written" in out, out[-3000:]
    assert "is killed by signal" not in out and "DataLoader worker" not in out, out[-3000:]
    # The one traceback is torchrun's own (its agent raises SignalException on SIGTERM and exits 1).
    assert out.count("Traceback") == out.count("SignalException: Process") <= 1, out[-3000:]
    assert not re.search(r"exitcode\s*:\s*[1-9]", out), out[-3000:]      # no rank failed
    stopped = state_dict(tmp_path / "runs/run/checkpoints/last.pt")
    assert stopped["step"] == 4 and stopped["batch"] == 4 and stopped["epoch"] == 0   # the stop step, mid-epoch
    again = helpers.start(cmd, tmp_path)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out[-3000:]
    assert "resumed from" in out and "step 4" in out.split("resumed from")[1].splitlines()[0]
    _same_run(ref, tmp_path)


def test_slurm_usr1_to_the_job_with_loader_workers_requeues_and_resumes_exactly(tmp_path, tmp_path_factory):
    """The same through slurm/train.sh under the scontrol/srun shims (2 nodes x 1 process): SIGUSR1 to
    the job's process group (batch shell, srun, the torchrun agents, which pass a stop on to their
    workers' groups, loader workers included), a stop checkpoint at the next step, `scontrol requeue`,
    and the requeued job ends bit-identical to the unbroken run."""
    args, ref = _reference("image_folder", tmp_path_factory)
    job = str(random.randint(100000, 999999))
    env = dict(PATH=f"{REPO / 'tests/shims'}:{os.environ['PATH']}", SHIM_LOG=tmp_path / "shim.log", SHIM_DIR=tmp_path,
               SHIM_NODES=2, SLURM_JOB_ID=job, SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_NUM_NODES=2,
               SLURM_SUBMIT_DIR=REPO, GPUS_PER_NODE=1, PYTHON=PY, OMP_NUM_THREADS=1,   # torchrun's threads
               OVERRIDES=" ".join([f"output_dir={tmp_path / 'runs'}", *FILES, *args]))

    def sbatch(**extra):
        return subprocess.Popen(["bash", str(REPO / "slurm/train.sh")], env=helpers.env(**env, **extra),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    proc = sbatch(TRAIN_FAULT_PAUSE_AT_STEP=3, TRAIN_FAULT_PAUSE_THEN="continue")
    try:
        logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
        _wait_for_pauses(lambda: "".join(p.read_text() for p in logs if p.exists()), proc)
        os.killpg(proc.pid, signal.SIGUSR1)                      # the job's process group
        out = proc.communicate(timeout=180)[0]
    finally:
        helpers.kill_tree(proc)
    node0 = (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()
    assert proc.returncode == 0, out[-2000:] + node0[-3000:]
    # torchrun's agent, signalled too, stops its workers' process groups with SIGTERM: whichever signal a
    # rank sees first names the stop.
    assert re.search(r"training stopped cleanly: stopped by SIG(USR1|TERM) at step 4", out), out[-2000:]
    assert "batch shell: got SIGUSR1" in out                  # it forwarded the signal too (the marker says done)
    assert not (REPO / f".train-stopped-{job}").exists()      # the stop marker is consumed
    assert "is killed by signal" not in node0 and "DataLoader worker" not in node0, node0[-3000:]
    # The only tracebacks are the torchrun agents' own SignalException (they exit 1 on a signal).
    assert node0.count("Traceback") == node0.count("SignalException: Process"), node0[-3000:]
    assert f"scontrol requeue {job}" in (tmp_path / "shim.log").read_text()   # rank 0 asked SLURM to requeue
    assert state_dict(tmp_path / "runs/run/checkpoints/last.pt")["step"] == 4
    proc = sbatch()                                               # the requeued job
    try:
        out = proc.communicate(timeout=300)[0]
    finally:
        helpers.kill_tree(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "step 4" in (tmp_path / "node0.log").read_text().split("resumed from")[1].splitlines()[0]
    _same_run(ref, tmp_path)


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_kill_9_on_the_file_path_resumes_bit_identical(launcher, tmp_path, tmp_path_factory):
    """Issue #16 items 2 and 3: kill -9 mid-epoch on the DataLoader path, augmentation on, then resume
    from the newest checkpoint: bit-identical to the unbroken run, with the workers changed between
    the two launches (0 -> 2 in one process, 2 -> 0 in two)."""
    args, ref = _reference("image_folder", tmp_path_factory)
    prefix = TORCHRUN if launcher == "torchrun" else [PY]
    if launcher == "python":                                     # the unbroken one-process run
        ref = tmp_path / "reference"
        ref.mkdir()
        proc = helpers.start([PY, REPO / "train.py", *FILES, *args], ref)
        assert proc.wait(timeout=300) == 0, proc.stdout.read()[-3000:]
    workers = ["data.num_workers=0", "data.num_workers=2"]
    if launcher == "torchrun":
        workers.reverse()
    cmd = [*prefix, REPO / "train.py", *FILES, *args]
    cut = tmp_path / "cut"
    cut.mkdir()
    proc = helpers.start([*cmd, workers[0]], cut, TRAIN_FAULT_PAUSE_AT_STEP=5)
    helpers.wait_for_step(cut / "runs/run", 5, proc)
    helpers.kill_tree(proc)                                       # kill -9, everything
    again = helpers.start([*cmd, workers[1]], cut)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out[-3000:]
    assert re.search(r"resumed from \S+step_00000004.pt at epoch 1, batch 4, step 4", out), out[-3000:]
    _same_run(ref, cut)


# Issue #16 item 5: the memory path (the offline digits, 1,438 training samples) with an MLP, SGD and
# a cosine schedule; 64 samples an update as 2 processes x 32 or 1 process x 32 x grad_accum 2 (or x 64).
LAYOUT = ["model.name=mlp", "model.hidden=[64]", "optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9",
          "sched.name=cosine", "train.epochs=2", "train.log_every=1", "checkpoint.every_steps=4", "name=run", *QUIET]
ONE, TWO = ([PY], ["data.batch_size=32", "train.grad_accum=2"]), (TORCHRUN, ["data.batch_size=32"])


def _killed_at_step_7(prefix, args, cwd):
    """A run killed -9 mid-epoch after step 7 (its newest checkpoint: step 4)."""
    proc = helpers.start([*prefix, REPO / "train.py", *args], cwd, TRAIN_FAULT_PAUSE_AT_STEP=7)
    helpers.wait_for_step(cwd / "runs/run", 7, proc)
    helpers.kill_tree(proc)


def _close_run(a_dir, b_dir, atol=1e-6):
    a, b = (state_dict(d / "runs/run/checkpoints/last.pt") for d in (a_dir, b_dir))
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=atol, rtol=0), (k, float((v - b["model"][k]).abs().max()))


@pytest.mark.parametrize("before,after", [(TWO, ONE), (ONE, TWO)], ids=["2to1", "1to2"])
def test_a_new_world_size_with_the_same_global_batch_continues_at_the_same_sample(before, after, tmp_path):
    """Killed mid-epoch on 2 processes (1), resumed on 1 (2) with grad_accum doubled (halved): the run
    continues at sample 256 of the epoch's order and ends allclose (1e-6) to the unbroken run. (Step 4
    is micro-batch 4 of 2 x 32 but micro-batch 8 of 1 x 32 x 2: reading the batch count in the new
    layout would start at sample 128 or 512.)"""
    ref, cut = tmp_path / "reference", tmp_path / "cut"
    for d in (ref, cut):
        d.mkdir()
    proc = helpers.start([*before[0], REPO / "train.py", *LAYOUT, *before[1]], ref)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()[-3000:]
    _killed_at_step_7(before[0], [*LAYOUT, *before[1]], cut)
    if before is TWO:                          # the same cut, resumed with half the global batch (below)
        shutil.copytree(cut, tmp_path / "halved")
    again = helpers.start([*after[0], REPO / "train.py", *LAYOUT, *after[1]], cut)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out[-3000:]
    assert "the same global batch of 64, continuing at sample 256 of epoch 1's order" in out, out[-3000:]
    _close_run(ref, cut)
    if before is TWO:
        halved = tmp_path / "halved"
        out = ok(script("train.py", *LAYOUT, "data.batch_size=32", cwd=halved))
        assert "the global batch changes from 64 to 32" in out and "continuing at sample 256" in out, out[-3000:]
        # The rest of epoch 1 (1,438 - 256 samples) in updates of 32, then epoch 2: nothing repeated or lost.
        assert state_dict(halved / "runs/run/checkpoints/last.pt")["step"] == 4 + -(-1182 // 32) + -(-1438 // 32)


def test_a_new_world_size_on_the_file_path_with_augmentation(tmp_path, tmp_path_factory):
    """The DataLoader path with augmentation: killed on 2 processes x 8, resumed on 1 process x 8 x
    grad_accum 2 with no workers: allclose to the unbroken 2-process run (each sample augmented as it
    was)."""
    args, ref = _reference("image_folder", tmp_path_factory, MIX_OFF)
    proc = helpers.start([*TORCHRUN, REPO / "train.py", *FILES, *args], tmp_path, TRAIN_FAULT_PAUSE_AT_STEP=5)
    helpers.wait_for_step(tmp_path / "runs/run", 5, proc)
    helpers.kill_tree(proc)
    out = ok(script("train.py", *FILES, *args, "train.grad_accum=2", "data.num_workers=0", cwd=tmp_path))
    assert "the same global batch of 16, continuing at sample 64" in out, out[-3000:]
    _close_run(ref, tmp_path)


def test_deepspeed_shards_on_another_world_size_are_refused_with_the_way_out(tmp_path):
    """ZeRO shards are cut for the world size that wrote them: resuming them on another one exits 2,
    before anything is written, naming both ways out (the old world size, or the consolidated weights)."""
    from lib.checkpoint.files import atomic_save, load, periodic_files
    args = ["model.name=mlp", "model.hidden=[16]", "train.max_steps=2", "train.epochs=1", "name=run", *QUIET]
    ok(script("train.py", *args, cwd=tmp_path))
    ckpts = tmp_path / "runs/run/checkpoints"
    for path in [*periodic_files(ckpts), ckpts / "last.pt"]:        # as a 2-process ZeRO run would have left it
        ckpt = load(path)
        ckpt.update(deepspeed="ds_step_00000002", world_size=2)
        path.unlink()
        atomic_save(ckpt, path, commit=True)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "runs/run").rglob("*"))
    msg = helpers.user_error(script("train.py", *args, "train.max_steps=3", cwd=tmp_path))
    assert "DeepSpeed ZeRO shards written by 2 process(es), and this run has 1" in msg, msg
    assert "resume it with 2 processes" in msg and "model.weights=" in msg, msg
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "runs/run").rglob("*")) == before
