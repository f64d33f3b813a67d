"""The DATASETS catalogue: every dataset a config can name (data.name), with its task, kind and the
data keys it needs. The builders here make in-memory data: the UCI digits shipped with scikit-learn,
MNIST and FashionMNIST (IDX files), CIFAR-10 (python batches), a Kaggle pixel CSV, and the generated
`synthetic` images and `sine` sequences; the image_csv and image_folder entries read files (files.py).

A builder takes (the data config section, a context with run_once / cached / check_labels) and
returns a DataSpec.
"""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import lib.data.files as files
from lib.data.formats import header_lines, read_cifar_batch, read_idx, read_pixel_csv
from lib.data.spec import DataSpec, Split, existing_path, fixed_split
from lib.errors import UserError
from lib.registry import Registry

DATASETS = Registry("dataset")
DATASETS.add("image_csv", files.image_csv, task="classification", kind="image", needs=("csv", "images"))
DATASETS.add("image_folder", files.image_folder, task="classification", kind="image")


@DATASETS.register("digits", task="classification", kind="image", offline=True)
def digits(d, ctx):
    """scikit-learn's UCI handwritten digits (1,797 8x8 images, 0..16) shipped inside the package."""
    table = sklearn_digits()                                        # (1797, 65): 64 pixels, then the label
    x = torch.from_numpy(np.round(table[:, :64] * (255.0 / 16.0)).astype(np.uint8)).view(-1, 1, 8, 8)
    y = torch.from_numpy(table[:, 64].astype(np.int64))
    tr, va = fixed_split(len(y), d.val_fraction)
    return DataSpec("digits", Split(y[tr], x[tr]), Split(y[va], x[va]), num_classes=10, channels=1,
                    size=(8, 8), classes=[str(i) for i in range(10)],
                    source="scikit-learn load_digits (UCI optdigits test set)")


def sklearn_digits():
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
    path = existing_path(d.csv, "data.csv", "the pixel CSV (label, pixel1..pixelN)")
    x, y = ctx.cached(f"csv-{path.stem}", [path], lambda: read_pixel_csv(path),   # one cache per file
                      check=lambda r: ctx.check_labels(r[1], str(path), row_offset=1 + header_lines(path)))
    if d.val_csv:
        vpath = existing_path(d.val_csv, "data.val_csv", "the validation pixel CSV")
        xv, yv = ctx.cached(f"csv-{vpath.stem}", [vpath], lambda: read_pixel_csv(vpath),
                            check=lambda r: ctx.check_labels(r[1], str(vpath), row_offset=1 + header_lines(vpath)))
        if xv.shape[1:] != x.shape[1:]:
            raise UserError(f"{vpath} has images of shape {tuple(xv.shape[1:])} but {path} has "
                            f"{tuple(x.shape[1:])}; both CSVs must have the same columns.")
        train, val = Split(y, x), Split(yv, xv)
    else:
        tr, va = fixed_split(len(y), d.val_fraction)
        train, val = Split(y[tr], x[tr]), Split(y[va], x[va])
    n = int(max(train.y.max(), val.y.max())) + 1
    return DataSpec("csv", train, val, num_classes=n, channels=x.shape[1], size=tuple(x.shape[2:]),
                    classes=[str(i) for i in range(n)], source=f"pixel CSV {path}")


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
