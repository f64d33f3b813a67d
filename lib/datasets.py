"""Datasets: readers of the real on-disk formats, the DATASETS registry, and two loaders.

Every dataset becomes a `DataSpec`: a train and a validation `Split`, each either in memory (a uint8
tensor of shape (N, C, H, W), or float sequences) or a list of image files. Then:

  - MemoryLoader (data.loader: memory, chosen by `auto` when the decoded data fits): keeps the uint8
    tensor on the training device and per batch shuffles, slices, converts, resizes, augments and
    normalizes there. No worker processes, no per-sample Python.
  - FileLoader (data.loader: dataloader): a torch DataLoader whose workers decode files into uint8
    tensors; the same device-side BatchTransform runs on each batch.

Both shard like DistributedSampler (training order = f(seed, epoch), each rank every world-th
index, the tail of fewer than world indices dropped so every rank runs the same number of steps),
start mid-epoch at any batch (exact resume), and shard evaluation without padding so every
validation sample counts exactly once (pytorch#25162).
"""
import csv
import gzip
import hashlib
import math
import os
import pickle
import re
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lib.errors import UserError, choices_text, did_you_mean
from lib.registry import Registry
from lib.runtime import stable_seed

DATASETS = Registry("dataset")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
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
    skipped: int = 0                         # unreadable samples skipped (data.on_bad_sample: skip)


# ---------------------------------------------------------------------------------------------
# Readers of real formats
# ---------------------------------------------------------------------------------------------

def read_idx(path):
    """An IDX file (MNIST / FashionMNIST), gzip or not -> numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path} could not be read as an IDX file ({e}); re-download it or remove it "
                        f"so that it is downloaded again.") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file (bad magic number); replace it with the "
                        f"original MNIST/FashionMNIST file.")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != header + math.prod(dims):
        raise UserError(f"{path} is truncated or corrupt: the header promises {math.prod(dims)} bytes of "
                        f"data but {len(data) - header} are there; download it again.")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only the numpy types they hold (no code can run)."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path):
    """One CIFAR-10 python batch -> (uint8 (N, 3, 32, 32), int64 labels)."""
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch["labels"], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"{path} is not a readable CIFAR-10 batch ({e}); download the python version of "
                        f"CIFAR-10 again.") from None
    if len(x) != len(y):
        raise UserError(f"{path} holds {len(x)} images but {len(y)} labels; download it again.")
    return x, y


def _header_lines(path):
    with open(path) as f:
        return 1 if re.search(r"[A-Za-z]", f.readline()) else 0


def read_pixel_csv(path):
    """A Kaggle pixel CSV (label, pixel1..pixelN) -> (uint8 (N, C, S, S), int64 labels).

    Rows of the wrong length, non-numeric values, pixels outside 0..255 and negative labels are
    reported with their line number before any training starts.
    """
    path = Path(path)
    header = _header_lines(path)
    with open(path) as f:
        ncols = len(f.readline().strip().split(","))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # "input contained no data" is reported below, once
            table = np.loadtxt(path, delimiter=",", skiprows=header, dtype=np.int64, ndmin=2)
    except ValueError:
        _report_bad_csv_row(path, header, ncols)
        raise
    if table.shape[0] == 0:
        raise UserError(f"{path} has no data rows; a pixel CSV needs one row per image: label, pixel1..pixelN.")
    labels, pixels = table[:, 0], table[:, 1:]
    side, channels = _square_side(pixels.shape[1])
    if side is None:
        raise UserError(f"{path} has {pixels.shape[1]} pixel columns, which is not a square image "
                        f"(S*S or 3*S*S values); check the file's columns.")
    bad = np.flatnonzero((pixels < 0).any(1) | (pixels > 255).any(1))
    if len(bad):
        raise UserError(f"{path} line {bad[0] + 1 + header}: pixel values must be 0..255; fix that row.")
    bad = np.flatnonzero(labels < 0)
    if len(bad):
        raise UserError(f"{path} line {bad[0] + 1 + header}: label {labels[bad[0]]} is negative "
                        f"({len(bad)} such rows); labels are class indices 0, 1, ...")
    x = torch.from_numpy(pixels.astype(np.uint8).reshape(-1, channels, side, side))
    return x, torch.from_numpy(labels.astype(np.int64))


def _report_bad_csv_row(path, header, ncols):
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if lineno <= header or not line.strip():
                continue
            cells = line.strip().split(",")
            if len(cells) != ncols:
                raise UserError(f"{path} line {lineno} has {len(cells)} values but the first row has {ncols}; "
                                f"every row must be label, pixel1..pixelN.")
            for cell in cells:
                try:
                    int(cell)
                except ValueError:
                    raise UserError(f"{path} line {lineno}: '{cell[:20]}' is not an integer; a pixel CSV "
                                    f"holds integer labels and pixel values only.") from None


def _square_side(n):
    for channels in (1, 3):
        if n % channels == 0:
            side = math.isqrt(n // channels)
            if side * side * channels == n:
                return side, channels
    return None, None


def decode_image(path, size, channels):
    """An image file -> uint8 tensor (C, S, S); raises OSError/ValueError for unreadable files."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        a = np.array(im, dtype=np.uint8)
    t = torch.from_numpy(a)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _probe_image(path):
    """(channels, (H, W)) of an image file without decoding it all."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return (1 if im.mode in ("L", "1", "I;16", "I", "F") else 3), (im.size[1], im.size[0])
    except (OSError, ValueError) as e:
        raise UserError(f"could not read image {path} ({e}); fix or remove the file.") from None


# ---------------------------------------------------------------------------------------------
# The datasets
# ---------------------------------------------------------------------------------------------

def _fixed_split(n, val_fraction):
    """Indices (train, val) of a held-out split that depends only on n (not on the run seed)."""
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(n))
    n_val = max(1, int(round(n * val_fraction)))
    return order[n_val:].sort().values, order[:n_val].sort().values


@DATASETS.register("digits", task="classification", kind="image", offline=True)
def digits(d, ctx):
    """scikit-learn's UCI handwritten digits (1,797 8x8 images, 0..16) shipped inside the package."""
    table = _sklearn_digits()                                       # (1797, 65): 64 pixels, then the label
    x = torch.from_numpy(np.round(table[:, :64] * (255.0 / 16.0)).astype(np.uint8)).view(-1, 1, 8, 8)
    y = torch.from_numpy(table[:, 64].astype(np.int64))
    tr, va = _fixed_split(len(y), d.val_fraction)
    return DataSpec("digits", Split(y[tr], x[tr]), Split(y[va], x[va]), num_classes=10, channels=1,
                    size=(8, 8), classes=[str(i) for i in range(10)],
                    source="scikit-learn load_digits (UCI optdigits test set)")


