"""The image_folder source on ImageNet's (ILSVRC2012) layouts: root/train/<wnid>/ + a flat root/val/ of
images labelled by data.val_labels (Kaggle's LOC_val_solution.csv, a CSV of class names, or the devkit's
ILSVRC2012_validation_ground_truth.txt mapped through data.class_index), data.class_index's class order
and names (imagenet_class_index.json, LOC_synset_mapping.txt, one wnid a line), and each refusal.

Every image is one solid colour that stands for its class (red, green, blue), so a label can be checked
against the pixels the loader delivers as well as against the file it came from."""
import csv
import json
import re
from pathlib import Path

import pytest

import helpers
from lib import config
from lib.data import build_data
from lib.errors import UserError

WNIDS = ["n00000003", "n00000001", "n00000002"]            # created in this (unsorted) order
COLOUR = {"n00000001": 0, "n00000002": 1, "n00000003": 2}  # the channel that is lit: R, G, B
NAMES = {"n00000001": "alpha", "n00000002": "beta", "n00000003": "gamma"}
VAL = ["n00000002", "n00000003", "n00000001", "n00000001", "n00000002", "n00000003"]   # val image k's class
DEVKIT_ORDER = ["n00000002", "n00000003", "n00000001"]     # a class order that is not the sorted one


def _jpeg(path, wnid):
    from PIL import Image
    rgb = [0, 0, 0]
    rgb[COLOUR[wnid]] = 255
    Image.new("RGB", (8, 8), tuple(rgb)).save(path, quality=95)


def _val_name(k):
    return f"ILSVRC2012_val_{k + 1:08d}.JPEG"


def imagenet_tree(root, flat_val=True):
    """root/train/<wnid>/*.JPEG (2 per class) and root/val/: flat ILSVRC2012_val_0000000k.JPEG, or class folders."""
    for w in WNIDS:
        (root / "train" / w).mkdir(parents=True)
        for i in range(2):
            _jpeg(root / "train" / w / f"{w}_{i}.JPEG", w)
    (root / "val").mkdir()
    for k, w in enumerate(VAL):
        folder = root / "val" if flat_val else root / "val" / w
        folder.mkdir(exist_ok=True)
        _jpeg(folder / _val_name(k), w)
    return root


def kaggle_csv(path, rows=None):
    """LOC_val_solution.csv: ImageId (no extension), PredictionString ("wnid x y x y wnid x y x y ...")."""
    rows = list(enumerate(VAL)) if rows is None else rows
    lines = [f"{_val_name(k)[:-5]},{w} 1 2 7 7 {w} 0 0 3 3" for k, w in reversed(rows)]   # not in file order
    path.write_text("ImageId,PredictionString\n" + "\n".join(lines) + "\n")
    return path


def devkit_txt(path, order=DEVKIT_ORDER, labels=VAL):
    """ILSVRC2012_validation_ground_truth.txt: line k = the 1-based ID, in `order`, of val image k."""
    path.write_text("".join(f"{order.index(w) + 1}\n" for w in labels))
    return path


def build(root, *overrides, loader="dataloader"):
    cfg = config.load(config.Config, None, [
        f"data.root={root}", "data.name=image_folder", f"data.images={root}", "data.image_size=8",
        "data.num_workers=0", "data.cache=false", "data.normalize=none", "data.batch_size=4",
        f"data.loader={loader}", *overrides])
    return build_data(cfg)


def classes_of_files(split, spec):
    """{file name: the class folder (wnid) of its label}."""
    return {Path(f).name: spec.folders[int(y)] for f, y in zip(split.files, split.y)}


def check_labels(data):
    """Every val image has the class it was written for, every train image its folder's class, and the
    loader's pixels agree with the labels."""
    spec = data.spec
    assert classes_of_files(spec.val, spec) == {_val_name(k): w for k, w in enumerate(VAL)}
    assert all(Path(f).parent.name == spec.folders[int(y)] for f, y in zip(spec.train.files, spec.train.y))
    assert len(spec.train) == 6 and spec.num_classes == 3


def check_pixels(data):
    seen = 0
    for loader in (data.train, data.val):
        for x, y in loader:                                   # (B, 3, 8, 8) in [0, 1], labels (B,)
            lit = x.mean(dim=(2, 3)).argmax(dim=1)
            assert [data.spec.folders[int(c)] for c in y] == [
                next(w for w, ch in COLOUR.items() if ch == int(c)) for c in lit]
            seen += len(y)
    assert seen == 12


