"""MODELS registry and build_model(). Entries live in classic.py, resnet.py, lstm.py, tv.py and dcgan.py.

A builder takes what it needs of (num_classes, in_channels, image_size, input_shape) plus its own
keyword arguments from the model section (`model: {name: mlp, hidden: [256, 128]}`).
"""
import inspect

from lib.errors import UserError
from lib.registry import Registry, check_kwargs

MODELS = Registry("model")

from lib.models import classic, dcgan, lstm, resnet, tv  # noqa: E402,F401  (they register themselves)

BUILT_IN_ARGS = ("num_classes", "in_channels", "image_size", "input_shape")


def check(cfg, task=None, kind=None):
    """Pre-flight: the model name exists, its options are accepted, it can serve the data's task."""
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


def build_model(m, *, num_classes, in_channels, image_size=None, input_shape=None, seed=0):
    """The model of section `m`, initialised identically on every rank from `seed`."""
    import torch
    builder = MODELS.get(m.name, where="model.name")
    given = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size,
             "input_shape": input_shape}
    params = inspect.signature(builder).parameters
    kwargs = {k: v for k, v in given.items() if k in params}
    kwargs.update(m.extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = builder(**kwargs)
        except (ValueError, TypeError, RuntimeError) as e:
            raise UserError(f"model {m.name} could not be built with {_show(kwargs)}: {e}") from None
        if m.head:
            replace_head(model, num_classes, hidden=m.head)
        from lib.init import apply_init
        apply_init(model, m.init)
    return model


def head_name(model):
    """The model's classifier: its last nn.Linear (fc, classifier.6, heads.head, ...), or for the
    all-convolutional classifiers (SqueezeNet) the last 1x1 convolution."""
    import torch
    names = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    if not names:
        names = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (1, 1)]
    if not names:
        raise UserError(f"{type(model).__name__} has no linear layer (or final 1x1 convolution) to use as its head.")
    return names[-1]


def replace_head(model, num_classes, hidden=()):
    """Swap the last linear layer for Linear(in, K), or an MLP in -> hidden... (ReLU) -> K; a 1x1
    convolutional classifier becomes a new Conv2d(in, K, 1)."""
    import torch
    name = head_name(model)
    old = model.get_submodule(name)
    if isinstance(old, torch.nn.Conv2d):
        if hidden:
            raise UserError(f"{type(model).__name__} classifies with a 1x1 convolution ({name}); an MLP head "
                            f"needs a linear classifier, so use finetune.head=replace.")
        new = torch.nn.Conv2d(old.in_channels, num_classes, 1)
    else:
        layers, width = [], old.in_features
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        layers.append(torch.nn.Linear(width, num_classes))
        new = layers[0] if len(layers) == 1 else torch.nn.Sequential(*layers)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return name


def _show(kwargs):
    return ", ".join(f"{k}={v}" for k, v in kwargs.items() if v is not None)


def probe(model, shape, where):
    """Run one dummy forward so a size mismatch is a clear error now, not a stack trace later."""
    import torch
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


def load_weights(model, path, where="model.weights"):
    """Load a state dict (.pt/.pth) or a checkpoint of this package into `model`, strictly."""
    from lib import checkpoint
    state = state_dict_of(checkpoint.load_user_file(path, where))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{where}={path} does not fit model {type(model).__name__}: missing "
                        f"{_few(result.missing_keys)}, unexpected {_few(result.unexpected_keys)}; "
                        f"check model.name and its options.")
    return model


def state_dict_of(ckpt):
    """The model weights inside a checkpoint / state dict, without DDP or compile prefixes."""
    import torch
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


def _few(keys):
    keys = list(keys)
    return "none" if not keys else ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
