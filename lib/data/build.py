"""Building the data of a run: the pre-flight check of the data section, and build_data(), which
calls the dataset's DATASETS entry, keeps the classes data.classes picks, decodes image files into
memory when the memory loader is chosen, and returns a Data: the DataSpec, its train and val loaders
and their BatchTransform.

The runtime is passed in, never imported: anything with rank, world_size, local_rank, device and
main_process_first() serves (or nothing: one CPU process).
"""
import contextlib
from dataclasses import dataclass

import torch

from lib.data.augment import ImageTransform, Mix
from lib.data.cache import disk_cached
from lib.data.formats import device_decode_problem, resolve_decoder
from lib.data.loaders import FileDataset, FileLoader, MemoryLoader, TensorItems, collate
from lib.data.sources import DATASETS
from lib.data.spec import DataSpec, Split
from lib.data.transforms import BatchTransform
from lib.data.workers import ignore_stop_signals
from lib.errors import UserError


@dataclass
class Data:
    spec: DataSpec
    train: object
    val: object
    loader: str                   # "memory" or "dataloader"
    transform: BatchTransform

    def model_inputs(self, model_cfg):
        """num_classes, in_channels, image_size and input_shape for models.build_model()."""
        s, t = self.spec, self.transform
        if s.kind == "sequence":
            shape = tuple(s.train.x.shape[1:])                     # (T, F)
            return dict(num_classes=model_cfg.num_classes or s.num_classes, in_channels=shape[-1],
                        image_size=None, input_shape=shape)
        c = model_cfg.in_channels or t.dst_channels
        return dict(num_classes=model_cfg.num_classes or s.num_classes, in_channels=c, image_size=t.size[0],
                    input_shape=(c, *t.size))

    def describe(self):
        s = self.spec
        if s.kind != "image":
            shape = f"seq {s.size[0]}"
        else:
            shape = f"{s.channels}x" + (f"{s.size[0]}x{s.size[1]}" if s.size else "HxW (as stored)")
        t = self.transform
        out = f"{t.dst_channels}x{t.size[0]}x{t.size[1]}" if s.kind == "image" else "same"
        if s.kind == "image" and not t.resize:
            ev = self.val.image_tf
            out += f" (RandomResizedCrop; eval resize {ev.eval_resize}, crop {ev.eval_crop})"
            items = getattr(getattr(self.train, "dataloader", None), "dataset", None)
            if getattr(items, "encoded", False):
                out += f", JPEGs decoded on {self.train.device}"
        classes = f"{s.num_classes} classes" if s.task == "classification" else f"{s.num_classes} outputs"
        skipped = f", {s.skipped} unreadable skipped" if s.skipped else ""
        return (f"{s.name}: {len(s.train)} train / {len(s.val)} val, {shape} -> {out}, {classes}, "
                f"{self.loader} loader{skipped} ({s.source})")


class _Context:
    """What a dataset builder may use: run-once downloads, the decode cache, label checks."""

    def __init__(self, rt, d, num_classes):
        self.rt, self.d, self.num_classes = rt, d, num_classes

    def run_once(self, fn):
        if self.rt is None:
            return fn()
        with self.rt.main_process_first():
            fn()

    def first_per_node(self):
        return self.rt.main_process_first() if self.rt is not None else contextlib.nullcontext()

    def cached(self, tag, sources, build, check=None):
        return disk_cached(tag, sources, build, enabled=self.d.cache,
                           write=self.rt is None or self.rt.local_rank == 0, check=check)

    def check_labels(self, y, where, rows=None, row_offset=1, limit=None, unit="line"):
        """Labels must lie in [0, model.num_classes) (or the dataset's own class count, `limit`);
        the first bad one is reported by its line (text files) or item number (binary files)."""
        n = self.num_classes or limit
        if n is None or len(y) == 0:
            return
        bad = torch.nonzero((y < 0) | (y >= n)).flatten()
        if len(bad):
            i = int(bad[0])
            line = rows[i] if rows else i + row_offset
            fix = "fix the labels or model.num_classes" if self.num_classes else "the file is damaged; get it again"
            raise UserError(f"{where} {unit} {line}: label {int(y[i])} is outside [0, {n}) "
                            f"({len(bad)} such {unit}s); {fix}.")


