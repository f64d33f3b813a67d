"""A model's classifier head: which module it is, whether a parameter or module lies inside it, and
its replacement by a new Linear (or an MLP, or a 1x1 convolution) for another number of classes.
"""
from torch import nn

from lib.errors import UserError


def head_name(model):
    """The model's classifier: its last nn.Linear (fc, classifier.6, heads.head, ...), or for the
    all-convolutional classifiers (SqueezeNet) the last 1x1 convolution."""
    names = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if not names:
        names = [n for n, mod in model.named_modules() if isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1)]
    if not names:
        raise UserError(f"{type(model).__name__} has no linear layer (or final 1x1 convolution) to use as its head.")
    return names[-1]


def within(name, module):
    """True when the dotted `name` is `module` itself or lies inside it ('fc.0.weight' within 'fc')."""
    return module is not None and (name == module or name.startswith(module + "."))


def replace_head(model, num_classes, hidden=()):
    """Swap the last linear layer for Linear(in, K), or an MLP in -> hidden... (ReLU) -> K; a 1x1
    convolutional classifier becomes a new Conv2d(in, K, 1). Returns the head's module name."""
    name = head_name(model)
    old = model.get_submodule(name)
    if isinstance(old, nn.Conv2d):
        if hidden:
            raise UserError(f"{type(model).__name__} classifies with a 1x1 convolution ({name}); an MLP head "
                            f"needs a linear classifier, so use finetune.head=replace.")
        new = nn.Conv2d(old.in_channels, num_classes, 1)
    else:
        layers, width = [], old.in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        new = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return name
