"""INITS registry: every torch.nn.init scheme by name, applied by layer type.

    model:
      init:
        name: kaiming_normal      # conv, linear and rnn weights (unless their own entry says otherwise)
        nonlinearity: relu        # the scheme's arguments
        bias: 0                   # constant for their biases (null: keep PyTorch's)
        conv:   {name: kaiming_normal, mode: fan_out, bias: 0}
        linear: {name: normal, std: 0.01, bias: 0}
        norm:   {name: normal, mean: 1.0, std: 0.02, bias: 0}    # batch/group/layer/instance norm
        rnn:    {name: orthogonal}

`default` keeps PyTorch's own initialisation.
"""
from __future__ import annotations

import torch
from torch import nn

from lib.errors import UserError, did_you_mean
from lib.registry import Registry, check_kwargs

INITS = Registry("init scheme")

# name -> (torch.nn.init function, the tensor ranks it accepts)
_SCHEMES = {
    "uniform": (nn.init.uniform_, None), "normal": (nn.init.normal_, None),
    "constant": (nn.init.constant_, None), "ones": (nn.init.ones_, None), "zeros": (nn.init.zeros_, None),
    "eye": (nn.init.eye_, (2,)), "dirac": (nn.init.dirac_, (3, 4, 5)),
    "xavier_uniform": (nn.init.xavier_uniform_, "2+"), "xavier_normal": (nn.init.xavier_normal_, "2+"),
    "kaiming_uniform": (nn.init.kaiming_uniform_, "2+"), "kaiming_normal": (nn.init.kaiming_normal_, "2+"),
    "orthogonal": (nn.init.orthogonal_, "2+"), "sparse": (nn.init.sparse_, (2,)),
    "trunc_normal": (nn.init.trunc_normal_, None),
}
for _name, (_fn, _ranks) in _SCHEMES.items():
    INITS.add(_name, _fn, ranks=_ranks)
INITS.add("default", None, ranks=None)

LAYER_TYPES = {
    "conv": (nn.modules.conv._ConvNd,),
    "linear": (nn.Linear, nn.Bilinear),
    "norm": (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm),
    "rnn": (nn.RNNBase,),
}
SPEC_KEYS = ("name", "bias")


def _split(spec):
    """{name, bias, **args} -> (name, bias, args)."""
    spec = dict(spec or {})
    return spec.pop("name", "default"), spec.pop("bias", None), spec


def check(init_cfg: dict, where: str = "model.init", origins: dict | None = None) -> None:
    """Validate the init section: scheme names, their arguments, and the per-type entries; errors
    name the file (or the command line) the section came from, when `origins` knows it."""
    source = (origins or {}).get(where)
    try:
        _check(init_cfg, where)
    except UserError as e:
        if not source:
            raise
        raise UserError(f"{source}: {e}") from None


def _check(init_cfg, where):
    if not isinstance(init_cfg, dict):
        raise UserError(f"{where} must be a mapping like {{name: kaiming_normal}}.")
    top = {k: v for k, v in init_cfg.items() if k not in LAYER_TYPES}
    specs = {"": top, **{t: init_cfg[t] for t in LAYER_TYPES if t in init_cfg}}
    for layer_type, spec in specs.items():
        key = where + (f".{layer_type}" if layer_type else "")
        if not isinstance(spec, dict):
            raise UserError(f"{key} must be a mapping like {{name: xavier_uniform, bias: 0}}.")
        name, bias, args = _split(spec)
        fn = INITS.get(name, where=f"{key}.name")
        if bias is not None and not isinstance(bias, (int, float)):
            raise UserError(f"{key}.bias must be a number or null, not {bias!r}.")
        if fn is None:
            if args:
                hint = "".join(did_you_mean(a, ("name", "bias")) for a in args)
                raise UserError(f"{key}: 'default' takes no arguments (got {', '.join(args)}){hint}.")
            continue
        check_kwargs(fn, args, key, skip=("tensor",))


def _policy(init_cfg, layer_type):
    if layer_type in init_cfg:
        return _split(init_cfg[layer_type])
    if layer_type == "norm":
        return "default", None, {}
    top = {k: v for k, v in init_cfg.items() if k not in LAYER_TYPES}
    return _split(top)


def apply_init(model: nn.Module, init_cfg: dict | None) -> None:
    """Initialise every conv / linear / norm / rnn layer of `model` by its type's policy."""
    init_cfg = init_cfg or {"name": "default"}
    check(init_cfg)
    for mod_name, module in model.named_modules():
        layer_type = next((t for t, classes in LAYER_TYPES.items() if isinstance(module, classes)), None)
        if layer_type is None:
            continue
        name, bias, args = _policy(init_cfg, layer_type)
        fn, ranks = INITS.get(name), INITS.meta(name)["ranks"]
        for p_name, p in module.named_parameters(recurse=False):
            is_bias = p_name.startswith("bias")
            with torch.no_grad():
                if is_bias:
                    if bias is not None:
                        p.fill_(float(bias))
                    continue
                if fn is None:
                    continue
                if p.dim() < 2 and layer_type == "norm":
                    pass  # norm weights are 1-D: any elementwise scheme works
                elif ranks == "2+" and p.dim() < 2 or isinstance(ranks, tuple) and p.dim() not in ranks:
                    need = "2-D or larger" if ranks == "2+" else f"{'/'.join(map(str, ranks))}-D"
                    raise UserError(
                        f"model.init: {name} needs {need} weights but {mod_name}.{p_name} is {p.dim()}-D; "
                        f"give {layer_type} layers their own scheme with model.init.{layer_type}.")
                fn(p, **args)
