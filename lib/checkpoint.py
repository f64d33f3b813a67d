"""The run directory and its checkpoints: what a checkpoint holds, atomic saves, validated loads,
and the decision to resume, start fresh, or refuse.

A checkpoint is one file, a dict with these keys (DESIGN.md section 3):

    model | generator, discriminator, ...   unwrapped state_dicts (no DDP / compile prefixes)
    optimizer, scheduler, scaler           their state_dicts (GAN: opt_g, opt_d, ...)
    epoch, batch, step, best, best_epoch   the loop position (LoopState); batch > 0 means mid-epoch
    skipped_steps, meter                   updates skipped (on_nonfinite=skip); the epoch's running sums
    rng                                    one entry per rank: python, numpy, torch (and cuda) states
    config                                 the resolved config (a plain dict)
    world_size, format, saved_at, metrics  bookkeeping

Everything is tensors and plain Python values, so it loads with torch.load(weights_only=True).

Writes: rank 0 writes `step_XXXXXXXX.pt` to a temporary file in the same directory, flushes and
fsyncs it, renames it, fsyncs the directory, then commits it by writing `step_XXXXXXXX.pt.sha256`
(its SHA-256) the same way, then points `last.pt` (and `best.pt`) at it with a hard link made the
same way; old periodic files are pruned only after all of that succeeded. Every rank then learns
whether the save worked, so no rank waits on a collective the others skip.

Reads: a file with a `.sha256` next to it must match it (torch.load alone misses flipped bits);
resuming picks the newest *committed* periodic checkpoint that verifies and loads, warning about
each one it skips, and only then falls back to last.pt.
"""
import datetime
import errno
import hashlib
import os
import shutil
import time
from pathlib import Path

import torch

from lib.config import dump, to_dict
from lib.errors import RunError, UserError

FORMAT = 1
# Keys whose change does not make a resumed run a different experiment.
HARMLESS = ("name", "output_dir", "train.epochs", "train.max_steps", "train.log_every", "train.eval_every_epochs",
            "train.eval_only", "train.compile", "train.compile_mode", "train.compile_backend", "data.num_workers",
            "data.loader", "data.cache", "data.root", "data.download", "data.memory_limit_gb", "data.eval_batch_size",
            "checkpoint.", "log.", "dist.")


def atomic_save(obj, path, commit=False):
    """torch.save to a temporary sibling, fsync, rename, fsync the directory; never a partial file.
    commit=True also writes path.sha256 (the commit marker and checksum) afterwards."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(tmp) if commit else None
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if commit:
        atomic_write_text(sidecar(path), digest + "\n")
    return digest


def sidecar(path):
    return Path(str(path) + ".sha256")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def atomic_link(src, dst):
    """Make `dst` name the same file as `src` (hard link, or a copy where links are not supported)."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


def atomic_write_text(path, text):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path):
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


def load(path):
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


def load_user_file(path, key, kind="a .pt/.pth state dict or a checkpoint of this package"):
    """load() for a file the user named (`key`=path): a missing or damaged file is a UserError."""
    try:
        return load(path)
    except FileNotFoundError:
        raise UserError(f"{key}={path}: no such file; give {kind}.") from None
    except ValueError as e:
        raise UserError(f"{key}: {e}.") from None


def periodic_files(ckpt_dir, committed=False):
    """Periodic checkpoints, newest (highest step) first (only those with a .sha256 if committed)."""
    files = [p for p in Path(ckpt_dir).glob("step_*.pt") if p.stem[5:].isdigit()]
    if committed:
        files = [p for p in files if sidecar(p).exists()]
    return sorted(files, key=lambda p: int(p.stem[5:]), reverse=True)


def _diff(old, new, prefix=""):
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        dotted = prefix + str(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, dotted + ".")
        elif a != b and not any(dotted == h or (h.endswith(".") and dotted.startswith(h)) for h in HARMLESS):
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out


