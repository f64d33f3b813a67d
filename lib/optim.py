"""OPTIMIZERS and SCHEDULERS registries, and parameter groups chosen by module-name patterns.

    optim:
      name: sgd
      lr: 0.1
      momentum: 0.9                  # any argument of the optimizer
      weight_decay: 5.0e-4
      no_decay_norm_bias: true       # biases and norm-layer parameters get weight_decay 0
      param_groups:                  # first matching group wins; the rest use lr / weight_decay above
        - {params: "fc.*", lr: 1.0e-2}
        - {params: ["layer4"], lr: 1.0e-5}   # a module name covers all its parameters

Schedulers step once per optimizer update; lengths are given in epochs (fractions allowed):
    sched: {name: cosine, warmup_epochs: 2}            # linear warmup, then cosine to min_factor
"""
from __future__ import annotations

import fnmatch
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from lib.config import where as _where
from lib.errors import UserError, choices_text
from lib.registry import Registry, accepted_kwargs, check_kwargs

if TYPE_CHECKING:
    from lib.config import OptimCfg, SchedCfg

OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    NORM_LAYERS += (nn.RMSNorm,)


def _register_torch_optimizers():
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
            OPTIMIZERS.add({"SparseAdam": "sparse_adam"}.get(name, name.lower()), cls,
                           closure=name == "LBFGS", sparse=name == "SparseAdam", matrices_only=name == "Muon")


_register_torch_optimizers()

GROUP_KEYS = ("params", "lr", "weight_decay")


def check(cfg) -> None:
    """Pre-flight: optimizer and scheduler names and options, group keys, and combinations."""
    o, s, t = cfg.optim, cfg.sched, cfg.train
    cls = OPTIMIZERS.get(o.name, where="optim.name")
    meta = OPTIMIZERS.meta(o.name)
    check_kwargs(cls, o.extra, "optim", skip=("params", "lr", "weight_decay"), also=_fields(o),
                 origins=cfg._origins)
    accepted = accepted_kwargs(cls, skip=("params",)) or []
    if o.weight_decay and "weight_decay" not in accepted:
        raise UserError(f"{_where(cfg, 'optim.weight_decay')} is set but optim.name={o.name} has no weight "
                        f"decay; remove it.")
    for i, group in enumerate(o.param_groups):
        where = f"optim.param_groups[{i}]"
        if not isinstance(group, dict) or "params" not in group:
            raise UserError(f"{where} must be a mapping with a 'params' pattern, e.g. {{params: 'fc.*', lr: 0.01}}.")
        pats = group["params"]
        if not (isinstance(pats, str) or isinstance(pats, list) and all(isinstance(p, str) for p in pats)):
            raise UserError(f"{where}.params must be a name pattern or a list of them.")
        check_kwargs(cls, {k: v for k, v in group.items() if k != "params"}, where, skip=("params",))
    if meta["closure"]:
        for key, bad, why, fix in (
                ("train.grad_accum", t.grad_accum > 1, "does not combine with gradient accumulation",
                 "set train.grad_accum=1"),
                ("train.precision", t.precision == "fp16", "cannot run with fp16 (the GradScaler does not "
                 "support closures)", "use bf16 or no"),
                ("train.clip_grad_norm", t.clip_grad_norm is not None, "steps inside its own closure, so "
                 "there are no gradients to clip between backward and step", "remove train.clip_grad_norm"),
                ("train.on_nonfinite", t.on_nonfinite == "skip", "cannot skip a step it has already taken "
                 "inside its closure", "use train.on_nonfinite=stop")):
            if bad:
                raise UserError(f"optim.name=lbfgs (set in {cfg._origins.get('optim.name', 'the defaults')}) "
                                f"re-evaluates the loss inside its step and {why}, but {_where(cfg, key)} asks "
                                f"for it; {fix}.")
    sched = SCHEDULERS.get(s.name, where="sched.name")
    check_kwargs(sched, s.extra, "sched", skip=("optimizer", "total_steps", "steps_per_epoch", "warmup_steps",
                                                "warmup_start", "epochs"), also=_fields(s), origins=cfg._origins)
    if s.name == "onecycle" and s.warmup_epochs and s.warmup_epochs >= t.epochs:
        raise UserError(f"{_where(cfg, 'sched.warmup_epochs')} = {s.warmup_epochs} must be shorter than "
                        f"{_where(cfg, 'train.epochs')} = {t.epochs}.")


def _fields(section):
    import dataclasses
    return [f.name for f in dataclasses.fields(section) if f.name != "extra"]


def _matches(name, patterns):
    pats = [patterns] if isinstance(patterns, str) else patterns
    module = name.rsplit(".", 1)[0] if "." in name else ""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module, p) or name.startswith(p + ".")
               for p in pats)


