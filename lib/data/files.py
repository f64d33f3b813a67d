"""The two dataset sources that read image files, registered in DATASETS by sources.py:

    image_csv      a directory of images + a CSV with file-name and label columns (+ optional
                   split lists of file names)
    image_folder   root/<class>/<images>, or root/train/<class>/ + root/val/<class>/, or ImageNet's
                   root/train/<wnid>/ + a flat root/val/ labelled by data.val_labels (Kaggle's
                   LOC_val_solution.csv or the devkit's ground truth); data.class_index gives the class
                   order and names (imagenet_class_index.json, LOC_synset_mapping.txt, one wnid a line)

Both return Splits of file paths and labels, with channels and size taken from data.channels /
data.image_size or probed from the first image; nothing is decoded here.
"""
import csv
import json
import re
from collections import Counter
from pathlib import Path

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
    """root/<class>/*.png, or root/train/<class>/ + root/val/<class>/ (torchvision ImageFolder layout), or
    ImageNet's root/train/<wnid>/ + a flat root/val/ labelled by data.val_labels; data.class_index sets the
    class order and names."""
    root = existing_path(d.images or d.root, "data.images", "the image folder", directory=True)
    subdirs = _subdirs(root)
    val_name = next((n for n in ("val", "valid", "validation", "test") if n in subdirs), None)
    split = "train" in subdirs and val_name
    class_root = root / "train" if split else root
    folders = sorted(_subdirs(class_root))
    if not folders:
        raise UserError(f"{root} has no class folders; image_folder expects root/<class>/<image files> "
                        f"(or root/train/<class>/ and root/val/<class>/).")
    index, names = _class_index(d.class_index) if d.class_index else (folders, folders)
    known = set(index)
    outside = [f for f in folders if f not in known]
    if outside:
        raise UserError(f"class folder {class_root / outside[0]} is not in data.class_index={d.class_index} "
                        f"({len(outside)} such folders){did_you_mean(outside[0], index)}; give a class index "
                        f"that lists every class folder, or remove the folder.")
    present = set(folders)
    keep = [i for i, w in enumerate(index) if w in present]           # the file's order, folders present
    wnids, classes = [index[i] for i in keep], [names[i] for i in keep]
    if split and not _subdirs(root / val_name):                        # ImageNet's flat val/ folder
        train, val = _scan_folder(root / "train", wnids), _flat_val(root / val_name, d, wnids, classes, index)
    elif d.val_labels:
        where = f"{root / val_name} has class folders, which give the labels" if split else \
            f"{root} has no train/ and val/ folders"
        raise UserError(f"data.val_labels={d.val_labels} labels a flat val/ folder (root/train/<class>/ + "
                        f"root/val/<images>), but {where}; unset data.val_labels.")
    elif split:
        train, val = _scan_folder(root / "train", wnids), _scan_folder(root / val_name, wnids)
    else:
        everything = _scan_folder(root, wnids)
        tr, va = fixed_split(len(everything), d.val_fraction)
        train, val = everything.subset(tr), everything.subset(va)
    spec = DataSpec("image_folder", train, val, num_classes=len(classes), classes=classes,
                    source=f"image folder {root}" + "".join(f", {k} {v}" for k, v in (
                        ("val labels", d.val_labels), ("class index", d.class_index)) if v))
    spec.root = root
    spec.folders = wnids            # class i's folder name (wnid); spec.classes[i] is its readable name
    return _finish_file_spec(spec, d)


def _subdirs(folder):
    return {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}


def _class_index(path):
    """(wnids, names) in the file's order, from imagenet_class_index.json ({"0": ["n01440764", "tench"], ...}),
    LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca" per line) or one folder name per line."""
    path = existing_path(path, "data.class_index", "the class index: imagenet_class_index.json, "
                         "LOC_synset_mapping.txt or a text file of one class folder name per line")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            table = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"data.class_index={path} is not valid JSON ({e}); give imagenet_class_index.json "
                            f"or a text file of one class per line.") from None
        ok = isinstance(table, dict) and set(table) == {str(i) for i in range(len(table))} and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(s, str) for s in v) for v in table.values())
        if not ok or not table:
            raise UserError(f"data.class_index={path} is not in imagenet_class_index.json's form "
                            f'{{"0": ["n01440764", "tench"], "1": [...], ...}} (keys 0..N-1); fix the file.')
        rows = [(table[str(i)][0], table[str(i)][1], f"key {i}") for i in range(len(table))]
    else:
        lines = text.rstrip().splitlines()
        blank = [k for k, line in enumerate(lines, 1) if not line.strip()]
        if not lines or blank:
            raise UserError(f"data.class_index={path} " + (f"line {blank[0]} is empty" if blank else "is empty")
                            + "; it needs one class per line (a line's position is its class index).")
        rows = []
        for k, line in enumerate(lines, 1):
            wnid, *rest = line.split(None, 1)
            rows.append((wnid, rest[0].split(",")[0].strip() if rest else wnid, f"line {k}"))
    first = {}
    for wnid, _, where in rows:
        if wnid in first:
            raise UserError(f"data.class_index={path} lists {wnid} twice ({first[wnid]} and {where}); "
                            f"each class must appear once.")
        first[wnid] = where
    return [r[0] for r in rows], [r[1] for r in rows]