class Run:
    """One run directory, <output_dir>/<name>: decide how to start, then save and restore checkpoints."""

    def __init__(self, cfg, rt, force=False, read_only=False):
        self.cfg, self.rt, self.read_only = cfg, rt, read_only
        self.dir = Path(cfg.output_dir) / cfg.name
        self.ckpt_dir = self.dir / "checkpoints"
        self.resume_path = None
        self.last_saved = None
        self.resumed_from = None
        plan = self._plan(force) if rt.is_main else None
        plan = rt.broadcast_object(plan)
        if plan["error"]:
            raise UserError(plan["error"])
        self.resume_path = plan["resume"]
        self._move_aside = plan["move_aside"]
        for w in plan["warnings"]:
            rt.print0(f"warning: {w}")

    # -- deciding ----------------------------------------------------------------------------

    def _plan(self, force):
        """Rank 0 decides (others must not re-derive it from a file system they may see differently)."""
        try:
            return self._decide(force)
        except UserError as e:
            return {"error": str(e), "resume": None, "warnings": [], "move_aside": False}

    def _decide(self, force):
        c = self.cfg.checkpoint
        plan = {"error": None, "resume": None, "warnings": [], "move_aside": False}
        if self.read_only and c.resume in ("auto", "never"):   # --eval-only: read the newest checkpoint, if any
            if c.resume == "auto" and self._has_checkpoints():
                path, skipped = self._newest_valid()
                plan["resume"] = str(path) if path else None
                plan["warnings"] += [f"skipping damaged checkpoint: {s}" for s in skipped]
            return plan
        exists = self.dir.is_dir() and any(self.dir.iterdir())
        if c.resume not in ("auto", "never"):
            path = Path(c.resume)
            if path.is_dir():
                path = path / "last.pt" if (path / "last.pt").exists() else path / "checkpoints" / "last.pt"
            if not path.is_file():
                raise UserError(f"checkpoint.resume={c.resume}: no such checkpoint file; give a .pt file "
                                f"written by this package, or use checkpoint.resume=auto.")
            try:
                load(path)
            except ValueError as e:
                raise UserError(f"checkpoint.resume: {e}; pick another checkpoint.") from None
            plan["resume"] = str(path)
            if exists and Path(path).resolve().parent != self.ckpt_dir.resolve() and self._has_checkpoints():
                if not force:
                    raise UserError(f"{self.dir} already holds another run's checkpoints; choose a new name=... "
                                    f"for this run, or pass --force (the old directory is kept, renamed).")
                plan["move_aside"] = True
            return plan
        if not exists:
            return plan
        if not self._has_checkpoints():
            plan["move_aside"] = True  # logs of a run that never checkpointed: keep them, start fresh
            return plan
        if c.resume == "never" or force:
            if not force:
                raise UserError(f"{self.dir} already holds checkpoints and checkpoint.resume=never; resume "
                                f"with checkpoint.resume=auto, choose another name=..., or pass --force "
                                f"(the old directory is kept, renamed).")
            plan["move_aside"] = True
            return plan
        path, skipped = self._newest_valid()
        plan["warnings"] += [f"skipping damaged checkpoint: {s}" for s in skipped]
        if path is None:
            if not force:
                raise UserError(f"every checkpoint in {self.ckpt_dir} is damaged ({skipped[0]}); move the "
                                f"directory away or pass --force to start over (it is kept, renamed).")
            plan["move_aside"] = True
            return plan
        stored = load(path).get("config", {})
        changes = _diff(stored, to_dict(self.cfg))
        if changes:
            raise UserError(f"{self.dir} holds a run with a different config ({'; '.join(changes[:3])}"
                            f"{'; ...' if len(changes) > 3 else ''}); resume it with the same config, choose "
                            f"another name=..., or pass --force to start over (the old run is kept, renamed).")
        plan["resume"] = str(path)
        return plan

    def _has_checkpoints(self):
        return (self.ckpt_dir / "last.pt").exists() or bool(periodic_files(self.ckpt_dir))

    def _newest_valid(self):
        """The newest committed periodic checkpoint that verifies and loads, else last.pt; with the
        damaged or uncommitted ones skipped (and named)."""
        skipped = [f"{p} was never committed (no {sidecar(p).name}; the save was cut short)"
                   for p in periodic_files(self.ckpt_dir) if not sidecar(p).exists()]
        for p in periodic_files(self.ckpt_dir, committed=True) + [self.ckpt_dir / "last.pt"]:
            if not p.exists():
                continue
            try:
                load(p)
                return p, skipped
            except ValueError as e:
                skipped.append(str(e))
        return None, skipped

    # -- writing -------------------------------------------------------------------------------

    def create(self, env_info):
        """Make the run directory (moving an old one aside when asked) and write config.yaml, env.json."""
        import json
        if self.rt.is_main:
            if self._move_aside and self.dir.exists():
                stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
                old = self.dir.with_name(f"{self.dir.name}.old-{stamp}")
                os.replace(self.dir, old)
                print(f"kept the previous contents of {self.dir} in {old}", flush=True)
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.dir / "config.yaml", dump(self.cfg))
            atomic_write_text(self.dir / "env.json", json.dumps(env_info, indent=2, default=str) + "\n")
        self.rt.barrier()

    def save(self, objects, state, best=False, metrics=None):
        """Write a checkpoint of `objects` at `state` (a collective: every rank calls it)."""
        key = (state.epoch, state.batch, state.step)
        if key == self.last_saved and not best:
            return None
        rng = self.rt.gather_object(self.rt.rng_state())
        loop = state.collect(self.rt)                           # a collective too
        error, path = None, self.ckpt_dir / f"step_{state.step:08d}.pt"
        extra = self._save_deepspeed(state) if self.rt.deepspeed else {}
        if self.rt.is_main:
            payload = {name: (obj.state_dict() if hasattr(obj, "state_dict") else obj) for name, obj in objects.items()
                       if name not in extra.get("_skip", ())}
            payload.update({k: v for k, v in extra.items() if k != "_skip"})
            payload.update(loop)
            payload.update(rng=rng, config=to_dict(self.cfg), world_size=self.rt.world_size, format=FORMAT,
                           saved_at=time.time(), metrics=metrics or {})
            try:
                digest = atomic_save(payload, path, commit=True)
                for name, wanted in (("last.pt", True), ("best.pt", best)):
                    if wanted:
                        atomic_link(path, self.ckpt_dir / name)
                        atomic_write_text(sidecar(self.ckpt_dir / name), digest + "\n")
                self._prune()
            except (OSError, RuntimeError) as e:
                error = self._write_error(path, e)
        error = self.rt.broadcast_object(error)
        if error:
            raise RunError(error)
        self.last_saved = key
        return path

    def _save_deepspeed(self, state):
        """Sharded engine state via Accelerate's save_state into ds_step_X.tmp/, renamed once every
        rank has written; the consolidated model goes into the .pt file like any other run's."""
        acc = self.rt.accelerator
        name = f"ds_step_{state.step:08d}"
        final, tmp = self.ckpt_dir / name, self.ckpt_dir / (name + ".tmp")
        if self.rt.is_main and tmp.exists():
            shutil.rmtree(tmp)
        self.rt.barrier()
        acc.save_state(str(tmp))
        self.rt.barrier()
        model_state = self.rt.full_state_dict(self.rt.engine)   # a collective under ZeRO-3
        if self.rt.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.ckpt_dir)
        self.rt.barrier()
        return {"model": model_state, "deepspeed": name, "_skip": ("model", "optimizer")}

    def _write_error(self, path, e):
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or \
            "unexpected pos" in str(e) or "file write failed" in str(e)
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        reason = "the disk is full" if full else f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return (f"could not write checkpoint {path} ({reason}; {free / 2**20:.0f} MiB free); the previous "
                f"checkpoint is intact. Free space (or change output_dir) and rerun to resume.")

    def _prune(self):
        """Drop periodic checkpoints beyond keep_last (last.pt / best.pt are hard links: they survive),
        and DeepSpeed shard folders no kept checkpoint refers to."""
        for p in periodic_files(self.ckpt_dir)[self.cfg.checkpoint.keep_last:]:
            sidecar(p).unlink(missing_ok=True)     # uncommit first: a half-pruned file is never trusted
            p.unlink(missing_ok=True)
        if self.rt.deepspeed:
            wanted = {f"ds_{p.stem}" for p in periodic_files(self.ckpt_dir)}
            for name in ("last.pt", "best.pt"):
                if (self.ckpt_dir / name).exists():
                    wanted.add(load(self.ckpt_dir / name).get("deepspeed"))
            for folder in self.ckpt_dir.glob("ds_step_*"):
                if folder.name not in wanted:
                    shutil.rmtree(folder, ignore_errors=True)

    # -- best ------------------------------------------------------------------------------------

    def update_best(self, state, metrics):
        """True when metrics[checkpoint.monitor] improves on the best so far (state.best is updated)."""
        key = self.cfg.checkpoint.monitor
        if key not in metrics:
            return False
        value = metrics[key]
        mode = self.cfg.checkpoint.mode
        if mode == "auto":
            mode = "min" if any(w in key for w in ("loss", "mse", "error")) else "max"
        better = state.best is None or (value > state.best if mode == "max" else value < state.best)
        if better and value == value:  # not NaN
            state.best, state.best_epoch = value, state.epoch
            return True
        return False

    # -- restoring -------------------------------------------------------------------------------

    def resume_position(self):
        """(epoch, batch, step) of the checkpoint this run resumes from, or None."""
        if self.resume_path is None:
            return None
        ckpt = load(self.resume_path)
        return ckpt.get("epoch", 0), ckpt.get("batch", 0), ckpt.get("step", 0)

    def restore(self, objects, state):
        """Load the resume checkpoint into `objects` and `state`; False when starting fresh."""
        if self.resume_path is None:
            return False
        ckpt = load(self.resume_path)
        if ckpt.get("deepspeed"):
            if not self.rt.deepspeed:
                raise UserError(f"{self.resume_path} was written under DeepSpeed; resume it under DeepSpeed "
                                f"(dist.deepspeed or an accelerate DeepSpeed config).")
            self.rt.accelerator.load_state(str(Path(self.resume_path).parent / ckpt["deepspeed"]))
            objects = {k: v for k, v in objects.items() if k not in ("model", "optimizer")}
        elif self.rt.deepspeed and "optimizer" in objects:
            raise UserError(f"{self.resume_path} was written without DeepSpeed; its optimizer state cannot be "
                            f"loaded into a DeepSpeed engine. Use model.weights / finetune.weights to start from it.")
        restore_objects(ckpt, objects, self.resume_path)
        state.load_state_dict({k: ckpt[k] for k in (*state.state_dict(), "meter") if k in ckpt})
        rng = ckpt.get("rng") or []
        if len(rng) == self.rt.world_size:
            self.rt.set_rng_state(rng[self.rt.rank])
        else:
            self.rt.print0(f"warning: the checkpoint was written by {len(rng)} process(es), this run has "
                           f"{self.rt.world_size}; random streams restart, so the run is not bit-exact.")
            self.rt.seed(self.cfg.seed + 7919 * state.step)
        self.resumed_from = self.resume_path
        self.last_saved = (state.epoch, state.batch, state.step)
        return True


def restore_objects(ckpt, objects, path):
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