def _sklearn_digits():
    """Read sklearn/datasets/data/digits.csv.gz directly: importing scikit-learn costs ~1 s."""
    import importlib.util
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return np.loadtxt(path, delimiter=",")
    from sklearn.datasets import load_digits  # a layout we do not know: the public API
    bunch = load_digits()
    return np.concatenate([bunch.data, bunch.target[:, None]], axis=1)


_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find_file(dirs, stem):
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def _mnist_like(d, ctx, name, folder, tv_class, classes):
    root = Path(d.root)
    dirs = [root / folder / "raw", root / folder, root]
    stems = [s for pair in _MNIST_FILES.values() for s in pair]

    def missing():
        return [s for s in stems if _find_file(dirs, s) is None]

    if missing() and d.download:
        ctx.run_once(lambda: _torchvision_download(tv_class, root, name, missing))
    if missing():
        raise UserError(
            f"{name} is not in {root / folder / 'raw'} (missing {', '.join(s + '.gz' for s in missing())})"
            + ("" if d.download else " and data.download is false")
            + "; put the four IDX files there (gzipped or not), or set data.root to where they are.")
    split = {}
    for part, (img_stem, lbl_stem) in _MNIST_FILES.items():
        img_path, lbl_path = _find_file(dirs, img_stem), _find_file(dirs, lbl_stem)
        def check(r, img_path=img_path, lbl_path=lbl_path):
            x, y = r
            if x.ndim != 4 or len(x) != len(y):
                raise UserError(f"{img_path} and {lbl_path} do not match ({len(x)} images, {len(y)} labels); "
                                f"download them again.")
            ctx.check_labels(y, str(lbl_path), limit=len(classes), unit="item")

        x, y = ctx.cached(name + "-" + part, [img_path, lbl_path],
                          lambda: (torch.from_numpy(read_idx(img_path).copy()).unsqueeze(1),
                                   torch.from_numpy(read_idx(lbl_path).astype(np.int64))), check=check)
        split[part] = Split(y, x)
    return DataSpec(name, split["train"], split["val"], num_classes=len(classes), channels=1,
                    size=tuple(split["train"].x.shape[2:]), classes=classes,
                    source=f"IDX files in {_find_file(dirs, stems[0]).parent}")


