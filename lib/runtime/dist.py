"""The process group: starting it (each torchrun restart under its own store prefix), the collectives
the training loop uses, leaving it, and ending a process that ran one. Every collective is a no-op
(or returns its input) in a single process, so callers never branch on the world size.

    init_process_group(backend, timeout_s); control = make_control_group()
    all_reduce_(t, world_size); mean(t, world_size); gather_object(obj, world_size)
    broadcast_object(obj, world_size); agree(flag, world_size, control)
    with main_process_first(is_main, local_rank, world_size, barrier): ...
    leave_process_group(ok, control); exit_now(code)
"""
import contextlib
import datetime
import os
import sys
import time

from lib.errors import UserError
from lib.runtime.launch import restart_count

_GROUP_STARTED = False   # this process joined a process group (see exit_now)
_STORE = None            # the rendezvous store of this attempt (to ask which rank stopped answering)
_TIMEOUT_S = None        # dist.timeout_s, which every group of this process honours

# What a collective's error says when another process died or hung (gloo, NCCL's watchdog).
_PEER_SIGNS = ("Timed out waiting", "timed out", "Connection closed by peer", "Connection reset by peer",
               "Broken pipe", "connectFullMesh", "Watchdog caught collective operation timeout")


def init_process_group(backend: str, timeout_s: float) -> None:
    """Start the process group ourselves (Accelerate then adopts it), with the rendezvous keys of
    each torchrun restart under their own prefix.

    torchrun's workers share the agent's TCPStore across restarts (torch/distributed/rendezvous.py:
    "no need to add prefix for each attempt"), so after `--max-restarts` a new attempt can read the
    dead attempt's gloo addresses: we measured 8 failures in 12 restarts (refused connections, hangs),
    12 of 12 successes with a per-attempt prefix (cf. pytorch PR #61590, pytorch#167288).
    """
    import torch.distributed as tdist
    global _GROUP_STARTED, _STORE, _TIMEOUT_S
    _TIMEOUT_S = timeout_s
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1 or tdist.is_initialized():
        return
    rank = int(env["RANK"])
    timeout = datetime.timedelta(seconds=timeout_s)
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        store = tdist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world,
                               is_master=not agent_store and rank == 0, timeout=timeout,
                               wait_for_workers=False, multi_tenant=not agent_store)
        store = tdist.PrefixStore(f"/train/attempt_{restart_count()}", store)
        tdist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        _GROUP_STARTED, _STORE = True, store
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"process {rank} of {world} could not join the others at {env['MASTER_ADDR']}:"
                        f"{env['MASTER_PORT']} ({str(e).splitlines()[0][:160]}); check MASTER_ADDR/MASTER_PORT, "
                        f"the network between nodes, and that every process was started.") from None


def check_world_size(launched: int, seen: int, kind: str) -> None:
    """Training must see every process the launcher started (Accelerate without cpu=True on a CUDA-less
    machine silently runs N independent single-process jobs; we refuse that)."""
    if launched != seen:
        raise UserError(f"the launcher started {launched} processes but training sees {seen} (distributed type "
                        f"{kind}); check the launch command and that every process can reach MASTER_ADDR.")


def make_control_group(timeout_s=None):
    """A gloo group for tiny control-plane reductions (stop flags), so they never sync the GPU; it
    honours dist.timeout_s like the main group (new_group's default is 30 minutes)."""
    import torch.distributed as tdist
    if tdist.get_backend() == "gloo":
        return tdist.group.WORLD
    timeout_s = timeout_s if timeout_s is not None else _TIMEOUT_S
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    return tdist.new_group(backend="gloo", timeout=timeout)


def backend_name() -> str:
    """The running process group's backend ('gloo', 'nccl'), or 'none'."""
    import torch.distributed as tdist
    return tdist.get_backend() if tdist.is_initialized() else "none"


# -- collectives ------------------------------------------------------------------------------

def all_reduce_(tensor, world_size, op="sum"):
    """In-place sum/max/min over all processes (a no-op in one process)."""
    if world_size > 1:
        import torch.distributed as tdist
        ops = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}
        tdist.all_reduce(tensor, op=ops[op])
    return tensor


def mean(tensor, world_size):
    """The mean of a scalar tensor over all processes."""
    if world_size == 1:
        return tensor
    t = tensor.detach().clone().float()
    all_reduce_(t, world_size)
    return t / world_size


