"""One run directory, <output_dir>/<name>: how the run starts (resume, fresh, or refuse), creating it
(config.yaml, env.json, checkpoints/), saving checkpoints, tracking the best one, and restoring.

Saving is a collective. Rank 0 writes `checkpoints/step_XXXXXXXX.pt` atomically, commits it with its
.sha256, then points `last.pt` (and `best.pt`) at it with a hard link and a .sha256 of their own; old
periodic files are pruned only after all of that succeeded. Every rank then learns whether the save
worked, so no rank waits on a collective the others skip.
"""
import datetime
import errno
import json
import os
import shutil
import time
from pathlib import Path

from lib import io
from lib.checkpoint.files import FORMAT, atomic_save, load, periodic_files, restore_objects, sidecar
from lib.checkpoint.resume import decide, rebase
from lib.config import dump, to_dict
from lib.errors import RunError, UserError


class Run:
    """One run directory, <output_dir>/<name>: decide how to start, then save and restore checkpoints.

    `rt` is the runtime (duck-typed): is_main, rank, world_size, deepspeed, accelerator, engine,
    barrier, broadcast_object, gather_object, print0, rng_state, set_rng_state, seed, full_state_dict."""

    def __init__(self, cfg, rt, force=False, read_only=False):
        self.cfg, self.rt, self.read_only = cfg, rt, read_only
        self.dir = Path(cfg.output_dir) / cfg.name
        self.ckpt_dir = self.dir / "checkpoints"
        self.resume_path = None
        self.last_saved = None
        self.resumed_from = None
        # Rank 0 decides (others must not re-derive it from a file system they may see differently).
        plan = decide(cfg.checkpoint, self.dir, to_dict(cfg), force, read_only, rt.world_size) if rt.is_main else None
        plan = rt.broadcast_object(plan)
        if plan["error"]:
            raise UserError(plan["error"])
        self.resume_path = plan["resume"]
        self._move_aside = plan["move_aside"]
        for w in plan["warnings"]:
            rt.print0(f"warning: {w}")

    # -- writing -------------------------------------------------------------------------------

    def create(self, env_info):
        """Make the run directory (moving an old one aside when asked) and write config.yaml, env.json."""
        if self.rt.is_main:
            if self._move_aside and self.dir.exists():
                stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
                old = self.dir.with_name(f"{self.dir.name}.old-{stamp}")
                os.replace(self.dir, old)
                print(f"kept the previous contents of {self.dir} in {old}", flush=True)
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            io.write_text(self.dir / "config.yaml", dump(self.cfg))
            io.write_text(self.dir / "env.json", json.dumps(env_info, indent=2, default=str) + "\n")
        self.rt.barrier()

    def save(self, objects, state, best=False, metrics=None):
        """Write a checkpoint of `objects` at `state` (a collective: every rank calls it)."""
        key = (state.epoch, state.batch, state.step)
        if key == self.last_saved and not best:
            return None
        self.rt.sync_buffers(*_modules(objects))    # rank 0 writes the statistics every rank evaluates with
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
                        io.link(path, self.ckpt_dir / name)
                        io.write_text(sidecar(self.ckpt_dir / name), digest + "\n")
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
            io.fsync_dir(self.ckpt_dir)
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
            state.best, state.best_epoch = value, metrics["epoch"]
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
        moved = rebase(ckpt, state, self.cfg.data.batch_size, self.cfg.train.grad_accum, self.rt.world_size)
        if moved:
            self.rt.print0(moved)
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


def _modules(objects):
    """The torch modules among a checkpoint's objects (an EMA's averaged module included)."""
    import torch
    found = []
    for obj in objects.values():
        inner = obj if isinstance(obj, torch.nn.Module) else getattr(obj, "module", None)
        if isinstance(inner, torch.nn.Module):
            found.append(inner)
    return found
