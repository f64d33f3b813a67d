"""Files that are never half-written, and checksums. The one place for atomic writes: checkpoints and
their .sha256 sidecars, config.yaml, env.json, metrics files, plots, sample grids, decode caches.

    with atomic_file(path) as f: f.write(...)   # a temporary sibling, fsynced, renamed over path
    write_text(path, text); save_torch(obj, path); link(src, dst); sha256_file(path)

A reader (or a process killed mid-write) sees the old file or the new one, never a part of either;
on an error the temporary file is removed and the old file is untouched.
"""
import contextlib
import hashlib
import os
import shutil
from pathlib import Path


def _temporary(path: Path) -> Path:
    """A hidden sibling in the same directory (so the rename stays on one file system)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def _replacing(path: Path):
    """Yield a temporary sibling of `path`; on a clean exit rename it over `path` and fsync the
    directory, on any error remove it and re-raise (the old `path` is untouched either way)."""
    tmp = _temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """Open a temporary sibling of `path` for writing; on a clean exit flush, fsync, rename it over
    `path` and fsync the directory; on any error remove it and re-raise."""
    with _replacing(Path(path)) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_text(path, text):
    with atomic_file(path, "w") as f:
        f.write(text)


def save_torch(obj, path):
    """torch.save, atomically."""
    import torch
    with atomic_file(path) as f:
        torch.save(obj, f)


def link(src, dst):
    """Make `dst` name the same file as `src` (a hard link, or a copy where links are not supported),
    replacing `dst` atomically."""
    with _replacing(Path(dst)) as tmp:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())


def fsync_dir(path):
    """Make a rename in `path` durable (best effort: some file systems refuse a directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