def param_groups(model: nn.Module, o: OptimCfg, origins: dict | None = None) -> list[dict]:
    """Trainable parameters split into optimizer groups by o.param_groups patterns and decay policy."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UserError("the model has no trainable parameters (everything is frozen); unfreeze something.")
    no_decay = set()
    if o.no_decay_norm_bias:
        for module in model.modules():
            for pn, p in module.named_parameters(recurse=False):
                if isinstance(module, NORM_LAYERS) or pn.endswith("bias"):
                    no_decay.add(id(p))
    specs = [dict(g) for g in o.param_groups] + [{"params": "*"}]
    buckets = [[] for _ in specs]
    for n, p in named:
        i = next(i for i, g in enumerate(specs) if _matches(n, g["params"]))
        buckets[i].append((n, p))
    for i, g in enumerate(specs[:-1]):
        if not buckets[i]:
            src = (origins or {}).get("optim.param_groups", "the defaults")
            raise UserError(f"optim.param_groups[{i}].params={g['params']} (set in {src}) matches no trainable "
                            f"parameter; names look like {choices_text([n for n, _ in named[:6]], limit=6)}.")
    has_wd = "weight_decay" in (accepted_kwargs(OPTIMIZERS.get(o.name, where="optim.name")) or [])
    groups = []
    for spec, bucket in zip(specs, buckets):
        opts = {k: v for k, v in spec.items() if k != "params"}
        opts.setdefault("lr", o.lr)
        wd = opts.pop("weight_decay", o.weight_decay)
        decay = [(n, p) for n, p in bucket if id(p) not in no_decay]
        plain = [(n, p) for n, p in bucket if id(p) in no_decay]
        for members, group_wd in ((decay, wd), (plain, 0.0)):
            if members:
                groups.append({"params": [p for _, p in members], "names": [n for n, _ in members], **opts,
                               **({"weight_decay": group_wd} if has_wd else {})})
    return groups


def groups_for(o: OptimCfg, model: nn.Module, origins: dict | None = None) -> list[dict]:
    """The optimizer groups of section `o` for this model, after the checks that need the model's
    parameters (also run by pre-flight on a meta-device copy, before any data is read)."""
    meta = OPTIMIZERS.meta(o.name)
    origins = origins or {}
    name = f"optim.name={o.name} (set in {origins.get('optim.name', 'the defaults')})"
    if meta["sparse"]:
        dense = [n for n, p in model.named_parameters() if p.requires_grad and not _sparse_owner(model, n)]
        if dense:
            raise UserError(f"{name} only updates sparse gradients (nn.Embedding(sparse=True)), but this model "
                            f"has dense parameters ({dense[0]}, {len(dense)} in all); use adam or adamw.")
    groups = param_groups(model, o, origins)
    if meta["matrices_only"]:
        bad = [n for g in groups for n, p in zip(g["names"], g["params"]) if p.dim() != 2]
        if bad:
            raise UserError(f"{name} only optimizes 2-D weight matrices but {bad[0]} is not one "
                            f"({len(bad)} such parameters); use adamw or sgd for this model.")
    return groups


def _sparse_owner(model, param_name):
    module = model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse


def build_optimizer(o: OptimCfg, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of section `o` over the model's trainable parameters."""
    cls = OPTIMIZERS.get(o.name, where="optim.name")
    groups = groups_for(o, model)
    for g in groups:
        g.pop("names")
    kwargs = dict(o.extra)
    if isinstance(kwargs.get("betas"), list):
        kwargs["betas"] = tuple(kwargs["betas"])
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    try:
        return cls(groups, lr=o.lr, **kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"optim.name={o.name} rejected its options: {e}") from None


def add_param_group(optimizer: torch.optim.Optimizer, scheduler, params: list, lr: float,
                    weight_decay: float = 0.0) -> dict:
    """Add a parameter group mid-run (gradual unfreezing) and teach the schedule about it."""
    group = {"params": params, "lr": lr}
    if "weight_decay" in optimizer.defaults:
        group["weight_decay"] = weight_decay
    optimizer.add_param_group(group)
    group = optimizer.param_groups[-1]
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
        first = optimizer.param_groups[0]
        ratio = lr / first["max_lr"] if first.get("max_lr") else 1.0
        for key in ("initial_lr", "max_lr", "min_lr"):
            group[key] = first[key] * ratio
        group["lr"] = first["lr"] * ratio
        for key in ("momentum", "betas"):
            if key in first:
                group[key] = first[key]
    else:                                        # our LambdaLR schedules: same multiplier, new base
        group["initial_lr"] = lr
        scheduler.base_lrs.append(lr)
        scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
        group["lr"] = lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
    return group


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, torch.optim.LBFGS)


