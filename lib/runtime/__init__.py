"""The runtime: processes, devices, precision, seeds and collectives. The only package that reads the
launcher's environment variables or touches torch.distributed / Accelerate.

The same script runs under `python`, `torchrun`, `accelerate launch` and `srun`:

    prepare_env(cfg)      before CUDA is initialised: dist.gpus -> CUDA_VISIBLE_DEVICES, SLURM -> RANK...
    rt = setup(cfg)       Accelerator (DDP over NCCL or gloo, DeepSpeed), checks, seeds, signal flags
    model, optimizer = rt.prepare(model, optimizer)   DDP wrap (or the DeepSpeed engine)
    with rt.no_sync(model, not update), rt.autocast(): ...; rt.backward(loss)
    rt.clip_grad_norm_(optimizer, params, max_norm); rt.step(optimizer)
    rt.all_reduce_(t); rt.barrier(); rt.print0(...); rt.shutdown()

    launch.py     GPU selection, SLURM -> torchrun variables, launcher checks, what env.json records
    dist.py       the process group: start, collectives, leave, exit_now
    precision.py  autocast, GradScaler, clipping on unscaled gradients, the skippable step
    deepspeed.py  DeepSpeed's plugin, checks and batch/clipping agreement
    signals.py    stop-signal handlers, SLURM requeue, the stop marker, fault-test pauses
    faults.py     crash reports (one traceback, rank named, out-of-memory advice), fault injection
    core.py       the Runtime that composes them, setup()
"""
from lib.runtime import core
from lib.runtime.core import Runtime, peer_failure, setup
from lib.runtime.deepspeed import deepspeed_requested
from lib.runtime.dist import check_world_size, exit_now
from lib.runtime.launch import (LAUNCH_VARS, detect_launcher, git_commit, prepare_env, process_rank, restart_count,
                                slurm_hostnames, slurm_job_id, slurm_port)

__all__ = ["CURRENT", "LAUNCH_VARS", "Runtime", "check_world_size", "deepspeed_requested", "detect_launcher",
           "exit_now", "git_commit", "peer_failure", "prepare_env", "process_rank", "restart_count", "setup",
           "slurm_hostnames", "slurm_job_id", "slurm_port"]


def __getattr__(name):
    # CURRENT is reassigned by setup() and shutdown() in core; read it there on every access
    # (lib/cli.py shuts the runtime down through lib.runtime.CURRENT on errors).
    if name == "CURRENT":
        return core.CURRENT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
