"""Several processes on this CPU (gloo): the same numbers as one process, exact evaluation, both launchers."""
import json

import pytest
import torch

import helpers
from helpers import ok, script, state_dict, torchrun
from lib import config, runtime
from lib.runtime import launch
from lib.errors import UserError

SAME = ["model.name=mlp", "model.hidden=[64]", "data.shuffle=false", "train.epochs=2", "sched.name=cosine",
        "optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "log.plots=false"]


def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(tmp_path):
    ok(script("train.py", *SAME, "name=one", "data.batch_size=64", cwd=tmp_path))
    out = ok(torchrun("train.py", *SAME, "name=two", "data.batch_size=32", cwd=tmp_path))
    assert "DDP, 2 process(es)" in out
    one = state_dict(tmp_path / "runs/one/checkpoints/last.pt")
    two = state_dict(tmp_path / "runs/two/checkpoints/last.pt")
    assert one["step"] == two["step"] == 46 and two["world_size"] == 2 and len(two["rng"]) == 2
    assert not torch.equal(two["rng"][0]["torch"], two["rng"][1]["torch"])   # each rank its own stream
    for k in one["model"]:
        assert torch.allclose(one["model"][k], two["model"][k], atol=1e-5), k
    assert one["metrics"]["val/acc"] > 0.8               # it learned (the point is the equality above)


def test_evaluation_is_exact_across_process_counts(tmp_path):
    """359 validation samples, 2 processes x 16 per batch: nothing padded, nothing counted twice."""
    common = [*SAME, "train.epochs=1", "data.eval_batch_size=16", "--eval-only"]   # the seed's initial weights
    one = json.loads(ok(script("train.py", *common, cwd=tmp_path)).split("eval: ")[1].splitlines()[0])
    two = json.loads(ok(torchrun("train.py", *common, cwd=tmp_path)).split("eval: ")[1].splitlines()[0])
    assert one["val/samples"] == two["val/samples"] == 359
    assert one["val/acc"] == two["val/acc"] and one["val/top5"] == two["val/top5"]
    assert one["val/loss"] == pytest.approx(two["val/loss"], rel=1e-6)


def test_accelerate_launch_runs_one_two_process_job(tmp_path):
    cmd = [helpers.PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(helpers.REPO / "train.py"), "train.epochs=1", "train.precision=bf16", "log.plots=false"]
    out = ok(helpers.run(cmd, tmp_path))
    assert "DDP, 2 process(es)" in out and "launcher accelerate launch" in out and "precision bf16" in out
    assert state_dict(tmp_path / "runs/default/checkpoints/last.pt")["world_size"] == 2


def test_accumulation_micro_steps_do_not_all_reduce(tmp_path):
    """train.py's own step (make_train_step) under DDP with train.grad_accum=3: 6 micro-steps make
    two gradient all-reduces (one per update), and the ranks still end with the same weights."""
    out = ok(torchrun("tests/ddp_probe.py", cwd=tmp_path))
    for rank in (0, 1):
        assert f"rank {rank}/2: 2 all-reduces, ranks agree: True" in out, out


def test_world_size_must_match_the_launcher():
    runtime.check_world_size(2, 2, "MULTI_CPU")
    with pytest.raises(UserError, match="started 2 processes but training sees 1"):
        runtime.check_world_size(2, 1, "NO")


def test_gpu_selection_before_cuda_and_per_node_limit(monkeypatch):
    cfg = config.load(config.Config, None, ["dist.gpus=1"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    notes = runtime.prepare_env(cfg)
    assert launch.os.environ["CUDA_VISIBLE_DEVICES"] == "5" and "selects CUDA_VISIBLE_DEVICES=5" in notes[0]
    cfg = config.load(config.Config, None, ["dist.gpus=0,3"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(UserError, match="asks for GPU 3 but only 2 are visible"):
        runtime.prepare_env(cfg)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    runtime.prepare_env(config.load(config.Config, None, ["dist.gpus=2,3"]))
    assert launch.os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    # more processes on a node than visible GPUs: a clear error before any CUDA call
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    stub = runtime.Runtime.__new__(runtime.Runtime)
    stub.torch = torch
    with pytest.raises(UserError, match="4 processes were started on this node but only 2 GPUs are visible"):
        stub._check_gpu_count(cuda=True)


def test_launch_variables_are_checked(monkeypatch):
    cfg = config.load(config.Config, None, [])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(UserError, match="WORLD_SIZE=2 is set but MASTER_ADDR"):
        runtime.prepare_env(cfg)
    monkeypatch.setenv("WORLD_SIZE", "abc")
    monkeypatch.setenv("MASTER_ADDR", "x")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(UserError, match="WORLD_SIZE=abc is not a process count"):
        runtime.prepare_env(cfg)


def _slurm_task(monkeypatch, env):
    """prepare_env for one task in an env made of `env` only (launch and SLURM variables cleared)."""
    for k in [*runtime.LAUNCH_VARS, *launch.NODE_VARS, "CUDA_VISIBLE_DEVICES", "TORCHELASTIC_RUN_ID",
              *[k for k in launch.os.environ if k.startswith("SLURM_")]]:
        monkeypatch.setenv(k, "x")
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    notes = runtime.prepare_env(config.load(config.Config, None, []))
    e = launch.os.environ
    visible = [v for v in e.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
    device = int(e["LOCAL_RANK"]) % max(1, len(visible))        # Accelerate's cuda:<LOCAL_RANK % count>
    return launch.node_local_rank(), device, visible[device] if visible else None, notes


@pytest.mark.parametrize("layout", ["gpus-per-task", "gpus-per-node", "torchrun"])
def test_slurm_layouts_give_one_node_first_task_and_the_right_gpu(monkeypatch, layout):
    """issue 15 item 6: 2 nodes x 4 tasks. --gpus-per-task=1 shows each task one GPU (device index 0),
    yet exactly one task per node is "first on the node" (main_process_first, cache writes), so the
    node's data is decoded once, not 4 times; --gpus-per-node=4 gives task i cuda:i; torchrun's own
    LOCAL_RANK wins under srun. Every GPU of a node is used by exactly one task."""
    firsts, gpus = {0: 0, 1: 0}, set()
    for proc in range(8):
        node, local = divmod(proc, 4)
        env = {"SLURM_PROCID": proc, "SLURM_LOCALID": local, "SLURM_NODEID": node, "SLURM_NTASKS": 8,
               "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": 7}
        if layout == "gpus-per-task":
            env.update(CUDA_VISIBLE_DEVICES=local, SLURM_STEP_GPUS=local, SLURM_GPUS_PER_TASK=1)
        elif layout == "gpus-per-node":
            env.update(CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_STEP_GPUS="0,1,2,3")
        else:       # srun --ntasks-per-node=1 torchrun --nproc_per_node=4: torchrun sets the variables
            env.update(CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_PROCID=node, SLURM_LOCALID=0, SLURM_NTASKS=2,
                       SLURM_NTASKS_PER_NODE=1, TORCHELASTIC_RUN_ID="r", RANK=proc, WORLD_SIZE=8,
                       LOCAL_RANK=local, LOCAL_WORLD_SIZE=4, MASTER_ADDR="gpu01", MASTER_PORT=29500,
                       TRAIN_LOCAL_RANK=0)                          # a stale value from outside is ignored
        (rank, count), device, gpu, notes = _slurm_task(monkeypatch, env)
        assert (rank, count) == (local, 4), (layout, proc)
        assert device == (0 if layout == "gpus-per-task" else local) and gpu == str(local)
        gpus.add((node, gpu))
        firsts[node] += rank == 0
        if layout == "gpus-per-task":
            assert f"SLURM bound GPU {local} to this task; it is this process's cuda:0 (task {local} of 4" in notes[-1]
        elif layout == "gpus-per-node":
            assert f"task {local} of 4 on this node uses cuda:{local} = GPU {local}" in notes[-1]
    assert firsts == {0: 1, 1: 1} and len(gpus) == 8


def test_runtime_takes_its_node_local_rank_from_slurm_not_from_the_gpu_index(monkeypatch):
    for k in [*runtime.LAUNCH_VARS, *launch.NODE_VARS]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TRAIN_LOCAL_RANK", "3")                 # what prepare_env sets under --gpus-per-task
    from accelerate.state import AcceleratorState
    try:
        rt = runtime.Runtime(config.load(config.Config, None, ["model.name=mlp"]), [])
        assert rt.local_rank == 3
    finally:
        AcceleratorState._reset_state(True)


def test_slurm_gpu_binding_per_task_and_precedence(monkeypatch):
    """srun python with --gpus-per-task=1: SLURM shows each task one GPU (its cuda:0); dist.gpus and a
    user's CUDA_VISIBLE_DEVICES still come first and are logged with their source."""
    for k in [*runtime.LAUNCH_VARS, *launch.NODE_VARS, "CUDA_VISIBLE_DEVICES"] + [
            k for k in launch.os.environ if k.startswith("SLURM_")]:
        monkeypatch.setenv(k, "x")              # recorded, so that what prepare_env sets is undone after
        monkeypatch.delenv(k)
    slurm = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242", "SLURM_STEP_GPUS": "6",
             "CUDA_VISIBLE_DEVICES": "6"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    notes = runtime.prepare_env(config.load(config.Config, None, []))
    e = launch.os.environ
    assert (e["RANK"], e["WORLD_SIZE"], e["MASTER_ADDR"]) == ("3", "4", "gpu07")
    assert (e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"]) == ("0", "1")          # its one GPU is its cuda:0
    assert "CUDA_VISIBLE_DEVICES=6 (set by SLURM)" in notes[0] and "SLURM bound GPU 6" in notes[-1]
    for k in runtime.LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")                      # a node-wide view: no rebinding
    runtime.prepare_env(config.load(config.Config, None, []))
    assert (e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"]) == ("1", "2")
    for k in runtime.LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    notes = runtime.prepare_env(config.load(config.Config, None, ["dist.gpus=1"]))   # dist.gpus wins
    assert e["CUDA_VISIBLE_DEVICES"] == "3" and "dist.gpus=1 selects CUDA_VISIBLE_DEVICES=3" in notes[0]


@pytest.mark.parametrize("mode,zero", [("broadcast", None), ("mean", None), ("broadcast", 3)])
def test_a_batch_norm_model_evaluates_the_same_in_run_and_from_its_checkpoint(tmp_path, mode, zero):
    """Issue #16 item 4: the default model (the FashionMNIST CNN, batch norm) trained by 2 processes
    for one epoch (12 steps): its in-run validation equals `--eval-only` of the saved last.pt / best.pt
    in 1 process, because the ranks' running statistics are made equal (dist.sync_buffers) before every
    evaluation and save. Without that the losses differ by 5e-4. Under DeepSpeed (which never
    broadcasts buffers; ZeRO-3 evaluates through its engine) the saved weights are evaluated alone."""
    args = ["train.epochs=1", "log.plots=false", f"dist.sync_buffers={mode}"]
    ds = [f"dist.deepspeed={helpers.REPO}/configs/deepspeed/zero{zero}.json"] if zero else []
    out = ok(torchrun("train.py", *args, *ds, cwd=tmp_path, timeout=240))
    assert f"DeepSpeed ZeRO-{zero}, 2 process(es)" in out if zero else "DDP, 2 process(es)" in out
    ckpt = state_dict(tmp_path / "runs/default/checkpoints/last.pt")
    in_run = ckpt["metrics"]
    assert ckpt["world_size"] == 2 and in_run["val/samples"] == 359
    # A DeepSpeed checkpoint resumes only under DeepSpeed: its consolidated weights as model.weights.
    sources = [("model.weights=runs/default/checkpoints/last.pt", "checkpoint.resume=never")] if zero else \
        [(f"checkpoint.resume=runs/default/checkpoints/{name}",) for name in ("last.pt", "best.pt")]
    for source in sources:
        out = ok(script("train.py", *args, *source, "--eval-only", cwd=tmp_path, timeout=120))
        alone = json.loads(out.split("eval: ")[1].splitlines()[0])
        assert alone["val/acc"] == in_run["val/acc"] and alone["val/top5"] == in_run["val/top5"], (source, alone)
        assert alone["val/loss"] == pytest.approx(in_run["val/loss"], rel=1e-6), (source, alone, in_run)


# Run by torchrun (2 processes, gloo): each rank's buffers hold rank-dependent values, then sync_buffers.
SYNC_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import torch.distributed as tdist
from lib.runtime.buffers import sync_buffers
tdist.init_process_group("gloo")
rank, world = tdist.get_rank(), tdist.get_world_size()
seen = {}
for mode in ("broadcast", "mean"):
    bn, extra = torch.nn.BatchNorm2d(3), torch.nn.Module()
    extra.register_buffer("low", torch.full((2,), rank + 1.0, dtype=torch.bfloat16))  # DeepSpeed bf16's buffers
    bn.running_mean.fill_(rank + 1.0)
    bn.running_var.fill_(10.0 * (rank + 1))
    bn.num_batches_tracked.fill_(5 + rank)
    sync_buffers([bn, extra], world, mode)
    seen[mode] = [bn.running_mean.tolist(), bn.running_var.tolist(), bn.num_batches_tracked.item(),
                  extra.low.float().tolist(), str(extra.low.dtype)]
everyone = [None] * world
tdist.all_gather_object(everyone, seen)
if rank == 0:
    print("SEEN " + json.dumps(everyone))
tdist.destroy_process_group()
"""


def test_sync_buffers_broadcasts_or_averages_floats_and_broadcasts_integers(tmp_path):
    """dist.sync_buffers' two modes on 2 ranks whose statistics differ: broadcast gives every rank rank
    0's, mean the average (timm's distribute_bn 'reduce'); num_batches_tracked is rank 0's either way;
    bfloat16 buffers (DeepSpeed's bf16 runs) keep their dtype."""
    (tmp_path / "probe.py").write_text(SYNC_PROBE)
    out = ok(torchrun(str(tmp_path / "probe.py"), helpers.REPO, cwd=tmp_path, timeout=120))
    everyone = json.loads(out.split("SEEN ")[1].splitlines()[0])
    assert len(everyone) == 2
    for seen in everyone:           # the same on both ranks
        assert seen["broadcast"] == [[1.0] * 3, [10.0] * 3, 5, [1.0] * 2, "torch.bfloat16"], seen
        assert seen["mean"] == [[1.5] * 3, [15.0] * 3, 5, [1.5] * 2, "torch.bfloat16"], seen


def test_sync_bn_converts_on_gpus_and_is_refused_on_cpu(tmp_path):
    """model.sync_bn: BatchNorm layers become SyncBatchNorm with several processes on GPUs; one process
    gets a note; a CPU multi-process run is refused at start (torch's SyncBatchNorm has no CPU forward),
    before any file is written, naming dist.sync_buffers."""
    from types import SimpleNamespace

    from lib.models import build_model
    from lib.runtime import buffers
    cfg = config.load(config.Config, None, ["model.sync_bn=true"])
    model = build_model(cfg.model, num_classes=10, in_channels=1, image_size=28, input_shape=(1, 28, 28))
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert n_bn > 0
    assert buffers.check_sync_bn(cfg.model, SimpleNamespace(type="cuda"), 2) == (True, None)
    converted, n = buffers.to_sync_batchnorm(model)
    assert n == n_bn and sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) == n_bn
    assert not any(type(m) is torch.nn.BatchNorm2d for m in converted.modules())
    convert, note = buffers.check_sync_bn(cfg.model, torch.device("cpu"), 1)
    assert not convert and note.startswith("model.sync_bn has no effect in one process")
    assert buffers.check_sync_bn(config.load(config.Config, None, []).model, torch.device("cpu"), 2) == (False, None)
    with pytest.raises(UserError, match="needs CUDA"):
        buffers.check_sync_bn(cfg.model, torch.device("cpu"), 2)
    # A pixel CSV: its decode cache (.cache/ beside it) would be the first file a started run writes.
    helpers.write_pixel_csv(tmp_path / "px.csv", n=40)
    r = torchrun("train.py", "model.sync_bn=true", "train.max_steps=1", "data.name=csv", "data.csv=px.csv",
                 cwd=tmp_path, timeout=120)
    # Each worker exits 2 with the sentence; torchrun itself reports a failed worker as 1.
    assert r.returncode != 0 and "error: model.sync_bn=true needs CUDA" in r.stderr, r.stderr[-2000:]
    assert "dist.sync_buffers" in r.stderr and "Traceback" not in r.stderr.split("error: model.sync_bn")[0]
    assert "exitcode  : 2" in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["px.csv"]      # no runs/, no .cache/