def _torchvision_download(tv_class, root, name, missing):
    if not missing():
        return
    import torchvision.datasets as tvd
    try:
        for train in (True, False):
            getattr(tvd, tv_class)(str(root), train=train, download=True)
    except Exception as e:  # no network, proxy, disk: all end in the same advice
        raise UserError(f"{name} is not in {root} and could not be downloaded ({type(e).__name__}: "
                        f"{str(e)[:120]}); download it on a machine with internet and copy it to "
                        f"{root}, or set data.root to where it is.") from None


@DATASETS.register("fashion_mnist", task="classification", kind="image")
def fashion_mnist(d, ctx):
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot"]
    return _mnist_like(d, ctx, "fashion_mnist", "FashionMNIST", "FashionMNIST", classes)


@DATASETS.register("mnist", task="classification", kind="image")
def mnist(d, ctx):
    return _mnist_like(d, ctx, "mnist", "MNIST", "MNIST", [str(i) for i in range(10)])


@DATASETS.register("cifar10", task="classification", kind="image")
def cifar10(d, ctx):
    root = Path(d.root)
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

    def missing():
        return [n for n in names if not (folder / n).is_file()]

    if missing() and d.download:
        ctx.run_once(lambda: _torchvision_download("CIFAR10", root, "cifar10", missing))
    if missing():
        raise UserError(f"CIFAR-10 is not in {folder} (missing {', '.join(missing())})"
                        + ("" if d.download else " and data.download is false")
                        + "; extract cifar-10-python.tar.gz into data.root so that "
                          "data.root/cifar-10-batches-py/data_batch_1 exists, or set data.root.")

    def load(files):
        parts = [read_cifar_batch(folder / n) for n in files]
        return (torch.from_numpy(np.concatenate([p[0] for p in parts])),
                torch.from_numpy(np.concatenate([p[1] for p in parts])))

    x, y = ctx.cached("cifar10-train", [folder / n for n in names[:5]], lambda: load(names[:5]),
                      check=lambda r: ctx.check_labels(r[1], f"{folder}/data_batch_1..5", limit=10, unit="image"))
    xv, yv = ctx.cached("cifar10-val", [folder / "test_batch"], lambda: load(names[5:]),
                        check=lambda r: ctx.check_labels(r[1], str(folder / "test_batch"), limit=10, unit="image"))
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return DataSpec("cifar10", Split(y, x), Split(yv, xv), num_classes=10, channels=3, size=(32, 32),
                    classes=classes, source=f"CIFAR-10 python batches in {folder}")


@DATASETS.register("csv", task="classification", kind="image", needs=("csv",))
def pixel_csv(d, ctx):
    path = _existing(d.csv, "data.csv", "the pixel CSV (label, pixel1..pixelN)")
    x, y = ctx.cached(f"csv-{path.stem}", [path], lambda: read_pixel_csv(path),   # one cache per file
                      check=lambda r: ctx.check_labels(r[1], str(path), row_offset=1 + _header_lines(path)))
    if d.val_csv:
        vpath = _existing(d.val_csv, "data.val_csv", "the validation pixel CSV")
        xv, yv = ctx.cached(f"csv-{vpath.stem}", [vpath], lambda: read_pixel_csv(vpath),
                            check=lambda r: ctx.check_labels(r[1], str(vpath), row_offset=1 + _header_lines(vpath)))
        if xv.shape[1:] != x.shape[1:]:
            raise UserError(f"{vpath} has images of shape {tuple(xv.shape[1:])} but {path} has "
                            f"{tuple(x.shape[1:])}; both CSVs must have the same columns.")
        train, val = Split(y, x), Split(yv, xv)
    else:
        tr, va = _fixed_split(len(y), d.val_fraction)
        train, val = Split(y[tr], x[tr]), Split(y[va], x[va])
    n = int(max(train.y.max(), val.y.max())) + 1
    return DataSpec("csv", train, val, num_classes=n, channels=x.shape[1], size=tuple(x.shape[2:]),
                    classes=[str(i) for i in range(n)], source=f"pixel CSV {path}")


