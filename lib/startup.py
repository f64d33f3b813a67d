"""How every entry script starts a run once its pre-flight check passed: the runtime (GPU selection,
processes, precision, seeds), the run directory (resume it, start fresh, or refuse; nothing is
written yet) and the data, the runtime and the data each described in a line on rank 0.
"""
from lib import checkpoint, runtime
from lib.data import Data, build_data


def start(cfg, *, read_only: bool = False,
          **runtime_options) -> tuple[runtime.Runtime, checkpoint.Run, Data]:
    """(runtime, run directory, data) for `cfg`; read_only opens the run directory without ever
    writing to it (evaluation only); runtime_options go to runtime.setup."""
    rt = runtime.setup(cfg, runtime.prepare_env(cfg), **runtime_options)
    rt.print0(f"runtime: {rt.describe()}" + "".join(f"\n  {n}" for n in rt.notes))
    run = checkpoint.Run(cfg, rt, force=cfg._force, read_only=read_only)
    data = build_data(cfg, rt)      # a uint8 tensor on the device (memory loader) or a DataLoader
    rt.print0(f"data: {data.describe()}")
    return rt, run, data
