"""The MODELS registry (every model a config can name, with the tasks it serves and the inputs it
takes), the pre-flight check of the model section, and build_model().

A builder takes what it needs of (num_classes, in_channels, image_size, input_shape) plus its own
keyword arguments from the model section (`model: {name: mlp, hidden: [256, 128]}`). The networks
live in classic.py, resnet.py, lstm.py, dcgan.py and tv.py; heads.py finds and replaces a model's
classifier; weights.py loads weights from outside the run.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from lib.errors import UserError
from lib.init import apply_init
from lib.models import classic, dcgan, lstm, resnet, tv
from lib.models.heads import replace_head
from lib.registry import Registry, check_kwargs
from lib.seeding import seeded

if TYPE_CHECKING:
    from lib.config import ModelCfg

MODELS = Registry("model")
MODELS.add("mlp", classic.mlp, tasks=("classification", "regression"), input="any")
MODELS.add("lenet", classic.LeNet)
MODELS.add("alexnet", classic.AlexNet)
MODELS.add("fashion_cnn", classic.FashionCNN)
MODELS.add("convnet", classic.ConvNet)
MODELS.add("resnet", resnet.ResNet)
MODELS.add("lstm", lstm.LSTMRegressor, tasks=("regression", "classification"), input="sequence")
MODELS.add("dcgan_generator", dcgan.Generator, tasks=("generation",))
MODELS.add("dcgan_discriminator", dcgan.Discriminator, tasks=("generation",))
MODELS.register_prefix("torchvision:", tv.build_torchvision, names_fn=tv.torchvision_names)

BUILT_IN_ARGS = ("num_classes", "in_channels", "image_size", "input_shape")


def check(cfg, task=None, kind=None) -> dict:
    """Pre-flight: the model name exists, its options are accepted, it can serve the data's task.
    Returns what the model was registered with (tasks, input)."""
    m = cfg.model
    builder = MODELS.get(m.name, where="model.name")
    meta = MODELS.meta(m.name)
    check_kwargs(builder, m.extra, "model", skip=BUILT_IN_ARGS,
                 also=("name", "num_classes", "in_channels", "init", "weights", "head"), origins=cfg._origins)
    if m.head is not None and (not m.head or min(m.head) < 1):
        raise UserError("model.head must list positive layer widths, e.g. [400, 300].")
    if kind is not None and meta.get("input", "image") not in (kind, "any"):
        raise UserError(f"model.name={m.name} takes {meta.get('input', 'image')} inputs but data.name="
                        f"{cfg.data.name} gives {kind}s; pick a matching model or dataset.")
    tasks = meta.get("tasks", ("classification",))
    if task is not None and task not in tasks:
        fits = [n for n in MODELS if task in MODELS.meta(n).get("tasks", ("classification",))]
        why = "; gan_train.py trains it" if "generation" in tasks else ""
        raise UserError(f"model.name={m.name} does {' and '.join(tasks)}, not {task} (data.name={cfg.data.name})"
                        f"{why}; for {task} use one of: {', '.join(fits)}.")
    return meta


def build_model(m: ModelCfg, *, num_classes: int, in_channels: int, image_size: int | None = None,
                input_shape: tuple | None = None, seed: int = 0) -> torch.nn.Module:
    """The model of section `m`, initialised identically on every rank from `seed`."""
    builder = MODELS.get(m.name, where="model.name")
    given = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size,
             "input_shape": input_shape}
    params = inspect.signature(builder).parameters
    kwargs = {k: v for k, v in given.items() if k in params}
    kwargs.update(m.extra)
    with seeded(seed):
        try:
            model = builder(**kwargs)
        except (ValueError, TypeError, RuntimeError) as e:
            raise UserError(f"model {m.name} could not be built with {_show(kwargs)}: {e}") from None
        if m.head:
            replace_head(model, num_classes, hidden=m.head)
        apply_init(model, m.init)
    return model


def _show(kwargs):
    return ", ".join(f"{k}={v}" for k, v in kwargs.items() if v is not None)


def probe(model, shape, where):
    """Run one dummy forward so a size mismatch is a clear error now, not a stack trace later."""
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            out = model(torch.zeros(2, *shape))
            model.train(was)
    except RuntimeError as e:
        raise UserError(f"{where}: the model cannot take inputs of shape {tuple(shape)} ({str(e).splitlines()[0]}); "
                        f"change data.image_size or the model.") from None
    return out
