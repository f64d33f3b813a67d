"""Building a config: schema defaults < the script's own defaults < YAML file < `dotted.key=value`
overrides, each value type-checked as it is merged, and every set key's source kept in `cfg._origins`
so error messages can say where a value came from.

Every mistake a user can make here raises UserError naming the key, where it was set and the nearest
valid key. Only the standard library and PyYAML are imported, so `--help` and `--print-config` are fast.
"""
import dataclasses
from pathlib import Path
from typing import Any, Iterable, Optional, TypeVar, Union

import yaml

from lib.config.coerce import coerce, show
from lib.config.schema import all_keys
from lib.config.validate import check_values
from lib.errors import UserError, did_you_mean

C = TypeVar("C")


def load(schema: type[C], path: Optional[Union[str, Path]] = None, overrides: Iterable[str] = (),
         script_defaults: Optional[dict] = None) -> C:
    """Build a validated config of class `schema`; `origins` maps each set key to its source."""
    cfg = schema()
    origins = {}
    if script_defaults:
        _merge(cfg, script_defaults, "", "the script defaults", origins, schema)
    if path:
        _merge(cfg, read_yaml(path), "", str(path), origins, schema)
    for item in overrides:
        key, value = parse_override(item)
        _merge(cfg, _nest(key, value), "", "the command line", origins, schema)
    if script_defaults:
        _drop_other_choices_extras(cfg, script_defaults, origins)
    cfg._origins = origins
    cfg._file = str(path) if path else None
    check_values(cfg)
    return cfg


def _drop_other_choices_extras(cfg, script_defaults, origins):
    """A script's defaults may give options of its own choice (gan_train.py: optim.betas for Adam);
    when the user picks another name (optim.name=sgd), those options are dropped, not refused."""
    for section in ("optim", "sched", "loss"):
        default_name = (script_defaults.get(section) or {}).get("name")
        sec = getattr(cfg, section, None)
        if default_name is None or sec is None or sec.name == default_name:
            continue
        for key in list(sec.extra):
            if origins.get(f"{section}.{key}") == "the script defaults":
                del sec.extra[key]
                del origins[f"{section}.{key}"]


def from_dict(schema: type[C], data: dict, source: str = "a checkpoint") -> C:
    """Rebuild a config from to_dict() output (e.g. the one stored in a checkpoint)."""
    cfg = schema()
    origins = {}
    _merge(cfg, data, "", source, origins, schema)
    cfg._origins, cfg._file = origins, source
    return cfg


def read_yaml(path) -> dict:
    """A YAML mapping from `path` (safe_load: a config can never run code)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass an existing file to --config "
                        f"(the files in configs/ are examples).") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise UserError(f"{path} cannot be read as a YAML text file ({type(e).__name__}); pass a YAML config "
                        f"to --config.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path} is not valid YAML{where}: {problem}; fix the file "
                        f"(only plain YAML is read: no Python tags).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a YAML mapping of config sections (name:, data:, model:, ...), "
                        f"not a {type(data).__name__}.")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """'optim.lr=1e-3' -> ('optim.lr', 0.001); the value is parsed as YAML."""
    if "=" not in item or item.startswith("="):
        raise UserError(f"command line: '{item}' is not an override; write dotted.key=value "
                        f"(for example optim.lr=0.01), or use --config for a file.")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # an unparsable value stays a string; the type check below reports it
    return key.strip(), value


def _nest(dotted, value):
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _merge(obj, data, prefix, source, origins, root):
    """Merge the mapping `data` into the dataclass `obj`, type-checking every value."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: '{prefix.rstrip('.') or 'the config'}' must be a mapping of keys, "
                        f"not {show(data)}.")
    fields = {f.name: f for f in dataclasses.fields(obj) if f.name != "extra"}
    for key, value in data.items():
        key = str(key)
        dotted = prefix + key
        if key in fields:
            f = fields[key]
            current = getattr(obj, key)
            if dataclasses.is_dataclass(current):
                _merge(current, value, dotted + ".", source, origins, root)
                continue
            setattr(obj, key, coerce(value, f.type, dotted, source))
            origins[dotted] = source
        elif getattr(obj, "OPEN", False):
            if key.startswith("_"):
                raise UserError(f"{source}: '{dotted}' is not a valid option name.")
            obj.extra[key] = value
            origins[dotted] = source
        else:
            here = [prefix + k for k in fields]
            everywhere = all_keys(root) + [f.name for f in dataclasses.fields(root)]
            hint = did_you_mean(dotted, here) or did_you_mean(dotted, everywhere)
            raise UserError(f"{source}: unknown config key '{dotted}'{hint}; "
                            f"`--help` lists every key.")
