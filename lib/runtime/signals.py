"""Stop signals and what follows them: handlers that only record the request, requeueing the SLURM
job, the marker file for the batch script, and the pause that fault-injection tests kill a run in.

    install_handlers(handler, (signal.SIGTERM, signal.SIGUSR1), saved); restore_handlers(saved)
    received = next_stop_signal(received, signum)      # the handler's whole logic
    requeue_slurm_job(received); write_stop_marker(text)
    fault_pause_step(rank); pause_for_fault_test(rank, lambda: received)

The caller (the Runtime) holds the received signal's name and the replaced handlers; every rank
agrees on stopping through a collective (Runtime.should_stop), never in a handler.
"""
import contextlib
import os
import signal
import subprocess
import threading
import time

from lib.runtime.launch import restart_count, slurm_job_id

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def install_handlers(handler, signals, saved: dict) -> None:
    """Make `handler` handle `signals`, keeping the handlers it replaces in `saved` (signal -> handler).
    Only the main thread can install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in signals:
        if sig not in saved:
            saved[sig] = signal.signal(sig, handler)


def restore_handlers(saved: dict, only=None) -> None:
    """Put back the handlers in `saved` (`only` these signals), removing them from it."""
    for sig in [s for s in saved if only is None or s in only]:
        signal.signal(sig, saved.pop(sig))


def next_stop_signal(received, signum):
    """The stop request after signal `signum` arrives, `received` being the name of the first one so
    far (or None). A second Ctrl-C while already stopping for Ctrl-C exits at once (status 130).

    A cluster asks more than once: at a time limit or preemption SLURM signals every process of
    the step *and* the batch shell, whose trap and torchrun forward it again. Repeats of
    TERM/USR1 are the same request; only a second Ctrl-C means "now".
    """
    if signum == signal.SIGINT and received == "SIGINT":
        os._exit(128 + signum)
    return received or signal.Signals(signum).name


def requeue_slurm_job(received):
    """After a stop by SIGUSR1/SIGTERM (`received`) in a SLURM job launched by our sbatch templates
    (REQUEUE_ON_SIGNAL=1): `scontrol requeue <job>` (array-aware). Returns what was done, or None."""
    env = os.environ
    if "SLURM_JOB_ID" not in env or env.get("REQUEUE_ON_SIGNAL") != "1" \
            or received not in ("SIGUSR1", "SIGTERM"):
        return None
    job = slurm_job_id(env)
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except FileNotFoundError:
        return f"not requeued: scontrol is not on PATH (requeue job {job} by hand)"
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        out = getattr(e, "stdout", b"") or b""
        return f"requeue of job {job} failed: {out.decode(errors='replace').strip() or e}"
    return f"requeued SLURM job {job}"


def write_stop_marker(text) -> None:
    """After a graceful stop, write `text` to $TRAIN_STOP_MARKER when the launcher asked for it
    (slurm/launch.sh does): torchrun exits non-zero after forwarding a signal even when every worker
    stopped cleanly, so the batch script judges by this file instead."""
    path = os.environ.get("TRAIN_STOP_MARKER")
    if not path:
        return
    with contextlib.suppress(OSError):
        with open(path, "w") as f:
            f.write(text + "\n")


def fault_pause_step(rank):
    """The optimizer step after which fault-injection tests hold this rank, or None.

    TRAIN_FAULT_PAUSE_AT_STEP=N holds every rank (or only rank TRAIN_FAULT_PAUSE_RANK) after optimizer
    step N, its log line and checkpoints written, until it is killed; only in a launcher's first attempt.
    """
    pause = os.environ.get("TRAIN_FAULT_PAUSE_AT_STEP", "")
    who = os.environ.get("TRAIN_FAULT_PAUSE_RANK", "")
    return int(pause) if pause.isdigit() and restart_count() == 0 and \
        (not who.isdigit() or int(who) == rank) else None


def pause_for_fault_test(rank, received):
    """Hold this process until a signal arrives (`received()` returns its name), then exit with
    128 + that signal's number, as if it had killed the process; or, with TRAIN_FAULT_PAUSE_THEN=
    continue, go on training, so the stop signal takes its normal course at the next step boundary
    (while the DataLoader workers, signalled too, are still needed)."""
    print(f"[rank {rank}] paused for a fault test (TRAIN_FAULT_PAUSE_AT_STEP)", flush=True)
    while received() is None:     # a launcher's SIGTERM ends the pause (and the process)
        time.sleep(0.05)
    if os.environ.get("TRAIN_FAULT_PAUSE_THEN") == "continue":
        return
    os._exit(128 + signal.Signals[received()].value)
