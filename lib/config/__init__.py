"""The config: a typed schema with defaults, YAML files, `dotted.key=value` overrides, validation.

    schema.py     every key, its type, default and help (Config, GanConfig, FinetuneConfig)
    load.py       defaults < script defaults < YAML < command line, with each key's source kept
    coerce.py     a value against its field's type
    validate.py   ranges and combinations; where(cfg, key) for messages
    render.py     to_dict, YAML dump, the --help listing

Only the standard library and PyYAML are imported, so `--help` and `--print-config` stay fast.
"""
from lib.config.load import from_dict, load, parse_override, read_yaml
from lib.config.render import describe, dump, to_dict
from lib.config.schema import (CheckpointCfg, Config, DataCfg, DistCfg, FinetuneCfg, FinetuneConfig, GanCfg,
                               GanConfig, LogCfg, LossCfg, ModelCfg, OptimCfg, SchedCfg, TrainCfg, WandbCfg,
                               all_keys)
from lib.config.validate import check_values, normalize_gpus, where

__all__ = ["CheckpointCfg", "Config", "DataCfg", "DistCfg", "FinetuneCfg", "FinetuneConfig", "GanCfg", "GanConfig",
           "LogCfg", "LossCfg", "ModelCfg", "OptimCfg", "SchedCfg", "TrainCfg", "WandbCfg", "all_keys",
           "check_values", "describe", "dump", "from_dict", "load", "normalize_gpus", "parse_override",
           "read_yaml", "to_dict", "where"]