@pytest.mark.parametrize("form", ["kaggle", "names_with_extension"])
def test_flat_val_labelled_by_a_csv(tmp_path, form):
    root = imagenet_tree(tmp_path / "imagenet")
    if form == "kaggle":
        labels = kaggle_csv(tmp_path / "LOC_val_solution.csv")
        extra = []
    else:                                          # class names (from LOC_synset_mapping.txt), no header
        labels = tmp_path / "val_names.csv"
        labels.write_text("".join(f"{_val_name(k)},{NAMES[w]}\n" for k, w in enumerate(VAL)))
        mapping = tmp_path / "LOC_synset_mapping.txt"
        mapping.write_text("".join(f"{w} {NAMES[w]}, {NAMES[w].title()} latinus\n" for w in sorted(WNIDS)))
        extra = [f"data.class_index={mapping}"]
    data = build(root, f"data.val_labels={labels}", *extra)
    check_labels(data)
    assert data.spec.folders == sorted(WNIDS)             # no class_index / a sorted one: ImageFolder's order
    assert data.spec.classes == (sorted(WNIDS) if form == "kaggle" else ["alpha", "beta", "gamma"])
    check_pixels(build(root, f"data.val_labels={labels}", *extra, loader="memory"))


def test_devkit_ground_truth_through_an_unsorted_class_index(tmp_path):
    root = imagenet_tree(tmp_path / "imagenet")
    truth = devkit_txt(tmp_path / "ILSVRC2012_validation_ground_truth.txt")
    assert truth.read_text().split() == ["1", "2", "3", "3", "1", "2"]
    order = tmp_path / "devkit_wnids.txt"
    order.write_text("\n".join(DEVKIT_ORDER) + "\n")
    data = build(root, f"data.val_labels={truth}", f"data.class_index={order}")
    check_labels(data)
    assert data.spec.folders == data.spec.classes == DEVKIT_ORDER          # the class order is the file's
    assert data.spec.val.y.tolist() == [0, 1, 2, 2, 0, 1]
    check_pixels(build(root, f"data.val_labels={truth}", f"data.class_index={order}", loader="memory"))


@pytest.mark.parametrize("flat_val", [True, False])
def test_imagenet_class_index_json_sets_order_and_names(tmp_path, flat_val):
    root = imagenet_tree(tmp_path / "imagenet", flat_val=flat_val)
    order = ["n00000003", "n00000001", "n00000002"]
    index = tmp_path / "imagenet_class_index.json"
    index.write_text(json.dumps({str(i): [w, NAMES[w]] for i, w in enumerate(order)}))
    extra = [f"data.val_labels={kaggle_csv(tmp_path / 'LOC_val_solution.csv')}"] if flat_val else []
    data = build(root, f"data.class_index={index}", *extra)
    check_labels(data)
    assert data.spec.folders == order and data.spec.classes == ["gamma", "alpha", "beta"]
    by_file = {Path(f).name: int(y) for f, y in zip(data.spec.val.files, data.spec.val.y)}
    assert [by_file[_val_name(k)] for k in range(len(VAL))] == [order.index(w) for w in VAL]


def test_without_a_class_index_the_layouts_keep_imagefolder_order(tmp_path):
    data = build(imagenet_tree(tmp_path / "imagenet", flat_val=False))
    check_labels(data)
    assert data.spec.classes == sorted(WNIDS)
    (tmp_path / "plain").mkdir()
    (tmp_path / "imagenet" / "train").rename(tmp_path / "plain" / "all")      # root/<class>/ + held-out split
    data = build(tmp_path / "plain" / "all", "data.val_fraction=0.5")
    assert data.spec.classes == sorted(WNIDS) and len(data.spec.train) == len(data.spec.val) == 3
    assert all(Path(f).parent.name == data.spec.classes[int(y)] for s in (data.spec.train, data.spec.val)
               for f, y in zip(s.files, s.y))