def _flat_val(val_dir, d, wnids, names, index):
    """A flat folder of validation images (ILSVRC2012_val_00000001.JPEG, ...), labelled by data.val_labels:
    a CSV (file name, wnid or class name; Kaggle's LOC_val_solution.csv), or the devkit's
    ILSVRC2012_validation_ground_truth.txt (line k: the ILSVRC2012_ID, 1-based in data.class_index's order,
    of the k-th image in sorted name order)."""
    images = sorted((p for p in val_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                    key=lambda p: p.name)
    if not images:
        raise UserError(f"{val_dir} holds no image files ({', '.join(IMAGE_EXTENSIONS)}) and no class folders.")
    if not d.val_labels:
        raise UserError(f"{val_dir} holds images without class folders (the ILSVRC2012 validation layout); set "
                        f"data.val_labels to their labels file (LOC_val_solution.csv, or "
                        f"ILSVRC2012_validation_ground_truth.txt with data.class_index).")
    path = existing_path(d.val_labels, "data.val_labels", "the validation labels: a CSV (file name, class) or "
                         "ILSVRC2012_validation_ground_truth.txt")
    lines = [(k, line) for k, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1)
             if line.strip()]
    if not lines:
        raise UserError(f"data.val_labels={path} is empty; it needs one label per image of {val_dir}.")
    if re.fullmatch(r"\d+", lines[0][1].strip()):
        labelled = _devkit_labels(path, lines, images, val_dir, d.class_index, index)
    else:
        labelled = _csv_labels(path, lines, images, val_dir)
    position = {w: i for i, w in enumerate(wnids)}
    counts = Counter(names)             # ImageNet names two classes "crane" and two "maillot": wnids only
    position.update({n: i for i, n in enumerate(names) if counts[n] == 1 and n not in position})
    bad = [(k, lab) for lab, k in labelled if lab not in position]
    if bad:
        (k, lab), more = bad[0], f" (and {len(bad) - 1} more lines)" if len(bad) > 1 else ""
        why = (f"class {lab} has no folder in {val_dir.parent / 'train'}" if lab in index
               else f"'{lab}' names {counts[lab]} classes, so use their folder names (wnids)" if counts[lab] > 1
               else f"'{lab}' is not a class folder name or class name{did_you_mean(lab, wnids)}")
        raise UserError(f"data.val_labels={path} line {k}{more}: {why}; fix the label or add the class folder "
                        f"to train/.")
    y = torch.tensor([position[lab] for lab, _ in labelled], dtype=torch.int64)
    return Split(y, files=[str(p) for p in images])


def _devkit_labels(path, lines, images, val_dir, class_index, index):
    """[(wnid, line)] of ILSVRC2012_validation_ground_truth.txt, image k = line k."""
    if not class_index:
        raise UserError(f"data.val_labels={path} holds ILSVRC2012_IDs (integers in the devkit's class order, "
                        f"not the sorted folder names); set data.class_index to a text file of the wnids in "
                        f"ILSVRC2012_ID order, one per line, so that they map to classes.")
    if len(lines) != len(images):
        raise UserError(f"data.val_labels={path} has {len(lines)} labels (line {lines[-1][0]} is the last) but "
                        f"{val_dir} holds {len(images)} images; line k labels the k-th image in sorted name "
                        f"order, so give the ground truth of exactly these images.")
    out = []
    for k, line in lines:
        v = line.strip()
        if not v.isdigit() or not 1 <= int(v) <= len(index):
            raise UserError(f"data.val_labels={path} line {k}: '{v}' is not an ILSVRC2012_ID in 1..{len(index)} "
                            f"(the classes of data.class_index={class_index}); fix the line or the class index.")
        out.append((index[int(v) - 1], k))
    return out


def _csv_labels(path, lines, images, val_dir):
    """[(label, line)] per image of a CSV whose first column names the image (extension optional) and whose
    second column's first token is its class (Kaggle's PredictionString "n01751748 x y x y ...")."""
    key = {p.name: i for i, p in enumerate(images)} | {p.stem: i for i, p in enumerate(images)}
    found = [None] * len(images)
    for k, row in zip((k for k, _ in lines), csv.reader(line for _, line in lines)):
        if len(row) < 2 or not row[0].strip() or not row[1].split():
            raise UserError(f"data.val_labels={path} line {k} needs a file name and a label (file,label); "
                            f"fix the line.")
        i = key.get(Path(row[0].strip()).name)
        if i is None:
            continue                                        # a header, or an image not in this folder
        if found[i] is not None:
            raise UserError(f"data.val_labels={path} lists {images[i].name} twice (lines {found[i][1]} and {k}); "
                            f"keep one row per image.")
        found[i] = (row[1].split()[0], k)
    missing = [p.name for p, f in zip(images, found) if f is None]
    if missing:
        raise UserError(f"data.val_labels={path} has no row for {val_dir / missing[0]} ({len(missing)} such "
                        f"images); add a row '{Path(missing[0]).stem},<class>' for each, or move the images out "
                        f"of {val_dir}.")
    return found


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
    if d.train_crop:
        spec.size = None                    # decoded as stored; the per-image transform crops them
    elif d.image_size is None:
        sizes = {probe_image(f)[1] for f in spec.train.files[:64]}
        if len(sizes) > 1:
            raise UserError(f"the images have different sizes ({', '.join(f'{h}x{w}' for h, w in sorted(sizes)[:3])}"
                            f", ...); set data.image_size so they are resized to one size.")
        spec.size = size
    else:
        spec.size = (d.image_size, d.image_size)
    return spec