def gather_object(obj, world_size):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world_size == 1:
        return [obj]
    import torch.distributed as tdist
    out = [None] * world_size
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, world_size):
    """Rank 0's obj on every rank (decisions are made once and shared, never re-derived)."""
    if world_size == 1:
        return obj
    import torch.distributed as tdist
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def agree(flag, world_size, group):
    """True on every rank if `flag` is true on any rank (a control-plane MAX over the gloo `group`)."""
    if world_size == 1:
        return bool(flag)
    import torch
    import torch.distributed as tdist
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=group)
    return bool(t.item())


@contextlib.contextmanager
def main_process_first(is_main, local_rank, world_size, barrier):
    """Rank 0 runs the block first (e.g. a download), then each node's first process, then the rest."""
    if world_size == 1:
        yield
        return
    first = is_main
    node_first = local_rank == 0 and not first
    if not first:
        barrier()                      # A: wait for rank 0
        if not node_first:
            barrier()                  # B: wait for this node's first process
    try:
        yield
    finally:
        if first:
            barrier()
            barrier()
        elif node_first:
            barrier()


# -- leaving ----------------------------------------------------------------------------------

def leave_process_group(ok: bool, control_group) -> None:
    """Leave the process group cleanly (a barrier first when `ok`, so no rank tears down mid-collective)."""
    import torch.distributed as tdist
    global _GROUP_STARTED
    if tdist.is_available() and tdist.is_initialized():
        _GROUP_STARTED = True
        if ok:
            with contextlib.suppress(Exception):
                tdist.barrier(group=control_group)
        with contextlib.suppress(Exception):
            tdist.destroy_process_group()


def peer_failure(err, world_size, timeout_s):
    """A sentence for an error that means another process of the job stopped answering (a collective
    timed out after dist.timeout_s, or its connection broke), else None."""
    import torch.distributed as tdist
    if world_size <= 1 or not tdist.is_initialized():
        return None
    backend_errors = tuple(getattr(tdist, n) for n in ("DistBackendError", "DistNetworkError") if hasattr(tdist, n))
    text = str(err)
    if not (isinstance(err, backend_errors) or isinstance(err, RuntimeError) and any(s in text for s in _PEER_SIGNS)):
        return None
    first = text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__
    silent = silent_ranks(world_size, tdist.get_rank())
    who = f": rank {', '.join(map(str, silent))}" if silent else ""
    return (f"another process of this job stopped answering{who} ({first}); this process waited "
            f"dist.timeout_s={timeout_s:g} s. Look at the other ranks' output for the cause "
            f"(an error, a hang, a killed process); the last checkpoint is intact.")


def silent_ranks(world_size, rank, wait_s=3.0):
    """The ranks that stopped answering: every rank that sees a peer failure checks in at the store
    (it outlives a dead rank under torchrun: the agent serves it); those that have not checked in
    after wait_s are named. [] when the store cannot tell."""
    if _STORE is None:
        return []
    keys = [f"stopped_answering/{r}" for r in range(world_size)]
    try:
        _STORE.set(keys[rank], "1")
        deadline = time.monotonic() + wait_s
        while True:
            if _STORE.check(["crashed"]):           # a rank that raised said so before it left
                return [int(_STORE.get("crashed"))]
            silent = [r for r in range(world_size) if not _STORE.check([keys[r]])]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.1)
    except Exception:        # the store itself is gone (its host died)
        return []


def mark_crashed(rank):
    """Tell the other ranks (through the store) that this rank is leaving on an exception."""
    if _STORE is not None:
        with contextlib.suppress(Exception):
            if not _STORE.check(["crashed"]):
                _STORE.set("crashed", str(rank))


def exit_now(code):
    """End a process that ran a process group without the interpreter's final teardown.

    Gloo's worker threads outlive destroy_process_group() while anything refers to the group, and
    a DDP module's C++ reducer keeps it referenced even after the module is freed. In the final
    teardown such a thread can still be freeing the tensors of the last collective; it needs the
    GIL, Python no longer hands it out, and the process aborts with 'terminate called without an
    active exception' (SIGABRT after a successful run: 3 in 24 torchrun launches here with the CPUs
    loaded; gdb shows ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> take_gil in Py_FinalizeEx).
    So, after the run has said everything: run the atexit handlers (wandb, multiprocessing's
    worker clean-up, logging) and the garbage collector while Python is whole, flush, and leave
    with os._exit. Processes that never joined a group return and exit normally.
    """
    if not _GROUP_STARTED:
        return code
    import atexit
    import gc
    gc.collect()                 # DataLoader iterators shut their workers down in __del__
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