# ---------------------------------------------------------------------------------------------
# Schedulers: multiplier functions of the update step, in a LambdaLR (exact and resumable).
# ---------------------------------------------------------------------------------------------

def _lambda(optimizer, main, warmup_steps, warmup_start):
    def factor(step):
        f = main(step)
        if warmup_steps and step < warmup_steps:
            f *= warmup_start + (1.0 - warmup_start) * step / warmup_steps
        return f
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@SCHEDULERS.register("none")
def none(optimizer, total_steps, steps_per_epoch, warmup_steps, warmup_start):
    """Constant learning rate (after the optional warmup)."""
    return _lambda(optimizer, lambda step: 1.0, warmup_steps, warmup_start)


@SCHEDULERS.register("step")
def step(optimizer, total_steps, steps_per_epoch, warmup_steps, warmup_start, step_size=30.0, gamma=0.1):
    """lr x gamma every step_size epochs (StepLR)."""
    every = max(1, round(step_size * steps_per_epoch))
    return _lambda(optimizer, lambda s: gamma ** (s // every), warmup_steps, warmup_start)


@SCHEDULERS.register("multistep")
def multistep(optimizer, total_steps, steps_per_epoch, warmup_steps, warmup_start, milestones=(30, 60, 90),
              gamma=0.1):
    """lr x gamma at each milestone epoch (MultiStepLR)."""
    marks = sorted(round(m * steps_per_epoch) for m in milestones)
    return _lambda(optimizer, lambda s: gamma ** sum(s >= m for m in marks), warmup_steps, warmup_start)


@SCHEDULERS.register("exponential")
def exponential(optimizer, total_steps, steps_per_epoch, warmup_steps, warmup_start, gamma=0.95):
    """lr x gamma per epoch, applied smoothly per step."""
    return _lambda(optimizer, lambda s: gamma ** (s / steps_per_epoch), warmup_steps, warmup_start)


@SCHEDULERS.register("cosine")
def cosine(optimizer, total_steps, steps_per_epoch, warmup_steps, warmup_start, min_factor=0.0):
    """Half a cosine from 1 to min_factor over the steps after warmup (CosineAnnealingLR)."""
    span = max(1, total_steps - warmup_steps)

    def main(s):
        t = min(max(s - warmup_steps, 0), span) / span
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))
    return _lambda(optimizer, main, warmup_steps, warmup_start)


@SCHEDULERS.register("linear")
def linear(optimizer, total_steps, steps_per_epoch, warmup_steps, warmup_start, end_factor=0.0):
    """Straight line from 1 to end_factor over the steps after warmup."""
    span = max(1, total_steps - warmup_steps)
    return _lambda(optimizer, lambda s: 1 + (end_factor - 1) * min(max(s - warmup_steps, 0), span) / span,
                   warmup_steps, warmup_start)


@SCHEDULERS.register("onecycle")
def onecycle(optimizer, total_steps, steps_per_epoch, warmup_steps, warmup_start, max_lr=None, pct_start=0.3,
             div_factor=25.0, final_div_factor=1e4, anneal_strategy="cos", three_phase=False):
    """torch's OneCycleLR (Smith 2018): warmup to max_lr (default: each group's lr), then anneal;
    both phases follow anneal_strategy (cos by default, linear on request). sched.warmup_epochs,
    when given, sets the warmup (pct_start) so that the peak falls on the same step as the other
    schedules' (step warmup_steps; OneCycleLR peaks at step pct_start * total - 1)."""
    if warmup_steps:
        pct_start = min(warmup_steps + 1, total_steps - 1) / total_steps
    max_lrs = max_lr if max_lr is not None else [g["lr"] for g in optimizer.param_groups]
    cycle = any(k in optimizer.defaults for k in ("momentum", "betas")) and \
        optimizer.defaults.get("momentum", 1) != 0
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lrs, total_steps=max(total_steps, 2), pct_start=pct_start, div_factor=div_factor,
        final_div_factor=final_div_factor, anneal_strategy=anneal_strategy, three_phase=three_phase,
        cycle_momentum=cycle)


def build_scheduler(s: SchedCfg, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule of section `s`, stepped once per optimizer update."""
    builder = SCHEDULERS.get(s.name, where="sched.name")
    warmup = round(s.warmup_epochs * steps_per_epoch)
    kwargs = dict(s.extra)
    if "milestones" in kwargs and not isinstance(kwargs["milestones"], (list, tuple)):
        raise UserError("sched.milestones must be a list of epochs, e.g. [30, 60].")
    try:
        return builder(optimizer, total_steps=max(1, total_steps), steps_per_epoch=max(1, steps_per_epoch),
                       warmup_steps=warmup, warmup_start=s.warmup_start, **kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"sched.name={s.name} rejected its options: {e}") from None
