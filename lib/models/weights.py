"""Weights from outside the run, loaded into a built model: a .pt/.pth state dict, a checkpoint of
this package (its model's weights), or a torchvision weights name (read from the torch cache, or
downloaded into it). Keys lose their DDP / torch.compile prefixes; the classifier head is dropped or
kept; a first convolution for other input channels is adapted; what loaded is reported in a line.

    load_weights(model, "w.pth")                    # model.weights: every key must fit exactly
    state, source = load_source("IMAGENET1K_V1", "torchvision:resnet18")   # finetune.weights
    matched = match_weights(model, state, head="fc", first_conv="conv1.weight", keep_head=False)
    print(matched.report(source))
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from lib.errors import UserError, did_you_mean
from lib.models.heads import within


def state_dict_of(ckpt: dict) -> dict:
    """The model weights inside a checkpoint / state dict, without DDP or compile prefixes."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    out = {}
    for k, v in ckpt.items():
        if not torch.is_tensor(v):
            continue
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def read_file(path, where: str) -> tuple[dict, str]:
    """(weights, "checkpoint" or "state dict") of the file the user set `where`=path to; a missing
    or damaged file is a UserError."""
    from lib import checkpoint
    ckpt = checkpoint.load_user_file(path, where)
    kind = "checkpoint" if "model" in ckpt and "config" in ckpt else "state dict"
    return state_dict_of(ckpt), kind


def load_weights(model: torch.nn.Module, path, where: str = "model.weights") -> torch.nn.Module:
    """Load a state dict (.pt/.pth) or a checkpoint of this package into `model`, strictly."""
    state, _ = read_file(path, where)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{where}={path} does not fit model {type(model).__name__}: missing "
                        f"{_few(result.missing_keys)}, unexpected {_few(result.unexpected_keys)}; "
                        f"check model.name and its options.")
    return model


def _few(keys):
    keys = list(keys)
    return "none" if not keys else ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")


def load_source(weights: str, model_name: str) -> tuple[dict, str]:
    """(state_dict, description) of finetune.weights: a file, or a torchvision weights name for the
    model.name=torchvision:<arch> model."""
    if os.path.isfile(weights):
        state, kind = read_file(weights, "finetune.weights")
        if not state:
            raise UserError(f"finetune.weights={weights} holds no tensors; give a state dict or a checkpoint.")
        return state, f"{kind} {weights}"
    if os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".ckpt")):
        raise UserError(f"finetune.weights={weights}: no such file; give an existing .pt/.pth file or a torchvision "
                        f"weights name such as IMAGENET1K_V1.")
    if not model_name.startswith("torchvision:"):
        raise UserError(f"finetune.weights={weights} is not a file, and a weights name (like IMAGENET1K_V1) only "
                        f"applies to model.name=torchvision:<name>; give a file for model.name={model_name}.")
    return torchvision_weights(model_name.split(":", 1)[1], weights)


def torchvision_weights(arch: str, tag: str) -> tuple[dict, str]:
    """A torchvision weights enum's state dict, from the torch cache or downloaded into it."""
    import torchvision.models as tvm
    from torch.hub import get_dir
    try:
        enum = tvm.get_model_weights(arch)
    except (ValueError, KeyError):
        raise UserError(f"torchvision has no pretrained weights for {arch}.") from None
    tag = tag.split(".")[-1]
    options = [e.name for e in enum] + ["DEFAULT"]
    if tag not in options:
        raise UserError(f"finetune.weights={tag} is not a weights name of {arch}{did_you_mean(tag, options)}; "
                        f"choose one of: {', '.join(options)}.")
    weights = enum[tag] if tag != "DEFAULT" else enum.DEFAULT
    cache = Path(get_dir()) / "checkpoints"
    filename = weights.url.rsplit("/", 1)[-1]
    where_ = "the torch cache" if (cache / filename).exists() else "a download"
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # offline, proxy, corrupt download
        raise UserError(
            f"finetune.weights={tag} needs {filename}, which is not in {cache} and could not be downloaded "
            f"({type(e).__name__}); on a machine with internet run python -c \"import torchvision; "
            f"torchvision.models.get_model('{arch}', weights='{weights.name}')\" and copy {filename} into {cache} "
            f"(or set TORCH_HOME), or pass finetune.weights=/path/to/{filename}.") from None
    return state, f"torchvision {arch} {weights.name} (from {where_})"


def source_head(state: dict) -> str | None:
    """Prefix of the source's classifier: the module of its last 2-D weight ('fc', 'classifier.6')."""
    keys = [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]
    return keys[-1].rsplit(".", 1)[0] if keys else None


class Matched(NamedTuple):
    """What match_weights() loaded: tensors loaded of the model's total, the source's head keys
    dropped, (source, model) input channels of an adapted first conv, batch-norm counters missing."""
    loaded: int
    total: int
    dropped: list
    adapted: tuple | None
    untracked: int

    def report(self, source: str) -> str:
        missing = (f"{self.untracked} batch-norm counters (num_batches_tracked, reset to 0)" if self.untracked
                   else "none")
        return (f"weights: {source}: loaded {self.loaded} of {self.total} tensors; missing: {missing}"
                "; unexpected: none (besides the head)")


def match_weights(model: torch.nn.Module, state: dict, head: str, first_conv: str | None,
                  keep_head: bool) -> Matched:
    """Load `state` into `model`: same-shape keys load; the source's head is dropped unless keep_head
    (ours is new); the first conv is adapted to our input channels; anything else that differs is an
    error naming the keys."""
    own = model.state_dict()
    src_head = source_head(state)
    loaded, dropped, adapted, problems, untracked = {}, [], None, [], 0
    for key, target in own.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                untracked += 1                      # older torchvision files lack these counters
            elif keep_head and within(key, head):
                problems.append(f"the kept head's {key} is not in the weights")
            elif not within(key, head):
                problems.append(f"missing {key}")
            continue
        source = state[key]
        in_head = within(key, head) or within(key, src_head)
        if in_head and not keep_head:
            dropped.append(key)
        elif source.shape == target.shape:
            loaded[key] = source
        elif in_head:
            problems.append(f"the kept head {key} has shape {tuple(source.shape)} there but {tuple(target.shape)} here")
        elif key == first_conv and source.dim() == 4 and source.shape[0] == target.shape[0] \
                and source.shape[2:] == target.shape[2:]:
            loaded[key] = adapt_channels(source, target.shape[1])
            adapted = (source.shape[1], target.shape[1])
        else:
            problems.append(f"{key} has shape {tuple(source.shape)} there but {tuple(target.shape)} here")
    for key in state:
        if key not in own:
            if not keep_head and (within(key, src_head) or within(key, head)):
                dropped.append(key)
            else:
                problems.append(f"unexpected {key}")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"finetune.weights do not fit model {type(model).__name__}: {'; '.join(problems[:3])}{more}; "
                        f"check model.name and its options (depths, widths, head) against the weights"
                        + (", or use finetune.head=replace." if keep_head else "."))
    model.load_state_dict(loaded, strict=False)
    return Matched(len(loaded), len(own), sorted(set(dropped)), adapted, untracked)


def adapt_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """RGB filters for `channels` inputs: summed for 1 (a gray image repeated 3 times gives the same
    response), mean-tiled otherwise (Keras/timm convention)."""
    if channels == 1:
        return weight.sum(1, keepdim=True)
    mean = weight.mean(1, keepdim=True)
    return mean.repeat(1, channels, 1, 1) * (weight.shape[1] / channels)
