"""LOSSES registry: every torch.nn loss by snake_case name, plus our own (focal, regress_l2).

A loss is registered with the tasks it can serve and, for each, an adapter that turns our model
output and targets into what the loss expects (classification: logits (B, K) + class indices (B,);
regression: predictions (B, D) + targets (B, D)). A loss that cannot serve the run's task (e.g.
triplet_margin, which compares triplets of embeddings) is refused when the config is checked.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lib.errors import UserError, choices_text
from lib.registry import Registry, check_kwargs

if TYPE_CHECKING:
    from lib.config import LossCfg

LOSSES = Registry("loss")


def snake(name):
    """'BCEWithLogitsLoss' -> 'bce_with_logits', 'KLDivLoss' -> 'kl_div', 'NLLLoss' -> 'nll'."""
    name = name.removesuffix("Loss")
    for acronym in ("BCE", "NLL", "CTC", "MSE", "KL", "L1"):
        name = name.replace(acronym, acronym.capitalize())
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower().replace("multi_label", "multilabel")


def _onehot(out, y):
    """Class indices as one-hot rows; soft targets (mixup / cutmix: rows of class weights) as they are."""
    if y.is_floating_point():
        return y.to(out.dtype)
    return F.one_hot(y, out.shape[1]).to(out.dtype)


def _classes(out, y):
    """Class indices as they are; soft targets in the output's dtype (cross-entropy takes both)."""
    return out, (y.to(out.dtype) if y.is_floating_point() else y)


def _label_then_padding(out, y):
    """multilabel_margin's target: each row's class, then -1 (the end of its label list) to width K."""
    return torch.cat([y[:, None], torch.full_like(out, -1, dtype=torch.long)[:, 1:]], 1)


def _identity(out, y):
    return out, y


# For each torch loss: {task: adapter(out, y) -> (input, target)}; an empty dict (with a reason) = refused.
_CLASSIFY = {
    "cross_entropy": _classes,
    "nll": lambda out, y: (F.log_softmax(out, 1), y),
    "multi_margin": _identity,
    "bce_with_logits": lambda out, y: (out, _onehot(out, y)),
    "bce": lambda out, y: (torch.sigmoid(out), _onehot(out, y)),
    "multilabel_soft_margin": lambda out, y: (out, _onehot(out, y)),
    "soft_margin": lambda out, y: (out, 2 * _onehot(out, y) - 1),
    "multilabel_margin": lambda out, y: (out, _label_then_padding(out, y)),
    "kl_div": lambda out, y: (F.log_softmax(out, 1), _onehot(out, y)),
    "mse": lambda out, y: (out, _onehot(out, y)),
    "l1": lambda out, y: (out, _onehot(out, y)),
    "smooth_l1": lambda out, y: (out, _onehot(out, y)),
    "huber": lambda out, y: (out, _onehot(out, y)),
}
_REGRESS = {name: _identity for name in ("mse", "l1", "smooth_l1", "huber", "poisson_nll")}
_REFUSED = {
    "ctc": "it aligns unsegmented sequences (speech/handwriting) with label sequences",
    "margin_ranking": "it ranks pairs of inputs (x1, x2) and needs a pair per sample",
    "hinge_embedding": "it learns embeddings from pairs labelled similar/dissimilar",
    "cosine_embedding": "it compares pairs of embeddings",
    "triplet_margin": "it compares (anchor, positive, negative) triplets of embeddings",
    "triplet_margin_with_distance": "it compares (anchor, positive, negative) triplets of embeddings",
    "gaussian_nll": "it needs a predicted variance besides the prediction",
    "linear_cross_entropy": "it fuses the final linear layer into the loss (give it hidden states and weights)",
    "poisson_nll": "classification targets are classes, not counts",
}
DEFAULT_ARGS = {"kl_div": {"reduction": "batchmean"}}


def _register_torch_losses():
    for cls_name in dir(nn.modules.loss):
        cls = getattr(nn.modules.loss, cls_name)
        if not (isinstance(cls, type) and issubclass(cls, nn.modules.loss._Loss)) or \
                cls_name.startswith("_") or not cls_name.endswith("Loss"):
            continue  # NLLLoss2d is a deprecated alias
        name = snake(cls_name)
        tasks = {}
        if name in _CLASSIFY:
            tasks["classification"] = _CLASSIFY[name]
        if name in _REGRESS:
            tasks["regression"] = _REGRESS[name]
        LOSSES.add(name, cls, tasks=tasks, refused=_REFUSED.get(name))