@DATASETS.register("image_csv", task="classification", kind="image", needs=("csv", "images"))
def image_csv(d, ctx):
    """A directory of images + a CSV with file-name and label columns (+ optional split lists)."""
    table = _existing(d.csv, "data.csv", "the labels CSV")
    images = _existing(d.images, "data.images", "the image directory", directory=True)
    with open(table, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for key, col in (("data.image_col", d.image_col), ("data.label_col", d.label_col)):
            if col not in columns:
                raise UserError(f"{table} has no column '{col}' ({key}){did_you_mean(col, columns)}; "
                                f"its columns are: {choices_text(columns)}.")
        rows = []
        for i, r in enumerate(reader):
            if None in r:                                   # csv.DictReader's key for surplus fields
                raise UserError(f"{table} line {i + 2} has {len(columns) + len(r[None])} fields but the header "
                                f"has {len(columns)}; fix that row (a comma inside a file name needs quotes).")
            rows.append((r[d.image_col], (r[d.label_col] or "").strip(), i + 2))
    if not rows:
        raise UserError(f"{table} has no rows; it needs one row per image.")
    empty = [r[2] for r in rows if not r[1] or not r[0].strip()]
    if empty:
        raise UserError(f"{table} line {empty[0]} has an empty {d.image_col} or {d.label_col} ({len(empty)} such "
                        f"rows); every row needs a file name and a label.")
    names = [r[1] for r in rows]
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        labels = [int(n) for n in names]
        classes = [str(i) for i in range(max(labels) + 1)]
    else:
        classes = sorted(set(names))
        labels = [classes.index(n) for n in names]
    lab = torch.tensor(labels, dtype=torch.int64)
    ctx.check_labels(lab, str(table), rows=[r[2] for r in rows])
    files = [str(images / r[0]) for r in rows]
    index_of = {r[0]: i for i, r in enumerate(rows)}

    def listed(path, key):
        lst = _existing(path, key, "a text file of image names, one per line")
        wanted = [line.strip() for line in open(lst) if line.strip()]
        unknown = [w for w in wanted if w not in index_of]
        if unknown:
            raise UserError(f"{lst} lists '{unknown[0]}' ({len(unknown)} such names), which is not in the "
                            f"{d.image_col} column of {table}; fix the list or the CSV.")
        return torch.tensor([index_of[w] for w in wanted], dtype=torch.long)

    if d.split_list or d.val_list:
        tr = listed(d.split_list, "data.split_list") if d.split_list else None
        va = listed(d.val_list, "data.val_list") if d.val_list else None
        everything = torch.arange(len(rows))
        if tr is None:
            tr = everything[~torch.isin(everything, va)]
        if va is None:
            va = everything[~torch.isin(everything, tr)]
        if len(va) == 0:
            raise UserError(f"no validation images: every row of {table} is in data.split_list; "
                            f"give data.val_list or leave some rows out of the split list.")
    else:
        tr, va = _fixed_split(len(rows), d.val_fraction)
    spec = DataSpec("image_csv", Split(lab, files=files).subset(tr), Split(lab, files=files).subset(va),
                    num_classes=len(classes), classes=classes, source=f"{table} + images in {images}")
    spec.root = images
    return _finish_file_spec(spec, d)


@DATASETS.register("image_folder", task="classification", kind="image")
def image_folder(d, ctx):
    """root/<class>/*.png, or root/train/<class>/ + root/val/<class>/ (torchvision ImageFolder layout)."""
    root = _existing(d.images or d.root, "data.images", "the image folder", directory=True)
    subdirs = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    val_name = next((n for n in ("val", "valid", "validation", "test") if n in subdirs), None)
    if "train" in subdirs and val_name:
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
        train, val = _scan_folder(root / "train", classes), _scan_folder(root / val_name, classes)
    else:
        classes = sorted(subdirs)
        everything = _scan_folder(root, classes)
        tr, va = _fixed_split(len(everything), d.val_fraction)
        train, val = everything.subset(tr), everything.subset(va)
    if not classes:
        raise UserError(f"{root} has no class folders; image_folder expects root/<class>/<image files> "
                        f"(or root/train/<class>/ and root/val/<class>/).")
    spec = DataSpec("image_folder", train, val, num_classes=len(classes), classes=classes,
                    source=f"image folder {root}")
    spec.root = root
    return _finish_file_spec(spec, d)


def _scan_folder(root, classes):
    files, labels = [], []
    for i, c in enumerate(classes):
        folder = root / c
        if not folder.is_dir():
            continue
        for p in sorted(folder.rglob("*")):
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                files.append(str(p))
                labels.append(i)
    if not files:
        raise UserError(f"{root} holds no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders.")
    return Split(torch.tensor(labels, dtype=torch.int64), files=files)


def _finish_file_spec(spec, d):
    """Channels and size of a file dataset, from data.channels / data.image_size or the first image."""
    channels, size = _probe_image(spec.train.files[0])
    spec.channels = d.channels or channels
    if d.image_size is None:
        sizes = {_probe_image(f)[1] for f in spec.train.files[:64]}
        if len(sizes) > 1:
            raise UserError(f"the images have different sizes ({', '.join(f'{h}x{w}' for h, w in sorted(sizes)[:3])}"
                            f", ...); set data.image_size so they are resized to one size.")
        spec.size = size
    else:
        spec.size = (d.image_size, d.image_size)
    return spec


@DATASETS.register("synthetic", task="classification", kind="image", offline=True)
def synthetic(d, ctx):
    """Learnable class templates plus noise, any size: for benchmarks and tests."""
    k = ctx.num_classes or 10
    c = d.channels or 3
    s = d.image_size or 32
    n = d.num_samples or 10000
    g = torch.Generator().manual_seed(1234)
    coarse = torch.rand(k, c, max(2, s // 4), max(2, s // 4), generator=g)
    templates = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False) * 200 + 28

    def make(count, seed):
        gen = torch.Generator().manual_seed(seed)
        y = torch.randint(0, k, (count,), generator=gen)
        x = templates[y] + torch.randn(count, c, s, s, generator=gen) * 40
        return Split(y, x.clamp_(0, 255).round_().to(torch.uint8))

    return DataSpec("synthetic", make(n, 1), make(max(k, n // 5), 2), num_classes=k, channels=c, size=(s, s),
                    classes=[str(i) for i in range(k)], source=f"synthetic templates ({k} classes, {c}x{s}x{s})")


@DATASETS.register("sine", task="regression", kind="sequence", offline=True)
def sine(d, ctx):
    """Noisy sine waves of random frequency and phase; predict the next value (LSTM regression)."""
    n, t = d.num_samples or 4000, d.seq_len

    def make(count, seed):
        g = torch.Generator().manual_seed(seed)
        freq = torch.rand(count, 1, generator=g) * 0.25 + 0.05
        phase = torch.rand(count, 1, generator=g) * 2 * math.pi
        steps = torch.arange(t + 1, dtype=torch.float32)
        wave = torch.sin(freq * steps + phase) + 0.01 * torch.randn(count, t + 1, generator=g)
        return Split(y=wave[:, t:].clone(), x=wave[:, :t].unsqueeze(-1).contiguous())  # x (N, T, 1), y (N, 1)

    return DataSpec("sine", make(n, 1), make(max(2, n // 4), 2), task="regression", kind="sequence",
                    num_classes=1, channels=1, size=(t, 1), source=f"sine waves, {t} steps")


def _existing(path, key, what, directory=False):
    if not path:
        raise UserError(f"{key} is not set; give the path of {what}.")
    p = Path(path)
    ok = p.is_dir() if directory else p.is_file()
    if not ok:
        kind = "directory" if directory else "file"
        raise UserError(f"{key}={path}: no such {kind}; give the path of {what}.")
    return p


# ---------------------------------------------------------------------------------------------
# The device-side batch transform
# ---------------------------------------------------------------------------------------------

class BatchTransform:
    """uint8 (B, C, H, W) on the device -> float (B, C', S, S): convert, resize, augment, normalize.

    When no resize or channel change is needed, augmentation runs on the uint8 bytes and conversion
    plus normalization is one fused pass (x * 1/(255 std) - mean/std); otherwise the float image is
    converted, resized and augmented first. Augmentation is random per sample but drawn from a
    generator seeded by (seed, epoch, batch, rank), so a resumed run draws what the first one drew.
    """

    def __init__(self, spec, d, device, channels_last=False, channels=None):
        self.src_channels = spec.channels if spec.kind == "image" else None
        self.dst_channels = channels or spec.channels
        self.size = (d.image_size, d.image_size) if d.image_size else tuple(spec.size)
        self.augment = d.augment
        self.channels_last = channels_last
        self.device = device
        self.sequence = spec.kind == "sequence"
        if not self.sequence:
            mean, std = _norm_stats(spec, d, self)
            self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self.scale = 1.0 / (255.0 * self.std)                  # bytes -> normalized, in one pass
            self.shift = -self.mean / self.std

    def __call__(self, x, seed=None):
        if self.sequence:
            return x.float()
        augment = seed is not None and self.augment != "none"
        if x.shape[1] == self.dst_channels and tuple(x.shape[2:]) == self.size:
            if augment:
                x = self.random_augment(x, seed)                   # on the uint8 bytes
            x = x.float().mul_(self.scale).add_(self.shift)      # (x / 255 - mean) / std
        else:
            x = self.to_unit(x, scale=255.0)                       # float in 0..255, right size
            if augment:
                x = self.random_augment(x, seed)
            x = x.mul_(self.scale).add_(self.shift)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def to_unit(self, x, scale=1.0):
        """uint8 -> float in [0, scale] (default [0, 1]), channels converted, resized to the model's input."""
        x = x.float()
        if scale != 255.0:
            x = x.mul_(scale / 255.0)
        if self.dst_channels != x.shape[1]:
            if x.shape[1] == 1:
                x = x.expand(-1, self.dst_channels, -1, -1)
            else:  # ITU-R 601 luma, as PIL's convert("L")
                w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
                x = (x * w).sum(1, keepdim=True)
        if tuple(x.shape[2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False,
                              antialias=x.shape[2] > self.size[0])
        return x

    def random_augment(self, x, seed):
        """Random crop with zero padding of size/8 (the CIFAR recipe), plus a horizontal flip."""
        g = torch.Generator(device=x.device).manual_seed(seed)
        b, c, h, w = x.shape
        pad = max(1, h // 8)
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=g, device=x.device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=g, device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]      # (B, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]      # (B, 1, 1, W)
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[bi, ci, rows, cols]
        if self.augment == "crop_flip":
            flip = torch.rand(b, generator=g, device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x


def _norm_stats(spec, d, transform):
    if d.normalize == "none":
        return (0.0,) * transform.dst_channels, (1.0,) * transform.dst_channels
    if d.normalize == "symmetric":
        return (0.5,) * transform.dst_channels, (0.5,) * transform.dst_channels
    if d.normalize == "imagenet":
        if transform.dst_channels == 3:
            return IMAGENET_MEAN, IMAGENET_STD
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    if spec.mean is None:
        spec.mean, spec.std = channel_stats(spec, transform)
    return spec.mean, spec.std


def channel_stats(spec, transform):
    """Per-channel mean/std of (up to 10,000) training images after channel conversion, in float64."""
    if spec.train.x is not None:
        n = len(spec.train)
        idx = torch.linspace(0, n - 1, min(n, 10000)).long()
        sample = spec.train.x[idx]
    else:
        files = spec.train.files
        idx = np.linspace(0, len(files) - 1, min(len(files), 256)).astype(int)
        sample = torch.stack([_decode_or_fail(files[i], spec) for i in idx])
    x = transform.to_unit(sample.to("cpu")).double()
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def _decode_or_fail(path, spec):
    try:
        return decode_image(path, spec.size[0], spec.channels)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read image {path} ({e}); fix or remove the file, or set "
                        f"data.on_bad_sample=skip.") from None


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------

def shard_indices(n, *, epoch, seed, shuffle, train, rank, world):
    """This rank's sample indices for one epoch (a CPU int64 tensor).

    train: order = randperm(n) seeded by (seed, epoch) (or 0..n-1), the tail of n % world dropped,
    rank r takes order[r::world]; every rank gets n // world samples. Evaluation: no shuffle, no
    drop, no padding: rank r takes r, r + world, ... so the ranks together see each sample once.
    """
    if train and shuffle:
        g = torch.Generator().manual_seed(stable_seed("order", seed, epoch))
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    if train:
        order = order[: n - n % world]
    return order[rank::world]


class _Loader:
    """What both loaders share: epochs, mid-epoch starts, sharding and batch counting."""

    def __init__(self, n, *, batch_size, transform, device, rank, world, seed, shuffle, train):
        self.n, self.batch_size, self.transform, self.device = n, batch_size, transform, device
        self.rank, self.world, self.seed, self.shuffle, self.train = rank, world, seed, shuffle, train
        self.epoch, self.start = 0, 0
        if train and n // world == 0:
            raise UserError(f"the training set has {n} samples, fewer than the {world} processes; "
                            f"use more data or fewer processes.")

    def set_epoch(self, epoch, start_batch=0):
        """Iterate epoch `epoch` from batch `start_batch` on (resume mid-epoch)."""
        self.epoch, self.start = epoch, start_batch

    def indices(self):
        return shard_indices(self.n, epoch=self.epoch, seed=self.seed, shuffle=self.shuffle, train=self.train,
                             rank=self.rank, world=self.world)

    def samples_per_rank(self):
        return self.n // self.world if self.train else len(range(self.rank, self.n, self.world))

    def __len__(self):
        return math.ceil(self.samples_per_rank() / self.batch_size)

    def augment_seed(self, batch):
        return stable_seed("augment", self.seed, self.epoch, batch, self.rank) if self.train else None


class MemoryLoader(_Loader):
    """Batches sliced from tensors that live on the training device."""

    def __init__(self, split, **kw):
        super().__init__(len(split), **kw)
        self.x = split.x.to(self.device)
        self.y = split.y.to(self.device)

    def __iter__(self):
        idx = self.indices().to(self.device)
        start, self.start = self.start, 0
        for b in range(start, len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.transform(self.x.index_select(0, sel), self.augment_seed(b)), self.y.index_select(0, sel)


class TensorItems(torch.utils.data.Dataset):
    """In-memory tensors served one item at a time (data.loader=dataloader on an in-memory dataset)."""

    def __init__(self, split):
        self.x, self.y = split.x, split.y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i], None


class FileDataset(torch.utils.data.Dataset):
    """Decodes one image file per item into uint8 (C, S, S); errors come back as values, not raises."""

    def __init__(self, split, spec):
        self.files, self.y, self.size, self.channels = split.files, split.y, spec.size[0], spec.channels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return decode_image(self.files[i], self.size, self.channels), int(self.y[i]), None
        except (OSError, ValueError, SyntaxError) as e:
            return None, int(self.y[i]), f"{self.files[i]} ({type(e).__name__}: {e})"


def _collate(items):
    good = [it for it in items if it[0] is not None]
    bad = [it[2] for it in items if it[0] is None]
    if not good:
        return None, None, bad
    return torch.stack([it[0] for it in good]), torch.stack([torch.as_tensor(it[1]) for it in good]), bad


class _ShardSampler(torch.utils.data.Sampler):
    """Feeds the DataLoader this rank's indices from the current start batch on. It holds its loader
    weakly: a reference cycle would leave the DataLoader to the cyclic GC, which finalizes its queues
    in any order and then waits 5 s per worker to shut them down."""

    def __init__(self, loader):
        self.loader = weakref.proxy(loader)

    def __iter__(self):
        lo = self.loader
        return iter(lo.indices()[lo.start * lo.batch_size:].tolist())

    def __len__(self):
        lo = self.loader
        return max(0, lo.samples_per_rank() - lo.start * lo.batch_size)


class FileLoader(_Loader):
    """A tuned torch DataLoader (workers, pinned memory, persistent workers, prefetch) over files."""

    def __init__(self, dataset, *, num_workers, on_bad_sample, **kw):
        super().__init__(len(dataset), **kw)
        self.on_bad_sample = on_bad_sample
        self.skipped = 0
        cuda = self.device.type == "cuda"
        self.dataloader = torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size, sampler=_ShardSampler(self), num_workers=num_workers,
            collate_fn=_collate, pin_memory=cuda, persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None)

    def __iter__(self):
        b = self.start
        # The sampler reads self.start when the first batch is asked for: at once with workers, but
        # only at the first next() without them. So the start is reset after the first batch (or
        # when the epoch had nothing left), not here.
        for x, y, bad in self.dataloader:
            self.start = 0
            if bad:
                if self.on_bad_sample == "error":
                    raise UserError(f"could not read image {bad[0]}; fix or remove the file, or set "
                                    f"data.on_bad_sample=skip to skip unreadable images.")
                if x is None:
                    raise UserError(f"every image of a batch was unreadable (first: {bad[0]}); the data "
                                    f"is too damaged to train on.")
                self.skipped += len(bad)
                # Keep the batch size (and so every rank's step) unchanged: repeat good samples.
                fill = torch.arange(len(bad)) % len(x)
                x, y = torch.cat([x, x[fill]]), torch.cat([y, y[fill]])
            x = x.to(self.device, non_blocking=True)
            yield self.transform(x, self.augment_seed(b)), y.to(self.device, non_blocking=True)
            b += 1
        self.start = 0


# ---------------------------------------------------------------------------------------------
# Building the data of a run
# ---------------------------------------------------------------------------------------------

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
        shape = f"{s.channels}x{s.size[0]}x{s.size[1]}" if s.kind == "image" else f"seq {s.size[0]}"
        t = self.transform
        out = f"{t.dst_channels}x{t.size[0]}x{t.size[1]}" if s.kind == "image" else "same"
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


def disk_cache_key(tag, sources, extra=()):
    h = hashlib.sha1()
    for p in sources:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns};".encode())
    h.update(repr((tag, tuple(extra))).encode())
    return h.hexdigest()[:16]


def disk_cached(tag, sources, build, enabled=True, write=True, extra=(), folder=None, check=None):
    """build() once per source version; the result (tensors) is cached next to the first source.

    The key holds every source's size and mtime, so an edited file is decoded again. Writes are
    atomic (tmp + rename) and only done by one process per node; a read-only data directory
    simply means no cache. check(result), when given, runs on fresh and cached results alike,
    before anything is written: data that is refused leaves no cache behind.
    """
    check = check or (lambda result: None)
    if not enabled:
        result = build()
        check(result)
        return result
    folder = Path(folder or Path(sources[0]).parent) / ".cache"
    key = disk_cache_key(tag, sources, extra)
    path = folder / f"{tag}-{key}.pt"
    cached = None
    if path.is_file():
        try:
            cached = tuple(torch.load(path, weights_only=True))
        except Exception:
            pass  # a damaged cache is rebuilt below
    if cached is not None:
        check(cached)
        return cached
    result = build()
    check(result)
    if write:
        try:
            folder.mkdir(exist_ok=True)
            tmp = folder / f".{path.name}.{os.getpid()}.tmp"
            torch.save(list(result), tmp)
            os.replace(tmp, path)
            for old in folder.glob(f"{tag}-*.pt"):
                if old != path:
                    old.unlink(missing_ok=True)
        except OSError:
            pass
    return result


def check(cfg):
    """Pre-flight checks of the data section (no data is read)."""
    d = cfg.data
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


def _decode_to_memory(split, spec, d, rt, tag):
    """Decode every file of a split once (in parallel workers), skipping or reporting bad ones."""
    def build():
        ds = FileDataset(split, spec)
        dl = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=d.num_workers, collate_fn=_collate)
        xs, ys, bad = [], [], []
        for x, y, b in dl:
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


def build_data(cfg, rt=None, device=None):
    """The run's DataSpec and its train / val loaders on the runtime's device."""
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
        else:
            nbytes = (len(spec.train) + len(spec.val)) * spec.channels * spec.size[0] * spec.size[1]
        loader = "memory" if nbytes <= d.memory_limit_gb * 2**30 else "dataloader"
    if d.classes is None and cfg.model.num_classes is not None and spec.task == "classification" \
            and cfg.model.num_classes < spec.num_classes:
        raise UserError(f"data.name={d.name} has {spec.num_classes} classes but model.num_classes="
                        f"{cfg.model.num_classes}; raise model.num_classes or pick classes with data.classes.")
    if loader == "memory" and files:
        spec.train = _decode_to_memory(spec.train, spec, d, rt, f"{spec.name}-train")
        spec.val = _decode_to_memory(spec.val, spec, d, rt, f"{spec.name}-val")
    channels = d.channels or (cfg.model.in_channels if cfg.model.in_channels in (1, 3) else None)
    transform = BatchTransform(spec, d, device, channels_last=cfg.train.channels_last, channels=channels)
    common = dict(transform=transform, device=device, rank=rank, world=world, seed=cfg.seed)
    eval_bs = d.eval_batch_size or 2 * d.batch_size
    if loader == "memory":
        train = MemoryLoader(spec.train, batch_size=d.batch_size, shuffle=d.shuffle, train=True, **common)
        val = MemoryLoader(spec.val, batch_size=eval_bs, shuffle=False, train=False, **common)
    else:
        items = (lambda split: FileDataset(split, spec)) if files else TensorItems
        kw = dict(num_workers=d.num_workers, on_bad_sample=d.on_bad_sample, **common)
        train = FileLoader(items(spec.train), batch_size=d.batch_size, shuffle=d.shuffle, train=True, **kw)
        val = FileLoader(items(spec.val), batch_size=eval_bs, shuffle=False, train=False, **kw)
    return Data(spec, train, val, loader, transform)
