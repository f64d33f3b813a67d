"""Type checks for config values: a value read from YAML or the command line against the field's
annotation (bool, int, float, str, Literal, Optional, Union, list, dict), converted where that is safe
(2.0 -> 2 for an int, '1e-3' -> 0.001 for a float) and otherwise refused in a sentence naming the key.
"""
import re
import typing
from typing import Literal, Union

from lib.errors import UserError, did_you_mean

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def coerce(value, tp, key, source):
    """Check `value` against the annotation `tp`; returns the (possibly converted) value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, source)
            except UserError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise UserError(f"{source}: {key} must be {_type_name(tp)}, not {show(value)}.")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off/false as False, yes/on/true as True
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((w for w in words if w in args), value)
        if value not in args:
            raise UserError(f"{source}: {key} must be one of {', '.join(map(str, args))}, "
                            f"not {show(value)}{did_you_mean(value, args)}.")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{source}: {key} must be a list (e.g. [1, 2]), not {show(value)}.")
        inner = args[0] if args else typing.Any
        return [coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key} must be a mapping (e.g. {{name: ...}}), not {show(value)}.")
        return value
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: {key} must be true or false, not {show(value)}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{source}: {key} must be an integer, not {show(value)}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # PyYAML reads 1e-3 (no dot) as a string
        raise UserError(f"{source}: {key} must be a number, not {show(value)}.")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{source}: {key} must be a string, not {show(value)}.")
    raise TypeError(f"unsupported schema type {tp} for {key}")


def _type_name(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
    return " or ".join(names.get(a, "a list" if typing.get_origin(a) is list else str(a)) for a in args)


def show(value):
    """A value as an error message quotes it: 'text', true, null, or a short repr."""
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) < 40 else text[:37] + "..."
