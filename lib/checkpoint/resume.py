"""The decision a run makes before it writes anything: resume a checkpoint, start fresh, or refuse
(with the fix in the message), from the run directory's contents, checkpoint.resume and --force; and
where a resumed run continues when its world size, batch size or accumulation changed.

Resuming picks the newest *committed* periodic checkpoint that verifies and loads, warning about each
one it skips, and only then falls back to last.pt. A run directory that holds a run with a different
config (beyond the HARMLESS keys) is refused unless --force moves it aside.
"""
from pathlib import Path

from lib.checkpoint.files import load, periodic_files, sidecar
from lib.config import CheckpointCfg
from lib.errors import UserError

# Keys whose change does not make a resumed run a different experiment.
HARMLESS = ("name", "output_dir", "train.epochs", "train.max_steps", "train.log_every", "train.eval_every_epochs",
            "train.eval_only", "train.compile", "train.compile_mode", "train.compile_backend", "data.num_workers",
            "data.loader", "data.cache", "data.root", "data.download", "data.memory_limit_gb", "data.eval_batch_size",
            "checkpoint.", "log.", "dist.",
            "data.batch_size", "train.grad_accum")   # a new layout resumes at the same sample (rebase below)


def decide(c: CheckpointCfg, run_dir, config: dict, force: bool = False, read_only: bool = False,
           world_size: int = 1) -> dict:
    """{'resume': path or None, 'move_aside': bool, 'warnings': [...], 'error': message or None} for a
    run in `run_dir` with checkpoint section `c` and resolved config `config` (a plain dict), started
    with `world_size` processes."""
    try:
        plan = _decide(c, Path(run_dir), config, force, read_only)
        if plan["resume"] and not read_only:
            _check_deepspeed_world(plan["resume"], world_size)
        return plan
    except UserError as e:
        return {"error": str(e), "resume": None, "warnings": [], "move_aside": False}


def _check_deepspeed_world(path, world_size):
    """ZeRO shards are cut for the world size that wrote them: another world size cannot load them."""
    ckpt = load(path)
    written = ckpt.get("world_size", 1)
    if ckpt.get("deepspeed") and written != world_size:
        raise UserError(f"{path} holds DeepSpeed ZeRO shards written by {written} process(es), and this run has "
                        f"{world_size}; resume it with {written} processes, or start a new run from its "
                        f"consolidated weights (name=<new name> model.weights={path}; the optimizer state "
                        f"restarts).")


def rebase(ckpt: dict, state, batch_size: int, grad_accum: int, world_size: int):
    """Place a resumed run (its LoopState `state`, loaded from `ckpt`) in the epoch's global sample
    order: state.samples is what the checkpoint's run had consumed of the epoch (derived from its
    batch for checkpoints older than the field); when the world size, batch size or accumulation
    changed, state.batch becomes this layout's count of micro-batches before that sample (rounded
    down to a whole update). Returns one line saying what changed, or None."""
    old_cfg = ckpt.get("config", {})
    old_bs = old_cfg.get("data", {}).get("batch_size", batch_size)
    old_accum = old_cfg.get("train", {}).get("grad_accum", grad_accum)
    old_world = ckpt.get("world_size", world_size)
    if ckpt.get("samples") is None:
        state.samples = state.batch * old_bs * old_world
    if (old_bs, old_accum, old_world) == (batch_size, grad_accum, world_size):
        return None
    state.batch = state.samples // (batch_size * world_size) // grad_accum * grad_accum
    before, now = old_bs * old_world * old_accum, batch_size * world_size * grad_accum
    layout = (f"{old_world} process(es) x batch {old_bs} x grad_accum {old_accum} -> {world_size} x "
              f"{batch_size} x {grad_accum}")
    where = f"continuing at sample {state.samples} of epoch {state.epoch + 1}'s order"
    if before == now:
        return f"resuming on a new layout ({layout}): the same global batch of {now}, {where}."
    return (f"warning: the global batch changes from {before} to {now} ({layout}); {where}, with the learning "
            f"rate as configured (not rescaled: set optim.lr to scale it) and the schedule's step count as saved.")


def _decide(c, run_dir, config, force, read_only):
    ckpt_dir = run_dir / "checkpoints"
    plan = {"error": None, "resume": None, "warnings": [], "move_aside": False}
    if read_only and c.resume in ("auto", "never"):   # --eval-only: read the newest checkpoint, if any
        if c.resume == "auto" and has_checkpoints(ckpt_dir):
            path, skipped = _newest_valid(ckpt_dir)
            plan["resume"] = str(path) if path else None
            plan["warnings"] += [f"skipping damaged checkpoint: {s}" for s in skipped]
        return plan
    exists = run_dir.is_dir() and any(run_dir.iterdir())
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
        if exists and Path(path).resolve().parent != ckpt_dir.resolve() and has_checkpoints(ckpt_dir):
            if not force:
                raise UserError(f"{run_dir} already holds another run's checkpoints; choose a new name=... "
                                f"for this run, or pass --force (the old directory is kept, renamed).")
            plan["move_aside"] = True
        return plan
    if not exists:
        return plan
    if not has_checkpoints(ckpt_dir):
        plan["move_aside"] = True  # logs of a run that never checkpointed: keep them, start fresh
        return plan
    if c.resume == "never" or force:
        if not force:
            raise UserError(f"{run_dir} already holds checkpoints and checkpoint.resume=never; resume "
                            f"with checkpoint.resume=auto, choose another name=..., or pass --force "
                            f"(the old directory is kept, renamed).")
        plan["move_aside"] = True
        return plan
    path, skipped = _newest_valid(ckpt_dir)
    plan["warnings"] += [f"skipping damaged checkpoint: {s}" for s in skipped]
    if path is None:
        if not force:
            raise UserError(f"every checkpoint in {ckpt_dir} is damaged ({skipped[0]}); move the "
                            f"directory away or pass --force to start over (it is kept, renamed).")
        plan["move_aside"] = True
        return plan
    stored = load(path).get("config", {})
    changes = _diff(stored, config)
    if changes:
        raise UserError(f"{run_dir} holds a run with a different config ({'; '.join(changes[:3])}"
                        f"{'; ...' if len(changes) > 3 else ''}); resume it with the same config, choose "
                        f"another name=..., or pass --force to start over (the old run is kept, renamed).")
    plan["resume"] = str(path)
    return plan


def has_checkpoints(ckpt_dir) -> bool:
    return (ckpt_dir / "last.pt").exists() or bool(periodic_files(ckpt_dir))


def _newest_valid(ckpt_dir):
    """The newest committed periodic checkpoint that verifies and loads, else last.pt; with the
    damaged or uncommitted ones skipped (and named)."""
    skipped = [f"{p} was never committed (no {sidecar(p).name}; the save was cut short)"
               for p in periodic_files(ckpt_dir) if not sidecar(p).exists()]
    for p in periodic_files(ckpt_dir, committed=True) + [ckpt_dir / "last.pt"]:
        if not p.exists():
            continue
        try:
            load(p)
            return p, skipped
        except ValueError as e:
            skipped.append(str(e))
    return None, skipped


def _diff(old, new, prefix=""):
    """'key: old -> new' for every key that differs between two config dicts, HARMLESS keys aside."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        dotted = prefix + str(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, dotted + ".")
        elif a != b and not any(dotted == h or (h.endswith(".") and dotted.startswith(h)) for h in HARMLESS):
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out
