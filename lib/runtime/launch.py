"""The launch environment, read before torch touches CUDA: which GPUs this process may use, the
torchrun variables derived from SLURM's under a bare `srun`, checks of what the launcher set, and
what env.json records about the machine. Imports no torch at module level.

    notes = prepare_env(cfg)   # dist.gpus -> CUDA_VISIBLE_DEVICES, SLURM -> RANK/WORLD_SIZE/..., checks
    detect_launcher(); process_rank(); restart_count(); slurm_job_id(); slurm_hostnames("gpu[01-03]")
    node_local_rank()          # (rank on this node, processes on it): SLURM_LOCALID even where LOCAL_RANK is 0
"""
import os
import platform
import re
import socket
import subprocess
import sys

from lib.errors import UserError

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
NODE_VARS = ("TRAIN_LOCAL_RANK", "TRAIN_LOCAL_WORLD_SIZE")   # set from SLURM_LOCALID where LOCAL_RANK is a GPU index
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def prepare_env(cfg) -> list[str]:
    """Apply GPU selection and SLURM launch variables; returns notes for the log.

    GPU precedence (first wins): dist.gpus, then CUDA_VISIBLE_DEVICES, then SLURM's own binding.
    dist.gpus indexes the GPUs already visible, so '1' under CUDA_VISIBLE_DEVICES=4,5 selects GPU 5.
    """
    notes = []
    torch = sys.modules.get("torch")
    gpus = cfg.dist.gpus
    if gpus is not None:
        if torch is not None and torch.cuda.is_initialized():
            raise UserError("dist.gpus was given after CUDA was initialised in this process; set "
                            "CUDA_VISIBLE_DEVICES before starting Python instead.")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        wanted = gpus.split(",")
        if visible not in (None, ""):
            pool = [v.strip() for v in visible.split(",") if v.strip()]
            bad = [g for g in wanted if int(g) >= len(pool)]
            if bad:
                raise UserError(f"dist.gpus={gpus} asks for GPU {bad[0]} but only {len(pool)} are "
                                f"visible (CUDA_VISIBLE_DEVICES={visible}); dist.gpus counts within those.")
            chosen = ",".join(pool[int(g)] for g in wanted)
            notes.append(f"dist.gpus={gpus} selects CUDA_VISIBLE_DEVICES={chosen} (from {visible})")
        else:
            chosen = gpus
            notes.append(f"dist.gpus sets CUDA_VISIBLE_DEVICES={chosen}")
        os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    elif os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, ""):
        source = "SLURM" if os.environ.get("SLURM_STEP_GPUS") or os.environ.get("SLURM_JOB_GPUS") else "the environment"
        notes.append(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} (set by {source})")
    notes += _map_slurm_env()
    _check_launch_env()
    if cfg.train.deterministic:
        # cuBLAS needs a fixed workspace for deterministic GEMMs, and reads it when CUDA starts
        # (https://docs.nvidia.com/cuda/cublas/#results-reproducibility): set it here, before any CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Host tensors of 2 MiB and more (a batch's float copy, CPU activations) on transparent huge pages:
    # torch's own switch, read at its first CPU allocation, hence here. A fresh 38 MiB float batch
    # (64 x 3 x 224 x 224) costs ~30 ms of page faults in 4 KiB pages, ~5 ms in 2 MiB ones
    # (BENCHMARKS.md, "The JPEG data path"). THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return notes


def set_numerics(torch, train, cuda: bool) -> None:
    """train.deterministic / train.tf32 -> torch's global flags (called once CUDA is known to be there or not).

    TF32 (Ampere+) rounds fp32 matmul/conv inputs to a 10-bit mantissa: faster, not bit-reproducible
    across kernels. Deterministic mode also turns off cudnn's autotuner, whose pick may differ per run.
    """
    deterministic = bool(train.deterministic)
    tf32 = bool(train.tf32) and not deterministic
    torch.backends.cuda.matmul.allow_tf32 = tf32   # TF32 on Ampere+ matmuls/convs (timm, nanoGPT)
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cuda and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # prepare_env set it unless run in-process
        torch.use_deterministic_algorithms(True)


