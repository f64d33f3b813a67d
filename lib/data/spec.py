"""What every dataset source returns: a DataSpec holding a train and a validation Split, each in
memory (a uint8 tensor (N, C, H, W), or float sequences) or a list of image files with labels; and
the two helpers the sources share: the fixed held-out split and the check that a configured path
exists.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lib.errors import UserError

SPLIT_SEED = 12345  # fixed, so the held-out split does not move when the run's seed changes


@dataclass
class Split:
    """One split. In memory: x (N, C, H, W) uint8 or (N, T, F) float; on disk: files + y."""
    y: torch.Tensor
    x: torch.Tensor = None
    files: list = None

    def __len__(self):
        return len(self.y)

    def subset(self, index):
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(y=self.y[index], x=None if self.x is None else self.x[index],
                     files=None if self.files is None else [self.files[i] for i in index.tolist()])


@dataclass
class DataSpec:
    name: str
    train: Split
    val: Split
    task: str = "classification"             # or "regression"
    kind: str = "image"                      # or "sequence"
    num_classes: int = None                  # classes, or outputs for regression
    channels: int = 1
    size: tuple = None                       # (H, W) of x / of decoded files
    classes: list = field(default_factory=list)
    mean: tuple = None                       # per-channel statistics in [0, 1] units
    std: tuple = None
    source: str = ""                         # where it came from, for the log
    root: Path = None                        # file datasets: where the decode cache goes
    folders: list = None                     # image_folder: class i's folder name (classes[i]: its name)
    skipped: int = 0                         # unreadable samples skipped (data.on_bad_sample: skip)


def fixed_split(n, val_fraction):
    """Indices (train, val) of a held-out split that depends only on n (not on the run seed)."""
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(n))
    n_val = max(1, int(round(n * val_fraction)))
    return order[n_val:].sort().values, order[:n_val].sort().values


def existing_path(path, key, what, directory=False):
    """Path(path), or a UserError naming the config key when it is unset or not there."""
    if not path:
        raise UserError(f"{key} is not set; give the path of {what}.")
    p = Path(path)
    ok = p.is_dir() if directory else p.is_file()
    if not ok:
        kind = "directory" if directory else "file"
        raise UserError(f"{key}={path}: no such {kind}; give the path of {what}.")
    return p
