"""The fine-tuned model before training: built from the model section, its head made for the data's
classes (replaced, kept, or an MLP), the pretrained weights of finetune.weights loaded into it (the
first convolution adapted to the data's channels), and a report of what happened for the log.
"""
import copy

from torch import nn

from lib import models
from lib.errors import UserError
from lib.models.heads import head_name, replace_head
from lib.models.weights import load_source, match_weights, source_head
from lib.seeding import seeded


def build_model(cfg, data) -> tuple:
    """The model with pretrained weights, its head for the data and its first conv for the channels.
    Returns (model, head module name, the model's inputs (num_classes, in_channels, ...), a report
    for the log)."""
    state, described = load_source(cfg.finetune.weights, cfg.model.name)
    f = cfg.finetune
    inputs = data.model_inputs(cfg.model)
    if f.in_channels is not None:
        inputs["in_channels"] = f.in_channels
        if data.transform.dst_channels != f.in_channels:
            raise UserError(f"finetune.in_channels={f.in_channels} but the data has {data.transform.dst_channels} "
                            f"channel(s); set data.channels={f.in_channels} too.")
    if f.head == "keep":
        if source_head(state) is None:
            raise UserError(f"finetune.head=keep, but {described} has no linear classifier to keep; use "
                            f"finetune.head=replace.")
        rows = state[source_head(state) + ".weight"].shape[0]
        if inputs["num_classes"] > rows:
            raise UserError(f"finetune.head=keep keeps a head of {rows} classes but the data has "
                            f"{inputs['num_classes']}; use finetune.head=replace.")
        inputs["num_classes"] = rows
    base = copy.deepcopy(cfg.model)
    base.head = None
    model = models.build_model(base, **inputs, seed=cfg.seed)
    head = head_name(model)
    first_conv = next((n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    hidden = f.head if isinstance(f.head, list) else cfg.model.head
    if hidden:
        with seeded(cfg.seed):
            replace_head(model, inputs["num_classes"], hidden)
    matched = match_weights(model, state, head, first_conv, keep_head=f.head == "keep")
    report = [matched.report(described)]
    if f.head == "keep":
        report.append(f"head {head} kept ({inputs['num_classes']} classes)")
    else:
        report.append(f"head {head} rebuilt for {inputs['num_classes']} classes (dropped "
                      f"{', '.join(matched.dropped) or 'nothing'})")
    if hidden:
        report.append(f"MLP head {head}: {' -> '.join(map(str, hidden))} -> {inputs['num_classes']}")
    if matched.adapted:
        report.append(f"first conv {first_conv} adapted from {matched.adapted[0]} to {matched.adapted[1]} "
                      f"input channel(s)")
    models.probe(model, inputs["input_shape"], f"model.name={cfg.model.name}")
    return model, head, inputs, "\n  ".join(report)
