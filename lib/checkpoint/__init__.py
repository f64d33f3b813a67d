"""Checkpoints and the run directory.

    files.py    what a checkpoint holds; the committed save, the verified load, periodic files
    resume.py   resume, start fresh, or refuse, from the run directory and checkpoint.resume
    run.py      Run: the run directory, saving (a collective), pruning, best.pt, restoring
"""
from lib.checkpoint.files import (FORMAT, atomic_save, load, load_user_file, periodic_files, restore_objects,
                                  sidecar)
from lib.checkpoint.resume import HARMLESS
from lib.checkpoint.run import Run

__all__ = ["FORMAT", "HARMLESS", "Run", "atomic_save", "load", "load_user_file", "periodic_files",
           "restore_objects", "sidecar"]
