"""A config out again: as plain nested dicts (what a checkpoint stores), as YAML (config.yaml in the
run directory, --print-config), and as the one-line-per-key list that --help shows.
"""
import copy
import dataclasses

import yaml


def to_dict(obj) -> dict:
    """The config as plain nested dicts (open sections' extra keys flattened into their section)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "extra":
            out.update(copy.deepcopy(value))
        elif dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        else:
            out[f.name] = copy.deepcopy(value)
    return out


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, short lists of scalars inline: `milestones: [30, 60]`."""


def _represent_list(dumper, data):
    flow = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def dump(cfg) -> str:
    """The config as YAML, in schema order: what config.yaml and --print-config show."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def describe(schema: type, prefix: str = "") -> list[str]:
    """One line per key: 'optim.lr = 0.001   base learning rate' (for --help)."""
    lines = []
    inst = schema()
    for f in dataclasses.fields(schema):
        if f.name == "extra":
            continue
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(value):
            lines += describe(type(value), prefix + f.name + ".")
            continue
        shown = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
        shown = shown.removesuffix("...").strip()
        lines.append(f"  {prefix + f.name} = {shown}".ljust(44) + f"  {f.metadata.get('help', '')}")
    if getattr(schema, "OPEN", False):
        lines.append(f"  {prefix}<arg> = ...".ljust(44) + "  any keyword argument of the chosen "
                     f"{prefix.rstrip('.')}")
    return lines
