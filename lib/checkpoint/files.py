"""What a checkpoint file holds, and writing and reading one: the save with its .sha256 commit
marker, the verified load, a user-named file, the periodic files of a run, and loading the entries
back into live objects.

A checkpoint is one file, a dict with these keys:

    model | generator, discriminator, ...   unwrapped state_dicts (no DDP / compile prefixes)
    optimizer, scheduler, scaler           their state_dicts (GAN: opt_g, opt_d, ...)
    epoch, batch, step, best, best_epoch   the loop position; batch > 0 means mid-epoch
    samples                                samples of the epoch's global order consumed (any layout)
    skipped_steps, meter                   updates skipped (on_nonfinite=skip); the epoch's running sums
    rng                                    one entry per rank: python, numpy, torch (and cuda) states
    config                                 the resolved config (a plain dict)
    world_size, format, saved_at, metrics  bookkeeping

Everything is tensors and plain Python values, so it loads with torch.load(weights_only=True).

A file is written atomically (lib.io) and then committed by writing `<file>.sha256`, its SHA-256, the
same way. A file with a `.sha256` next to it must match it when read (torch.load alone misses flipped
bits); a periodic file without one was never committed (its save was cut short).
"""
from pathlib import Path

import torch

from lib.errors import UserError
from lib.io import save_torch, sha256_file, write_text

FORMAT = 1


def sidecar(path) -> Path:
    """The commit marker and checksum of checkpoint `path`: `path`.sha256."""
    return Path(str(path) + ".sha256")


def atomic_save(obj, path, commit=False):
    """torch.save `obj` to `path` atomically (never a partial file); commit=True then writes
    path.sha256 (the commit marker and checksum) and returns the digest."""
    save_torch(obj, path)
    if not commit:
        return None
    digest = sha256_file(path)
    write_text(sidecar(path), digest + "\n")
    return digest


def load(path) -> dict:
    """A checkpoint dict, loaded safely (weights_only=True); raises ValueError if it is damaged
    (a checksum that does not match its .sha256, a truncated file, foreign pickled objects)."""
    marker = sidecar(path)
    if marker.exists():
        expected = marker.read_text().strip()
        if sha256_file(path) != expected:
            raise ValueError(f"{path} is damaged (its SHA-256 does not match {marker.name})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated zip, bad pickle, refused globals: all mean "not a valid checkpoint"
        raise ValueError(f"{path} is damaged or not a checkpoint of this package ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def load_user_file(path, key, kind="a .pt/.pth state dict or a checkpoint of this package") -> dict:
    """load() for a file the user named (`key`=path): a missing or damaged file is a UserError."""
    try:
        return load(path)
    except FileNotFoundError:
        raise UserError(f"{key}={path}: no such file; give {kind}.") from None
    except ValueError as e:
        raise UserError(f"{key}: {e}.") from None


def periodic_files(ckpt_dir, committed=False) -> list[Path]:
    """Periodic checkpoints, newest (highest step) first (only those with a .sha256 if committed)."""
    files = [p for p in Path(ckpt_dir).glob("step_*.pt") if p.stem[5:].isdigit()]
    if committed:
        files = [p for p in files if sidecar(p).exists()]
    return sorted(files, key=lambda p: int(p.stem[5:]), reverse=True)


def restore_objects(ckpt, objects, path):
    """Load each entry of the checkpoint dict `ckpt` into the object of the same name (load_state_dict,
    or an in-place copy for a tensor); a missing or mismatched entry is a UserError naming `path`."""
    for name, obj in objects.items():
        if name not in ckpt:
            raise UserError(f"{path} has no '{name}' entry; it was not written by this script.")
        if hasattr(obj, "load_state_dict"):
            planned = getattr(obj, "total_steps", None)       # OneCycleLR fixes its cycle's length
            try:
                obj.load_state_dict(ckpt[name])
            except (RuntimeError, ValueError, KeyError) as e:
                raise UserError(f"{path} does not fit this run's {name}: {str(e).splitlines()[0][:200]}") from None
            if planned is not None and obj.total_steps != planned:
                raise UserError(f"{path} was trained with sched.name=onecycle over {obj.total_steps} optimizer "
                                f"steps, but train.epochs / train.max_steps now give {planned}; a one-cycle "
                                f"schedule cannot be stretched mid-run. Resume with the original train.epochs and "
                                f"train.max_steps, or start a new run (another name=..., with model.weights="
                                f"{path} to start from these weights).")
        elif torch.is_tensor(obj):
            obj.copy_(ckpt[name])
