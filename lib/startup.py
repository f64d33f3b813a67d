"""How every entry script starts a run once its pre-flight check passed: the runtime (GPU selection,
processes, precision, seeds), the run directory (resume it, start fresh, or refuse; nothing is
written yet) and the data, the runtime and the data each described in a line on rank 0.
"""
import os
import socket

from lib import checkpoint, runtime
from lib.data import Data, build_data


def start(cfg, *, read_only: bool = False,
          **runtime_options) -> tuple[runtime.Runtime, checkpoint.Run, Data]:
    """(runtime, run directory, data) for `cfg`; read_only opens the run directory without ever
    writing to it (evaluation only); runtime_options go to runtime.setup."""
    rt = runtime.setup(cfg, runtime.prepare_env(cfg), **runtime_options)
    rt.print0(f"runtime: {rt.describe()}" + "".join(f"\n  {n}" for n in rt.notes))
    print_ranks(rt, cfg.log.verbose)
    run = checkpoint.Run(cfg, rt, force=cfg._force, read_only=read_only)
    data = build_data(cfg, rt)      # a uint8 tensor on the device (memory loader) or a DataLoader
    rt.print0(f"data: {data.describe()}")
    return rt, run, data


def print_ranks(rt, verbose):
    """Where each rank computes: one line from rank 0 with every rank's facts gathered, or (verbose)
    a line from each rank."""
    if rt.world_size <= 1:
        return
    facts = (socket.gethostname(), str(rt.device), os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
    if verbose:
        print(f"[rank {rt.rank}/{rt.world_size}] host {facts[0]}, device {facts[1]}, "
              f"CUDA_VISIBLE_DEVICES={facts[2]}", flush=True)
        return
    rt.print0(f"ranks: {rank_summary(rt.gather_object(facts))}")


def rank_summary(facts):
    """'2 ranks on 1 host: nodeA [0 cpu, 1 cpu]; CUDA_VISIBLE_DEVICES unset on every rank' from
    [(host, device, CUDA_VISIBLE_DEVICES) of rank 0, of rank 1, ...]."""
    same_cvd = len({f[2] for f in facts}) == 1
    hosts = {}
    for rank, (host, device, cvd) in enumerate(facts):
        hosts.setdefault(host, []).append(f"{rank} {device}" + ("" if same_cvd else f" (CVD={cvd})"))
    where = "; ".join(f"{h} [{', '.join(r)}]" for h, r in hosts.items())
    tail = f"; CUDA_VISIBLE_DEVICES={facts[0][2]} on every rank" if same_cvd else ""
    return f"{len(facts)} ranks on {len(hosts)} host(s): {where}{tail}"
