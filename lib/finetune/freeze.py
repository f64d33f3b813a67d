"""Freezing for fine-tuning: the modules finetune.freeze selects (backbone, name patterns, or the
first children plus named modules), their parameters frozen and their batch-norm kept in eval mode,
a table of what trains, and the Unfreezer that lets them join training at finetune.unfreeze_at_epoch.
"""
import fnmatch
import types

from torch import nn

from lib.errors import UserError, choices_text, did_you_mean
from lib.models.heads import within
from lib.optim import NORM_LAYERS, add_param_group


def frozen_modules(model, spec, head):
    """Module names the freeze spec selects; an unmatched pattern is an error naming it."""
    names = [n for n, _ in model.named_modules() if n]
    if spec == "backbone":
        return [n for n, _ in model.named_children() if not within(head, n)]
    if isinstance(spec, dict):
        children = [n for n, _ in model.named_children()]
        k = spec.get("children", 0)
        if not 0 <= k <= len(children):
            raise UserError(f"finetune.freeze.children={k} but the model has {len(children)} children "
                            f"({choices_text(children)}).")
        plus = spec.get("plus", [])
        for p in plus:
            if p not in names:
                raise UserError(f"finetune.freeze.plus names '{p}', which is not a module{did_you_mean(p, names)}; "
                                f"module names look like {choices_text(names[:8], limit=8)}.")
        return children[:k] + list(plus)
    selected = []
    for pattern in spec:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            top = [n for n in names if "." not in n]
            raise UserError(f"finetune.freeze pattern '{pattern}' matches no module{did_you_mean(pattern, names)}; "
                            f"top-level modules are: {choices_text(top)}.")
        selected += hits
    return selected


def freeze(model: nn.Module, f, head: str) -> list:
    """Freeze the modules that section `f` (cfg.finetune) selects; returns the names of the
    parameters frozen."""
    if not f.freeze:
        return []
    modules = frozen_modules(model, f.freeze, head)
    frozen = []
    for name in modules:
        module = model.get_submodule(name)
        for pn, p in module.named_parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(f"{name}.{pn}")
        if f.freeze_bn:
            for m in module.modules():
                if isinstance(m, NORM_LAYERS):
                    keep_in_eval(m)
    if any(within(n, head) for n in frozen):
        raise UserError(f"finetune.freeze also freezes the head ({head}); leave the head trainable.")
    return frozen


def _always_eval(self, mode=True):
    return nn.Module.train(self, False)


def keep_in_eval(module):
    """model.train() will leave this (frozen) batch-norm in eval mode: its statistics stay put."""
    module.train = types.MethodType(_always_eval, module)
    module.eval()


def release(module):
    """Undo keep_in_eval(): the module follows model.train() / model.eval() again."""
    if "train" in module.__dict__:
        del module.train


def parameter_table(model):
    """Every parameter's name, shape and whether it trains, then the trainable count and share."""
    lines = [f"{'parameter':50s} {'shape':>20s}  trainable"]
    for n, p in model.named_parameters():
        lines.append(f"{n:50s} {str(tuple(p.shape)):>20s}  {'yes' if p.requires_grad else 'no'}")
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines.append(f"trainable {train:,} of {total:,} parameters ({100 * train / max(total, 1):.2f}%)")
    return "\n".join(lines)


class Unfreezer:
    """At finetune.unfreeze_at_epoch the frozen parameters join training as one new optimizer group
    with lr = optim.lr x finetune.backbone_lr_mult (Lightning's BackboneFinetuning, in one method)."""

    def __init__(self, cfg, model, frozen, optimizer, scheduler):
        self.epoch = cfg.finetune.unfreeze_at_epoch     # 1-based
        self.lr = cfg.optim.lr * cfg.finetune.backbone_lr_mult
        self.wd = cfg.optim.weight_decay
        self.model, self.frozen, self.optimizer, self.scheduler = model, frozen, optimizer, scheduler
        self.done = not self.epoch

    def due(self, epoch0):
        """True once epoch (0-based) has reached the unfreeze epoch and it has not happened yet."""
        return not self.done and epoch0 + 1 >= self.epoch

    def apply(self):
        """Unfreeze now: the frozen parameters train again (batch-norm follows train() again) as a
        new optimizer group; returns how many parameter tensors joined."""
        params = dict(self.model.named_parameters())
        group = [params[n] for n in self.frozen]
        for p in group:
            p.requires_grad_(True)
        for m in self.model.modules():
            release(m)
        self.model.train()
        add_param_group(self.optimizer, self.scheduler, group, self.lr, self.wd)
        self.done = True
        return len(group)