def check(d) -> dict:
    """Pre-flight checks of the data section `d` (cfg.data; no data is read): the dataset's registry
    entry (task, kind, ...), once the keys it needs are set."""
    meta = DATASETS.meta(d.name, where="data.name")
    for key in meta.get("needs", ()):
        if getattr(d, key) is None:
            raise UserError(f"data.name={d.name} needs data.{key}; set it to "
                            f"{'the CSV file' if key == 'csv' else 'the image directory'}.")
    return meta


def _subset_classes(spec, classes):
    """Keep only `classes` (original indices), relabelled 0..K-1 in the order given."""
    n = spec.num_classes
    bad = [c for c in classes if c >= n]
    if bad:
        raise UserError(f"data.classes lists class {bad[0]} but {spec.name} has classes 0..{n - 1}.")
    lut = torch.full((n,), -1, dtype=torch.long)
    lut[torch.tensor(classes)] = torch.arange(len(classes))

    def keep(split):
        mask = lut[split.y] >= 0
        out = split.subset(torch.nonzero(mask).flatten())
        out.y = lut[out.y]
        return out

    spec.train, spec.val = keep(spec.train), keep(spec.val)
    spec.classes = [spec.classes[c] if c < len(spec.classes) else str(c) for c in classes]
    spec.num_classes = len(classes)
    if len(spec.train) == 0 or len(spec.val) == 0:
        raise UserError(f"data.classes={classes} leaves no {'training' if len(spec.train) == 0 else 'validation'} "
                        f"samples in {spec.name}.")
    return spec


def _decode_to_memory(split, spec, d, rt, tag, decoder):
    """Decode every file of a split once (in parallel workers), skipping or reporting bad ones."""
    def build():
        print(f"decoding {len(split)} images of {spec.root} into memory"
              + (f" (rank {rt.rank}; cached for the others)" if rt is not None and d.cache else ""), flush=True)
        ds = FileDataset(split, spec, decoder=decoder)
        dl = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=d.num_workers, collate_fn=collate,
                                         worker_init_fn=ignore_stop_signals)
        xs, ys, bad = [], [], []
        for x, y, _, b in dl:
            bad += b
            if x is not None:
                xs.append(x)
                ys.append(y)
        if bad and d.on_bad_sample == "error":      # before anything is cached: an error writes nothing
            raise UserError(f"could not read image {bad[0]}; fix or remove the file, or set "
                            f"data.on_bad_sample=skip ({len(bad)} unreadable file(s)).")
        if not xs:
            raise UserError(f"none of the {len(split)} images of {spec.root} could be read"
                            + (f" (first: {bad[0]})" if bad else "") + "; check the files.")
        return torch.cat(xs), torch.cat(ys), bad

    x, y, bad = disk_cached(tag, split.files, build, enabled=d.cache, write=rt is None or rt.local_rank == 0,
                            extra=(spec.size, spec.channels, split.y.tolist(), d.on_bad_sample),
                            folder=spec.root)
    spec.skipped += len(bad)
    return Split(y, x)


def _decode_on_device(d, spec, decoder, device) -> bool:
    """Whether the loader decodes the JPEGs on the training device (data.decode_on: device, or auto on
    CUDA) rather than in the workers: only the per-image crop path (data.train_crop) of RGB images."""
    if d.decode_on == "workers" or not d.train_crop or spec.channels != 3:
        return False
    if decoder != "torchcodec":
        if d.decode_on == "device":
            raise UserError("data.decode_on=device decodes with TorchCodec, which cannot be imported here; "
                            "pip install torchcodec (>= 0.16, matching your torch), or set data.decode_on=workers.")
        return False
    if d.decode_on == "auto" and device.type != "cuda":
        return False
    problem = device_decode_problem(device)
    if problem and d.decode_on == "device":
        raise UserError(f"data.decode_on=device but TorchCodec cannot decode a JPEG on {device} ({problem}); "
                        f"install a TorchCodec built for this device (CUDA builds come from PyTorch's wheel index), "
                        f"or set data.decode_on=workers.")
    if problem:
        print(f"note: TorchCodec cannot decode JPEGs on {device} ({problem}); decoding in the loader workers "
              f"(data.decode_on=workers)", flush=True)
    return not problem