_register_torch_losses()
# Not a _Loss subclass: a classifier head with its own weights and cutoffs that returns (output, loss).
LOSSES.add("adaptive_log_softmax", nn.AdaptiveLogSoftmaxWithLoss, tasks={},
           refused="it is a model head with its own weights (in_features, cutoffs), not a loss of logits; "
                   "a model would have to end in it")


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017, arXiv:1708.02002): cross-entropy scaled by (1 - p_y)^gamma."""

    def __init__(self, gamma=2.0, alpha=None, label_smoothing=0.0):
        super().__init__()
        self.gamma, self.alpha, self.label_smoothing = gamma, alpha, label_smoothing

    def forward(self, logits, y):                                 # (B, K), (B,)
        ce = F.cross_entropy(logits, y, reduction="none", label_smoothing=self.label_smoothing)
        p_y = torch.exp(-F.cross_entropy(logits, y, reduction="none"))
        loss = (1 - p_y) ** self.gamma * ce
        if self.alpha is not None:
            loss = loss * self.alpha
        return loss.mean()


class RegressL2(nn.Module):
    """The seed's regression loss: x (B, D) against y (B, K, D), the summed squared distance to all K.

    A target of shape (B, D) counts as K = 1. Returns sum over K and D, mean over the batch.
    """

    def forward(self, x, y):
        if y.dim() == x.dim():
            y = y.unsqueeze(1)                                    # (B, 1, D)
        return ((x.unsqueeze(1) - y) ** 2).sum(dim=(1, 2)).mean()


LOSSES.add("focal", FocalLoss, tasks={"classification": _classes})
# Classification losses that need class indices, so cannot take mixup / cutmix's soft targets.
HARD_TARGETS = ("nll", "multi_margin", "multilabel_margin")
LOSSES.add("regress_l2", RegressL2, tasks={"regression": _identity})


def check(cfg, task: str) -> None:
    """Pre-flight: the loss exists, takes the given options, and can serve `task`."""
    section = cfg.loss
    cls = LOSSES.get(section.name, where="loss.name")
    meta = LOSSES.meta(section.name)
    check_kwargs(cls, section.extra, "loss", skip=("size_average", "reduce"), also=("name",), origins=cfg._origins)
    if task not in meta["tasks"]:
        serve = [n for n in LOSSES if task in LOSSES.meta(n)["tasks"]]
        reason = meta.get("refused") or f"it serves {', '.join(meta['tasks']) or 'no task of this package'}"
        raise UserError(f"loss.name={section.name} cannot train {task} ({reason}); for {task} use one of: "
                        f"{choices_text(serve)}.")
    if task == "classification" and section.name in HARD_TARGETS and \
            (cfg.data.mixup_alpha > 0 or cfg.data.cutmix_alpha > 0):
        raise UserError(f"loss.name={section.name} needs class indices, but mixup / cutmix make soft targets; use "
                        f"cross_entropy (label_smoothing composes with them) or set data.mixup_alpha and "
                        f"data.cutmix_alpha to 0.")
    reduction = section.extra.get("reduction", DEFAULT_ARGS.get(section.name, {}).get("reduction", "mean"))
    if reduction not in ("mean", "batchmean"):
        raise UserError(f"loss.reduction={reduction} is not supported: losses are averaged over the batch so "
                        f"that runs with different batch sizes and process counts compare; remove it.")


def build_loss(section: LossCfg, task: str) -> AdaptedLoss:
    """A callable (model output, targets) -> scalar loss for `task`."""
    cls = LOSSES.get(section.name, where="loss.name")
    adapter = LOSSES.meta(section.name)["tasks"][task]
    kwargs = {**DEFAULT_ARGS.get(section.name, {}), **section.extra}
    for key in ("weight", "pos_weight"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = torch.tensor(kwargs[key], dtype=torch.float32)
    loss = cls(**kwargs)
    return AdaptedLoss(loss, adapter)


class AdaptedLoss(nn.Module):
    def __init__(self, loss, adapter):
        super().__init__()
        self.loss, self.adapter = loss, adapter

    def forward(self, out, y):
        return self.loss(*self.adapter(out, y))
