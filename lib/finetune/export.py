"""The fine-tuned model for later use: model.pt (the unwrapped state dict) and model.yaml, a train.py
config that evaluates it (python train.py --config <run>/model.yaml).
"""
from pathlib import Path

import yaml

from lib import io
from lib.config import to_dict


def export(run_dir, cfg, state: dict, inputs: dict) -> Path:
    """Write model.pt (the unwrapped state dict `state`) and model.yaml into run_dir, atomically;
    `inputs` are the model's num_classes and in_channels. Returns the path of model.pt."""
    path = Path(run_dir) / "model.pt"
    io.save_torch(state, path)
    d = to_dict(cfg)
    m = d["model"]
    m.update(num_classes=inputs["num_classes"], in_channels=inputs["in_channels"], weights=str(path.resolve()))
    if isinstance(cfg.finetune.head, list):
        m["head"] = cfg.finetune.head
    spec = {"name": f"{cfg.name}-eval", "output_dir": cfg.output_dir, "seed": cfg.seed, "data": d["data"],
            "model": m, "loss": d["loss"], "train": {"eval_only": True}, "checkpoint": {"resume": "never"}}
    io.write_text(Path(run_dir) / "model.yaml",
                  "# A train.py config that evaluates this fine-tuned model:\n"
                  f"#   python train.py --config {Path(run_dir) / 'model.yaml'}\n"
                  + yaml.safe_dump(spec, sort_keys=False))
    return path