def _map_slurm_env():
    """`srun python train.py` (one task per GPU, no torchrun): derive torchrun's variables from SLURM's."""
    env = os.environ
    if "SLURM_PROCID" not in env or "RANK" in env or "TORCHELASTIC_RUN_ID" in env:
        if "TORCHELASTIC_RUN_ID" in env:            # torchrun under srun: torchrun's LOCAL_RANK wins
            for var in NODE_VARS:
                env.pop(var, None)
        return []
    ntasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")))
    if ntasks <= 1:
        return []
    nodes = slurm_hostnames(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
    if not nodes:
        raise UserError("running under srun with several tasks but SLURM_JOB_NODELIST is empty; "
                        "launch with srun inside an sbatch/salloc allocation.")
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(ntasks)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    env["LOCAL_WORLD_SIZE"] = per_node if per_node.isdigit() else str(max(1, ntasks // len(nodes)))
    env.setdefault("MASTER_ADDR", nodes[0])
    env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID", "0"))))
    notes = [f"srun launch: rank {env['RANK']}/{ntasks}, master {env['MASTER_ADDR']}:{env['MASTER_PORT']}"]
    visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    # The node-local rank and count (who is "first on the node" for downloads and caches) stay SLURM's
    # even where the device index differs from them (below).
    env["TRAIN_LOCAL_RANK"], env["TRAIN_LOCAL_WORLD_SIZE"] = env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]
    if len(visible) == 1 and int(env["LOCAL_WORLD_SIZE"]) > 1:
        # SLURM bound one GPU to each task (--gpus-per-task=1, --gpu-bind): this task's GPU is its
        # cuda:0. LOCAL_RANK is the device index Accelerate and DeepSpeed pick (cuda:<LOCAL_RANK>), so it
        # is 0 here, while TRAIN_LOCAL_RANK keeps SLURM_LOCALID for main_process_first and cache writes.
        env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"] = "0", "1"
        notes.append(f"SLURM bound GPU {visible[0]} to this task; it is this process's cuda:0 "
                     f"(task {env['TRAIN_LOCAL_RANK']} of {env['TRAIN_LOCAL_WORLD_SIZE']} on this node)")
    elif visible and int(env["LOCAL_RANK"]) < len(visible):
        local = env["LOCAL_RANK"]
        notes.append(f"task {local} of {env['LOCAL_WORLD_SIZE']} on this node uses cuda:{local} "
                     f"= GPU {visible[int(local)]} of CUDA_VISIBLE_DEVICES={','.join(visible)}")
    return notes


def node_local_rank(default: int = 0) -> tuple[int, int]:
    """(rank among this node's processes, their count), which is not always the device index: under
    `srun --gpus-per-task=1` every task's GPU is its cuda:0 (LOCAL_RANK=0), yet SLURM_LOCALID tells which
    one task of the node comes first. `default` is the rank when no launcher variable says."""
    env = os.environ
    rank = env.get("TRAIN_LOCAL_RANK", env.get("LOCAL_RANK", ""))
    world = env.get("TRAIN_LOCAL_WORLD_SIZE", env.get("LOCAL_WORLD_SIZE", "1"))
    return (int(rank) if rank.isdigit() else default), (int(world) if world.isdigit() else 1)


def slurm_port(job_id) -> int:
    """A port derived from the job id, so concurrent jobs on one node do not collide (as Lightning)."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return 15000 + int(digits[-4:]) % 5000


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand 'gpu[01-03,07],cpu1' like `scontrol show hostnames` (without needing scontrol)."""
    hosts, depth, token = [], 0, ""
    for ch in nodelist + ",":
        if ch == "," and depth == 0:
            if token:
                hosts += _expand_host(token)
            token = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        token += ch
    return hosts


def _expand_host(token):
    m = re.match(r"^(.*?)\[([^\]]+)\](.*)$", token)
    if not m:
        return [token]
    head, ranges, tail = m.groups()
    out = []
    for part in ranges.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += [f"{head}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(head + part)
    return [h for o in out for h in _expand_host(o + tail)]


def slurm_job_id(env=None) -> str:
    """The job id `scontrol requeue` wants: ARRAYJOB_TASK for an array task, else SLURM_JOB_ID."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def _check_launch_env():
    env = os.environ
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        if var in env and not env[var].isdigit():
            raise UserError(f"{var}={env[var]} is not a process count; check the launcher command (or unset it).")
    world = int(env.get("WORLD_SIZE", "1"))
    if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
        raise UserError(f"WORLD_SIZE={world} is set but MASTER_ADDR/MASTER_PORT are not; launch with torchrun, "
                        f"accelerate launch or srun (which set them), or unset WORLD_SIZE for one process.")
    for var in ("RANK", "LOCAL_RANK"):
        if var in env and not env[var].isdigit():
            raise UserError(f"{var}={env[var]} is not a process index; check the launcher command.")
    if int(env.get("RANK", "0")) >= world:
        raise UserError(f"RANK={env['RANK']} is not below WORLD_SIZE={world}; check the launcher command.")


def check_gpu_count(visible_gpus: int) -> None:
    """Refuse more processes on this node than it has visible GPUs (before any of them uses one)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world > visible_gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        raise UserError(f"{local_world} processes were started on this node but only {visible_gpus} GPUs are "
                        f"visible (CUDA_VISIBLE_DEVICES={visible}); start at most {visible_gpus} processes per "
                        f"node (--nproc_per_node / --ntasks-per-node) or make more GPUs visible.")


def is_distributed() -> bool:
    """Whether a launcher started this process as one of a group (torchrun's variables are set)."""
    env = os.environ
    return "LOCAL_RANK" in env and int(env.get("WORLD_SIZE", "1")) >= 1 and "RANK" in env


def detect_launcher() -> str:
    env = os.environ
    if any(k.startswith("ACCELERATE_") for k in env) and "TORCHELASTIC_RUN_ID" in env:
        return "accelerate launch"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "SLURM_PROCID" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        return "srun"
    return "python"


def process_rank() -> int:
    """This process's rank from the launcher's variables (before setup; 0 when not distributed)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            if var == "SLURM_PROCID" and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
                continue
            return int(os.environ[var])
    return 0


def restart_count() -> int:
    """Which attempt of a torchrun job this is (0 for the first; --max-restarts counts up)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def env_info(**facts) -> dict:
    """What env.json records: versions, commit, host, devices, then the runtime's `facts`."""
    import torch
    info = {
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "accelerate": package_version("accelerate"), "deepspeed": package_version("deepspeed"),
        "torchvision": package_version("torchvision"), "numpy": package_version("numpy"),
        "git_commit": git_commit(), "host": socket.gethostname(), "platform": platform.platform(),
        **facts,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "torch_threads": torch.get_num_threads(), "host_huge_pages": host_huge_pages(torch), "argv": sys.argv,
    }
    return info


def host_huge_pages(torch) -> bool:
    """Whether torch puts large host tensors on transparent huge pages (THP_MEM_ALLOC_ENABLE was set
    before its first CPU allocation): its allocator then aligns them to the page, where glibc's mmap
    of a 64 MiB block (never touched here, so never paged in) leaves them 64 bytes past it."""
    return torch.empty(64 << 20, dtype=torch.uint8).data_ptr() % 4096 == 0


def package_version(pkg: str):
    """The installed version of `pkg`, or None when it is not installed."""
    from importlib import metadata
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def git_commit():
    """The repository's HEAD commit, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