def build_data(cfg, rt=None, device: torch.device | None = None) -> Data:
    """The run's DataSpec and its train / val loaders on the runtime's device (on the CPU, one process,
    without a runtime). Reads cfg.data, the model's num_classes / in_channels, train.channels_last and
    the seed."""
    d = cfg.data
    device = device or (rt.device if rt else torch.device("cpu"))
    rank, world = (rt.rank, rt.world_size) if rt else (0, 1)
    builder = DATASETS.get(d.name, where="data.name")
    ctx = _Context(rt, d, cfg.model.num_classes if d.classes is None else None)
    spec = builder(d, ctx)
    if d.classes is not None:
        spec = _subset_classes(spec, d.classes)
    files = spec.train.files is not None
    loader = d.loader
    if loader == "auto":
        if spec.kind == "sequence" or not files:
            nbytes = (spec.train.x.numel() + spec.val.x.numel()) * spec.train.x.element_size()
        elif spec.size is None:                 # train_crop on files of varied sizes: no tensor holds them
            nbytes = float("inf")
        else:
            nbytes = (len(spec.train) + len(spec.val)) * spec.channels * spec.size[0] * spec.size[1]
        loader = "memory" if nbytes <= d.memory_limit_gb * 2**30 else "dataloader"
    if loader == "memory" and files and spec.size is None:
        raise UserError("data.loader=memory cannot hold image files of different sizes uncropped, which "
                        "data.train_crop needs; set data.loader=dataloader (or auto).")
    if d.classes is None and cfg.model.num_classes is not None and spec.task == "classification" \
            and cfg.model.num_classes < spec.num_classes:
        raise UserError(f"data.name={d.name} has {spec.num_classes} classes but model.num_classes="
                        f"{cfg.model.num_classes}; raise model.num_classes or pick classes with data.classes.")
    decoder = resolve_decoder(d.decoder) if files else "pil"
    if loader == "memory" and files:
        # Each node's first process decodes and writes the cache; the others then read it (one decode
        # and one writer per node). Without the cache every process decodes for itself.
        with ctx.first_per_node() if d.cache else contextlib.nullcontext():
            spec.train = _decode_to_memory(spec.train, spec, d, rt, f"{spec.name}-train", decoder)
            spec.val = _decode_to_memory(spec.val, spec, d, rt, f"{spec.name}-val", decoder)
    channels = d.channels or (cfg.model.in_channels if cfg.model.in_channels in (1, 3) else None)
    transform = BatchTransform(spec, d, device, channels_last=cfg.train.channels_last, channels=channels)
    common = dict(transform=transform, device=device, rank=rank, world=world, seed=cfg.seed)
    eval_bs = d.eval_batch_size or 2 * d.batch_size
    image = spec.kind == "image"
    tf_train, tf_val = (ImageTransform(d, train=True), ImageTransform(d, train=False)) if image else (None, None)
    mix = Mix(d, cfg.model.num_classes or spec.num_classes) if image and spec.task == "classification" else None
    if loader == "memory":
        train = MemoryLoader(spec.train, batch_size=d.batch_size, shuffle=d.shuffle, train=True,
                             image_tf=tf_train, mix=mix, **common)
        val = MemoryLoader(spec.val, batch_size=eval_bs, shuffle=False, train=False, image_tf=tf_val, **common)
    else:
        encoded = files and _decode_on_device(d, spec, decoder, device)

        def items(split, tf):
            return FileDataset(split, spec, tf, decoder, encoded) if files else TensorItems(split, tf)
        kw = dict(num_workers=d.num_workers, on_bad_sample=d.on_bad_sample, **common)
        train = FileLoader(items(spec.train, tf_train), batch_size=d.batch_size, shuffle=d.shuffle, train=True,
                           mix=mix, **kw)
        val = FileLoader(items(spec.val, tf_val), batch_size=eval_bs, shuffle=False, train=False, **kw)
    return Data(spec, train, val, loader, transform)
