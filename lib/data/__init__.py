"""The data of a run: every dataset becomes a DataSpec (a train and a validation Split, in memory or
as image files), served by one of two loaders that run the same device-side BatchTransform:

  - MemoryLoader (data.loader: memory, chosen by `auto` when the decoded data fits): keeps the uint8
    tensor on the training device and per batch shuffles, slices, converts, resizes, augments and
    normalizes there. No worker processes, no per-sample Python.
  - FileLoader (data.loader: dataloader): a torch DataLoader whose workers decode files into uint8
    tensors; the same BatchTransform runs on each batch.

    formats.py     readers of IDX, CIFAR-10 batches, pixel CSVs and image files
    spec.py        DataSpec and Split, the fixed held-out split
    sources.py     the DATASETS catalogue and its in-memory sources
    files.py       the image_csv and image_folder sources
    transforms.py  BatchTransform and the normalisation statistics
    augment.py     per-image recipe transforms, random erasing, mixup / cutmix
    loaders.py     shard_indices, MemoryLoader, FileLoader
    workers.py     the DataLoader workers' stop signals and their end at exit
    cache.py       the on-disk decode cache
    build.py       check() and build_data()
"""
from lib.data.build import Data, build_data, check
from lib.data.formats import read_idx
from lib.data.loaders import shard_indices
from lib.data.sources import DATASETS

__all__ = ["DATASETS", "Data", "build_data", "check", "read_idx", "shard_indices"]