def _refusal(tmp_path, case):
    """(overrides, message pattern) of one refused set-up on a fresh tree."""
    root = imagenet_tree(tmp_path / "imagenet", flat_val=case != "val_labels_with_class_folders")
    truth, order = tmp_path / "ILSVRC2012_validation_ground_truth.txt", tmp_path / "wnids.txt"
    order.write_text("\n".join(DEVKIT_ORDER) + "\n")
    sol = tmp_path / "LOC_val_solution.csv"
    if case == "no_val_labels":
        return root, [], r"holds images without class folders.*set data\.val_labels"
    if case == "integers_without_class_index":
        devkit_txt(truth)
        return root, [f"data.val_labels={truth}"], r"ILSVRC2012_IDs.*set data\.class_index to a text file"
    if case == "image_missing_from_csv":
        kaggle_csv(sol, [r for r in enumerate(VAL) if r[0] != 3])
        return root, [f"data.val_labels={sol}"], \
            re.escape(f"{sol} has no row for {root / 'val' / _val_name(3)} (1 such images); add a row "
                      f"'{_val_name(3)[:-5]},<class>'")
    if case == "unknown_class_in_csv":
        kaggle_csv(sol, [(k, "n00000009" if k == 4 else w) for k, w in enumerate(VAL)])
        return root, [f"data.val_labels={sol}"], \
            re.escape(f"{sol} line 3: 'n00000009' is not a class folder name or class name") + ".*fix the label"
    if case == "line_count":
        devkit_txt(truth, labels=VAL[:5])
        return root, [f"data.val_labels={truth}", f"data.class_index={order}"], \
            re.escape(f"{truth} has 5 labels (line 5 is the last) but {root / 'val'} holds 6 images")
    if case == "id_out_of_range":
        truth.write_text("1\n7\n3\n3\n2\n1\n")
        return root, [f"data.val_labels={truth}", f"data.class_index={order}"], \
            re.escape(f"{truth} line 2: '7' is not an ILSVRC2012_ID in 1..3")
    if case == "id_without_train_folder":
        order.write_text("\n".join([*DEVKIT_ORDER, "n00000004"]) + "\n")
        truth.write_text("1\n4\n3\n3\n2\n1\n")
        return root, [f"data.val_labels={truth}", f"data.class_index={order}"], \
            re.escape(f"{truth} line 2: class n00000004 has no folder in {root / 'train'}")
    if case == "train_folder_not_in_class_index":
        order.write_text("n00000002\nn00000003\n")
        devkit_txt(truth)
        return root, [f"data.val_labels={truth}", f"data.class_index={order}"], \
            re.escape(f"class folder {root / 'train' / 'n00000001'} is not in data.class_index={order}")
    if case == "class_index_lists_twice":
        order.write_text("n00000002\nn00000003\nn00000001\nn00000003\n")
        return root, [f"data.val_labels={kaggle_csv(sol)}", f"data.class_index={order}"], \
            re.escape(f"{order} lists n00000003 twice (line 2 and line 4)")
    if case == "ambiguous_name":                   # ImageNet has two "crane"s (n02012849, n03126707)
        order.write_text("n00000001 crane, bird\nn00000002 crane, machine\nn00000003 gamma\n")
        sol.write_text("".join(f"{_val_name(k)},{'crane' if w != 'n00000003' else w}\n" for k, w in enumerate(VAL)))
        return root, [f"data.val_labels={sol}", f"data.class_index={order}"], \
            re.escape(f"{sol} line 1 (and 3 more lines): 'crane' names 2 classes, so use their folder names")
    if case == "bad_json":
        index = tmp_path / "imagenet_class_index.json"
        index.write_text(json.dumps({"0": ["n00000001", "alpha"], "2": ["n00000002", "beta"]}))
        return root, [f"data.val_labels={kaggle_csv(sol)}", f"data.class_index={index}"], \
            "is not in imagenet_class_index.json's form"
    assert case == "val_labels_with_class_folders"
    return root, [f"data.val_labels={kaggle_csv(sol)}"], \
        re.escape(f"{root / 'val'} has class folders, which give the labels; unset data.val_labels")


@pytest.mark.parametrize("case", [
    "no_val_labels", "integers_without_class_index", "image_missing_from_csv", "unknown_class_in_csv",
    "line_count", "id_out_of_range", "id_without_train_folder", "train_folder_not_in_class_index",
    "class_index_lists_twice", "ambiguous_name", "bad_json", "val_labels_with_class_folders"])
def test_refusals_name_the_file_the_line_and_the_fix(tmp_path, case):
    root, overrides, pattern = _refusal(tmp_path, case)
    with pytest.raises(UserError, match=pattern) as err:
        build(root, *overrides)
    assert "\n" not in str(err.value) and str(err.value).endswith(".")


def test_train_py_runs_on_the_devkit_layout_and_refuses_in_one_line(tmp_path):
    """A user's run: train.py on the tree with the devkit's ground truth (every val image evaluated once),
    and the same command without data.val_labels: exit 2, one line, no traceback."""
    root = imagenet_tree(tmp_path / "imagenet")
    order = tmp_path / "devkit_wnids.txt"
    order.write_text("\n".join(DEVKIT_ORDER) + "\n")
    args = ["data.name=image_folder", f"data.images={root}", "data.image_size=8", "data.num_workers=0",
            "data.batch_size=4", "model.name=mlp", "train.epochs=1", "log.plots=false", "log.progress=false"]
    truth = devkit_txt(tmp_path / "ILSVRC2012_validation_ground_truth.txt")
    out = helpers.ok(helpers.script("train.py", *args, f"data.val_labels={truth}", f"data.class_index={order}",
                                    "name=inet", cwd=tmp_path))
    assert "image_folder: 6 train / 6 val" in out
    with open(tmp_path / "runs/inet/metrics.csv", newline="") as f:
        assert [int(r["val/samples"]) for r in csv.DictReader(f)] == [6]
    message = helpers.user_error(helpers.script("train.py", *args, "name=refused", cwd=tmp_path))
    assert "set data.val_labels" in message and not (tmp_path / "runs/refused/metrics.csv").exists()
