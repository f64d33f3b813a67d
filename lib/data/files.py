"""The two dataset sources that read image files, registered in DATASETS by sources.py:

    image_csv      a directory of images + a CSV with file-name and label columns (+ optional
                   split lists of file names)
    image_folder   root/<class>/<images>, or root/train/<class>/ + root/val/<class>/

Both return Splits of file paths and labels, with channels and size taken from data.channels /
data.image_size or probed from the first image; nothing is decoded here.
"""
import csv
import re

import torch

from lib.data.formats import IMAGE_EXTENSIONS, probe_image
from lib.data.spec import DataSpec, Split, existing_path, fixed_split
from lib.errors import UserError, choices_text, did_you_mean


def image_csv(d, ctx):
    """A directory of images + a CSV with file-name and label columns (+ optional split lists)."""
    table = existing_path(d.csv, "data.csv", "the labels CSV")
    images = existing_path(d.images, "data.images", "the image directory", directory=True)
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
        lst = existing_path(path, key, "a text file of image names, one per line")
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
        tr, va = fixed_split(len(rows), d.val_fraction)
    spec = DataSpec("image_csv", Split(lab, files=files).subset(tr), Split(lab, files=files).subset(va),
                    num_classes=len(classes), classes=classes, source=f"{table} + images in {images}")
    spec.root = images
    return _finish_file_spec(spec, d)


def image_folder(d, ctx):
    """root/<class>/*.png, or root/train/<class>/ + root/val/<class>/ (torchvision ImageFolder layout)."""
    root = existing_path(d.images or d.root, "data.images", "the image folder", directory=True)
    subdirs = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    val_name = next((n for n in ("val", "valid", "validation", "test") if n in subdirs), None)
    if "train" in subdirs and val_name:
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
        train, val = _scan_folder(root / "train", classes), _scan_folder(root / val_name, classes)
    else:
        classes = sorted(subdirs)
        everything = _scan_folder(root, classes)
        tr, va = fixed_split(len(everything), d.val_fraction)
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
    channels, size = probe_image(spec.train.files[0])
    spec.channels = d.channels or channels
    if d.image_size is None:
        sizes = {probe_image(f)[1] for f in spec.train.files[:64]}
        if len(sizes) > 1:
            raise UserError(f"the images have different sizes ({', '.join(f'{h}x{w}' for h, w in sorted(sizes)[:3])}"
                            f", ...); set data.image_size so they are resized to one size.")
        spec.size = size
    else:
        spec.size = (d.image_size, d.image_size)
    return spec
