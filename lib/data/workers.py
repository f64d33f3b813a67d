"""The life of the DataLoader worker processes: what they do with the stop signals, and how they end
when Python exits.

    worker_init_fn=ignore_stop_signals   # every DataLoader of the package
    stopped_at_exit(dataloader)          # its persistent workers are ended at exit, not waited for forever
"""
import atexit
import signal
import weakref

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP")
_LIVE = weakref.WeakSet()                   # DataLoaders whose workers _end_workers_at_exit ends


def ignore_stop_signals(worker_id=None):
    """worker_init_fn of every DataLoader: a worker ignores the stop signals. SLURM and `kill -- -PGID`
    signal the whole process group, workers included; a worker that died of SIGTERM made the main
    process fail with "DataLoader worker ... is killed by signal" before it could write its stop
    checkpoint. The main process owns shutdown: it stops at the next step boundary and ends the
    workers itself (they also exit when it is gone)."""
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def stopped_at_exit(dataloader):
    """Have this DataLoader's workers ended when Python exits (see _end_workers_at_exit)."""
    _LIVE.add(dataloader)


@atexit.register
def _end_workers_at_exit():
    """Ends the workers of every registered DataLoader still alive when Python exits. They ignore
    SIGTERM (above), and multiprocessing's own exit handler (registered before this one, so it runs
    after it) ends daemonic children with SIGTERM and then joins them: a loader still referenced at
    exit (a global, a failed test's traceback) hung the exit forever. Here each is told to stop as the
    DataLoader stops its workers, and a worker that does not is killed."""
    for dataloader in list(_LIVE):
        it = getattr(dataloader, "_iterator", None)
        if it is None:
            continue
        it._shutdown_workers()
        for w in getattr(it, "_workers", []):
            if w.is_alive():
                w.kill()
