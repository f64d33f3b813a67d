"""The decode cache: tensors decoded from source files, kept in a .cache folder next to them and
decoded again when a source changes (its size or mtime), written atomically by one process.
"""
import hashlib
import os
from pathlib import Path

import torch

from lib.io import save_torch


def disk_cache_key(tag, sources, extra=()):
    """16 hex digits from every source's path, size and mtime, the tag and `extra`."""
    h = hashlib.sha1()
    for p in sources:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns};".encode())
    h.update(repr((tag, tuple(extra))).encode())
    return h.hexdigest()[:16]


def disk_cached(tag, sources, build, enabled=True, write=True, extra=(), folder=None, check=None):
    """build() once per source version; the result (tensors) is cached next to the first source.

    The key holds every source's size and mtime, so an edited file is decoded again. Writes are
    atomic (lib.io) and only done by one process per node; a read-only data directory simply
    means no cache. check(result), when given, runs on fresh and cached results alike, before
    anything is written: data that is refused leaves no cache behind.
    """
    check = check or (lambda result: None)
    if not enabled:
        result = build()
        check(result)
        return result
    folder = Path(folder or Path(sources[0]).parent) / ".cache"
    key = disk_cache_key(tag, sources, extra)
    path = folder / f"{tag}-{key}.pt"
    cached = None
    if path.is_file():
        try:
            cached = tuple(torch.load(path, weights_only=True))
        except Exception:
            pass  # a damaged cache is rebuilt below
    if cached is not None:
        check(cached)
        return cached
    result = build()
    check(result)
    if write:
        try:
            folder.mkdir(exist_ok=True)
            save_torch(list(result), path)
            for old in folder.glob(f"{tag}-*.pt"):
                if old != path:
                    old.unlink(missing_ok=True)
        except OSError:
            pass
    return result
