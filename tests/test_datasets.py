"""Every dataset through files in its real on-disk format, the loaders' sharding and exactness, and
bad data reported with the file / line it comes from."""
import contextlib
import gzip
import os
import time

import pytest
import torch

import helpers
from lib import config
from lib.data import DATASETS, build_data, read_idx, shard_indices
from lib.errors import UserError


def data_cfg(tmp_path, *overrides):
    return config.load(config.Config, None, [f"data.root={tmp_path}", "data.num_workers=0", *overrides])


def _check_batches(data, channels, size, num_classes):
    x, y = next(iter(data.train))
    assert x.dtype == torch.float32 and x.shape[1:] == (channels, size, size)
    assert y.dtype == torch.int64 and int(y.max()) < num_classes
    total = sum(len(b[1]) for b in data.val)
    assert total == len(data.spec.val)
    return x


def test_digits_is_offline_and_resized(tmp_path):
    data = build_data(data_cfg(tmp_path, "data.image_size=32"))
    assert (len(data.spec.train), len(data.spec.val)) == (1438, 359) and data.loader == "memory"
    x = _check_batches(data, 1, 32, 10)
    assert abs(float(x.mean())) < 0.3 and 0.6 < float(x.std()) < 1.4     # normalized


@pytest.mark.parametrize("name, folder, gz", [("fashion_mnist", "FashionMNIST", True), ("mnist", "MNIST", False)])
def test_mnist_like_from_idx_files(tmp_path, name, folder, gz):
    helpers.write_mnist_like(tmp_path, folder, n_train=300, n_val=100, gz=gz)
    data = build_data(data_cfg(tmp_path, f"data.name={name}", "data.download=false"))
    assert (len(data.spec.train), len(data.spec.val)) == (300, 100)
    assert data.spec.classes[0] == ("T-shirt/top" if name == "fashion_mnist" else "0")
    _check_batches(data, 1, 28, 10)
    raw = read_idx(tmp_path / folder / "raw" / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    assert raw.shape == (300, 28, 28)
    assert torch.equal(data.spec.train.x[:, 0], torch.from_numpy(raw.copy()))   # bytes preserved


def test_cifar10_from_python_batches(tmp_path):
    helpers.write_cifar10(tmp_path, n_per_batch=40, n_val=50)
    data = build_data(data_cfg(tmp_path, "data.name=cifar10", "data.image_size=32", "data.augment=crop_flip"))
    assert (len(data.spec.train), len(data.spec.val)) == (200, 50) and data.spec.channels == 3
    _check_batches(data, 3, 32, 10)


def test_cifar10_batches_cannot_run_code(tmp_path):
    import pickle
    helpers.write_cifar10(tmp_path, n_per_batch=10, n_val=10)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f)
    with pytest.raises(UserError, match="not a readable CIFAR-10 batch"):
        build_data(data_cfg(tmp_path, "data.name=cifar10", "data.cache=false"))
    assert not (tmp_path / "pwned").exists()


def test_pixel_csv_with_and_without_val_csv(tmp_path):
    helpers.write_pixel_csv(tmp_path / "train.csv", n=200)
    helpers.write_pixel_csv(tmp_path / "test.csv", n=60, seed=9)
    data = build_data(data_cfg(tmp_path, "data.name=csv", f"data.csv={tmp_path / 'train.csv'}",
                               f"data.val_csv={tmp_path / 'test.csv'}"))
    assert (len(data.spec.train), len(data.spec.val)) == (200, 60)
    _check_batches(data, 1, 28, 10)
    split = build_data(data_cfg(tmp_path, "data.name=csv", f"data.csv={tmp_path / 'train.csv'}"))
    assert (len(split.spec.train), len(split.spec.val)) == (160, 40)


def test_pixel_csv_errors_name_the_line(tmp_path):
    path = helpers.write_pixel_csv(tmp_path / "bad.csv", n=20)
    lines = path.read_text().splitlines()
    lines[6] = lines[6].rsplit(",", 1)[0]                     # a short row: line 7 of the file
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="bad.csv line 7 has 784 values but the first row has 785"):
        build_data(data_cfg(tmp_path, "data.name=csv", f"data.csv={path}"))
    lines = helpers.write_pixel_csv(tmp_path / "lab.csv", n=20).read_text().splitlines()
    lines[4] = "12" + lines[4][1:]                            # label 12 on line 5
    (tmp_path / "lab.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"lab.csv line 5: label 12 is outside \[0, 10\)"):
        build_data(data_cfg(tmp_path, "data.name=csv", f"data.csv={tmp_path / 'lab.csv'}", "model.num_classes=10"))


@pytest.mark.parametrize("named", [False, True])
def test_image_csv_with_split_lists(tmp_path, named):
    root = helpers.write_image_csv(tmp_path / "ds", n=80, size=16, named_labels=named)
    args = ["data.name=image_csv", f"data.csv={root / 'labels.csv'}", f"data.images={root / 'images'}",
            f"data.split_list={root / 'train_list.txt'}", "data.image_size=16"]
    data = build_data(data_cfg(tmp_path, *args))
    assert (len(data.spec.train), len(data.spec.val)) == (60, 20)       # the rest of the rows is validation
    if named:
        assert data.spec.classes[0] == "digit_0"
    _check_batches(data, 1, 16, data.spec.num_classes)
    both = build_data(data_cfg(tmp_path, *args, f"data.val_list={root / 'test_list.txt'}", "data.loader=dataloader"))
    assert both.loader == "dataloader" and len(both.spec.val) == 20
    _check_batches(both, 1, 16, data.spec.num_classes)


def test_image_csv_errors(tmp_path):
    root = helpers.write_image_csv(tmp_path / "ds", n=20, size=8)
    base = ["data.name=image_csv", f"data.csv={root / 'labels.csv'}", f"data.images={root / 'images'}"]
    with pytest.raises(UserError, match="has no column 'Image_idx'.*did you mean 'Image_index'"):
        build_data(data_cfg(tmp_path, *base, "data.image_col=Image_idx"))
    (root / "bad_list.txt").write_text("img_0000.png\nnot_there.png\n")
    with pytest.raises(UserError, match="lists 'not_there.png'"):
        build_data(data_cfg(tmp_path, *base, f"data.split_list={root / 'bad_list.txt'}"))


@pytest.mark.parametrize("split", [True, False])
def test_image_folder_memory_and_dataloader_give_the_same_batches(tmp_path, split):
    root = helpers.write_image_folder(tmp_path / "folder", n=60, size=16, split=split)
    args = ["data.name=image_folder", f"data.images={root}", "data.image_size=16", "data.batch_size=8",
            "data.augment=crop_flip"]
    mem = build_data(data_cfg(tmp_path, *args))
    dl = build_data(data_cfg(tmp_path, *args, "data.loader=dataloader", "data.num_workers=2"))
    assert mem.loader == "memory" and dl.loader == "dataloader" and mem.spec.num_classes == 10
    for loader_a, loader_b in ((mem.train, dl.train), (mem.val, dl.val)):
        resumed = ((1, 2),) if loader_a is mem.train else ()     # training resumed mid-epoch at batch 2
        for epoch, start in ((0, 0), (1, 0), *resumed):
            loader_a.set_epoch(epoch, start)
            loader_b.set_epoch(epoch, start)
            a, b = list(loader_a), list(loader_b)
            assert len(a) == len(b) == len(loader_a) - start >= 1
            for (xa, ya), (xb, yb) in zip(a, b):
                assert torch.equal(ya, yb) and torch.allclose(xa, xb, atol=1e-6)
    assert sum(len(y) for _, y in mem.val) == len(mem.spec.val)   # evaluation: every sample once


@pytest.mark.parametrize("workers", [0, 2])
def test_file_loader_resumes_mid_epoch_with_the_same_batches(tmp_path, workers):
    """The file (DataLoader) path, resumed at batch k of an epoch, yields exactly batches k.. of the
    unbroken epoch: the same samples, the same augmentation draws, with and without workers."""
    root = helpers.write_image_folder(tmp_path / "folder", n=72, size=16, split=False)
    data = build_data(data_cfg(tmp_path, "data.name=image_folder", f"data.images={root}", "data.image_size=16",
                               "data.batch_size=8", "data.augment=crop_flip", "data.loader=dataloader",
                               f"data.num_workers={workers}"))
    loader = data.train
    loader.set_epoch(3)
    full = [(x.clone(), y.clone()) for x, y in loader]
    assert len(full) == len(loader) >= 6
    for start in (1, 4):
        loader.set_epoch(3, start_batch=start)
        rest = list(loader)
        assert len(rest) == len(full) - start
        for (xa, ya), (xb, yb) in zip(full[start:], rest):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
    loader.set_epoch(3)                                        # the next plain epoch starts at batch 0 again
    assert len(list(loader)) == len(full)


def test_bad_image_is_named_or_skipped(tmp_path):
    root = helpers.write_image_folder(tmp_path / "folder", n=40, size=16, split=False)
    victim = sorted((root / "class_3").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:40])               # truncated PNG
    args = ["data.name=image_folder", f"data.images={root}", "data.image_size=16", "data.cache=false"]
    for loader in ("memory", "dataloader"):
        with pytest.raises(UserError, match=f"could not read image .*{victim.name}"):
            data = build_data(data_cfg(tmp_path, *args, f"data.loader={loader}"))
            for _ in data.train:
                pass
            for _ in data.val:
                pass
    data = build_data(data_cfg(tmp_path, *args, "data.on_bad_sample=skip"))
    assert data.spec.skipped == 1 and len(data.spec.train) + len(data.spec.val) == 39


def test_synthetic_and_sine(tmp_path):
    syn = build_data(data_cfg(tmp_path, "data.name=synthetic", "data.image_size=12", "data.num_samples=100",
                              "data.channels=3"))
    _check_batches(syn, 3, 12, 10)
    sine = build_data(data_cfg(tmp_path, "data.name=sine", "data.num_samples=64", "data.seq_len=10"))
    x, y = next(iter(sine.train))
    assert sine.spec.task == "regression" and x.shape[1:] == (10, 1) and y.shape[1:] == (1,)


def test_every_dataset_is_covered():
    tested = {"digits", "fashion_mnist", "mnist", "cifar10", "csv", "image_csv", "image_folder", "synthetic", "sine"}
    assert set(DATASETS) == tested


def test_missing_dataset_offline_says_where_to_put_files(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path}.*put the four IDX files there"):
        build_data(data_cfg(tmp_path, "data.name=fashion_mnist", "data.download=false"))
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        build_data(data_cfg(tmp_path, "data.name=cifar10", "data.download=false"))


def test_truncated_idx_file(tmp_path):
    helpers.write_mnist_like(tmp_path, "MNIST", n_train=50, n_val=20, gz=True)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(UserError, match="truncated or corrupt"):
        build_data(data_cfg(tmp_path, "data.name=mnist", "data.download=false"))


def test_class_subset_relabels(tmp_path):
    data = build_data(data_cfg(tmp_path, "data.classes=[5, 6, 7, 8, 9]"))
    assert data.spec.num_classes == 5 and data.spec.classes == ["5", "6", "7", "8", "9"]
    assert set(data.spec.train.y.tolist()) == {0, 1, 2, 3, 4}
    full = build_data(data_cfg(tmp_path))
    assert len(data.spec.train) == int((full.spec.train.y >= 5).sum())
    keep = full.spec.train.y >= 5                                    # 5 -> 0, ..., 9 -> 4, order kept
    assert torch.equal(data.spec.train.y, full.spec.train.y[keep] - 5)
    assert torch.equal(data.spec.train.x, full.spec.train.x[keep])
    swapped = build_data(data_cfg(tmp_path, "data.classes=[9, 3]"))   # relabelled in the order given
    assert swapped.spec.classes == ["9", "3"]
    y = full.spec.train.y
    assert torch.equal(swapped.spec.train.y, (y[(y == 9) | (y == 3)] == 3).long())


def test_decode_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    from lib.data import sources
    decodes, read = [], sources.read_pixel_csv
    monkeypatch.setattr(sources, "read_pixel_csv", lambda p: decodes.append(p) or read(p))   # counts decodes
    path = helpers.write_pixel_csv(tmp_path / "train.csv", n=100)
    args = ["data.name=csv", f"data.csv={path}"]
    first = build_data(data_cfg(tmp_path, *args))
    cached = list((tmp_path / ".cache").glob("csv-*.pt"))
    assert len(decodes) == 1 and len(cached) == 1
    again = build_data(data_cfg(tmp_path, *args))               # reused: no decode, the same tensors
    assert len(decodes) == 1
    for a, b in ((first.spec.train, again.spec.train), (first.spec.val, again.spec.val)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:51]) + "\n")              # the source changes: decoded again, once
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert len(build_data(data_cfg(tmp_path, *args)).spec.train) == 40
    assert len(decodes) == 2
    assert len(list((tmp_path / ".cache").glob("csv-*.pt"))) == 1 and not cached[0].exists()


def test_train_and_val_csvs_keep_their_own_caches(tmp_path, monkeypatch):
    train = helpers.write_pixel_csv(tmp_path / "train.csv", n=60)
    val = helpers.write_pixel_csv(tmp_path / "val.csv", n=30, seed=4)
    args = ["data.name=csv", f"data.csv={train}", f"data.val_csv={val}"]
    first = build_data(data_cfg(tmp_path, *args))
    assert sorted(p.name.split("-")[1] for p in (tmp_path / ".cache").glob("csv-*.pt")) == ["train", "val"]
    from lib.data import sources
    calls = []
    monkeypatch.setattr(sources, "read_pixel_csv", lambda p: calls.append(p))   # a decode would fail now
    again = build_data(data_cfg(tmp_path, *args))
    assert calls == [] and torch.equal(again.spec.val.x, first.spec.val.x) and len(again.spec.train) == 60


def test_loader_auto_chooses_by_size(tmp_path):
    assert build_data(data_cfg(tmp_path)).loader == "memory"                       # 1,797 digits: tiny
    assert build_data(data_cfg(tmp_path, "data.memory_limit_gb=0.0001")).loader == "dataloader"
    folder = helpers.write_image_folder(tmp_path / "imgs", n=20, size=8, split=False)
    args = ["data.name=image_folder", f"data.images={folder}", "data.image_size=8"]
    assert build_data(data_cfg(tmp_path, *args)).loader == "memory"
    assert build_data(data_cfg(tmp_path, *args, "data.memory_limit_gb=1.0e-7")).loader == "dataloader"


# ---------------------------------------------------------------------------------------------
# Sharding: exact, reproducible, resumable
# ---------------------------------------------------------------------------------------------

def test_training_shards_are_disjoint_and_cover_the_epoch():
    n, world = 103, 4
    shards = [shard_indices(n, epoch=3, seed=7, shuffle=True, train=True, rank=r, world=world) for r in range(world)]
    assert all(len(s) == n // world for s in shards)
    union = torch.cat(shards)
    assert len(set(union.tolist())) == len(union) == 100
    again = shard_indices(n, epoch=3, seed=7, shuffle=True, train=True, rank=0, world=world)
    other = shard_indices(n, epoch=4, seed=7, shuffle=True, train=True, rank=0, world=world)
    assert torch.equal(shards[0], again) and not torch.equal(shards[0], other)   # f(seed, epoch)


def test_evaluation_shards_count_every_sample_once():
    n = 101
    for world in (1, 2, 3, 8):
        shards = [shard_indices(n, epoch=0, seed=1, shuffle=True, train=False, rank=r, world=world)
                  for r in range(world)]
        assert sorted(torch.cat(shards).tolist()) == list(range(n))


def test_memory_loader_keeps_one_copy_of_the_data():
    """Issue #15 item 7: the memory loader moves the split's own tensors to the device (meta here, a
    GPU in use) instead of keeping the host copy beside a device copy."""
    from lib.data.loaders import MemoryLoader
    from lib.data.spec import Split
    split = Split(torch.zeros(10, dtype=torch.long), torch.zeros(10, 1, 4, 4, dtype=torch.uint8))
    loader = MemoryLoader(split, batch_size=4, transform=None, device=torch.device("meta"), rank=0, world=1,
                          seed=0, shuffle=False, train=False)
    assert split.x.device.type == split.y.device.type == "meta"
    assert loader.x is split.x and loader.y is split.y


def _augmented_by_sample(loader, epoch):
    """{sample index: its augmented training image} over one epoch of a loader."""
    loader.set_epoch(epoch)
    ids = loader.indices().tolist()
    out = {}
    for b, (x, _) in enumerate(loader):
        for j, img in enumerate(x):
            out[ids[b * loader.batch_size + j]] = img
    return out


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
def test_augmentation_is_a_function_of_the_sample_not_of_its_batch_rank_or_world(tmp_path, loader):
    """Issue #16 items 3 and 5: each sample's crop and flip depend on (seed, epoch, sample index) only,
    so 1 process with batch 16 and each rank of 2 processes with batch 8 (or 2 workers) augment every
    sample identically, and a resumed or re-sharded run draws what the unbroken one drew."""
    from types import SimpleNamespace
    root = helpers.write_image_folder(tmp_path / "folder", n=80, size=16, split=False)
    args = ["data.name=image_folder", f"data.images={root}", "data.image_size=16", "data.augment=crop_flip",
            f"data.loader={loader}", f"data.num_workers={2 if loader == 'dataloader' else 0}"]
    one = _augmented_by_sample(build_data(data_cfg(tmp_path, *args, "data.batch_size=16")).train, epoch=1)
    two = {}
    for rank in (0, 1):
        rt = SimpleNamespace(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"),
                             main_process_first=contextlib.nullcontext)
        two.update(_augmented_by_sample(build_data(data_cfg(tmp_path, *args, "data.batch_size=8"), rt).train, 1))
    assert len(one) == len(two) == 64 and one.keys() == two.keys()   # the 80 images less the val split
    assert all(torch.equal(one[i], two[i]) for i in one)
    plain = build_data(data_cfg(tmp_path, *args, "data.batch_size=16", "data.augment=none")).train
    unaugmented = _augmented_by_sample(plain, epoch=1)
    moved = sum(not torch.equal(one[i], unaugmented[i]) for i in one)
    assert moved > 40                                  # augmentation really happens (a few draw no change)
    other_epoch = _augmented_by_sample(build_data(data_cfg(tmp_path, *args, "data.batch_size=16")).train, epoch=2)
    assert sum(not torch.equal(one[i], other_epoch[i]) for i in one) > 30     # and differs between epochs


def test_loader_resumes_mid_epoch_with_the_same_batches(tmp_path):
    data = build_data(data_cfg(tmp_path, "data.batch_size=64", "data.augment=crop"))
    data.train.set_epoch(2)
    full = [(x.clone(), y.clone()) for x, y in data.train]
    data.train.set_epoch(2, start_batch=5)
    rest = list(data.train)
    assert len(rest) == len(full) - 5
    for (xa, ya), (xb, yb) in zip(full[5:], rest):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_train_runs_on_real_files_end_to_end(tmp_path):
    """A user's run on FashionMNIST-format files (gzip IDX) with the shipped FashionMNIST config:
    nothing downloaded, every file sample trained on and evaluated, and the model learns."""
    import csv
    helpers.write_mnist_like(tmp_path / "data", "FashionMNIST", n_train=512, n_val=128)
    raw = sorted(p.name for p in (tmp_path / "data/FashionMNIST/raw").iterdir())
    out = helpers.ok(helpers.script("train.py", "--config", helpers.REPO / "configs/fashion_cnn.yaml", "train.epochs=2",
                                    "data.download=false", "data.batch_size=64", "log.plots=false", cwd=tmp_path))
    assert "fashion_mnist: 512 train / 128 val" in out
    with open(tmp_path / "runs/fashion_cnn/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [8, 16]                       # 512 / 64 batches per epoch
    assert all(int(r["val/samples"]) == 128 for r in rows)                 # every validation image, once
    losses = [float(r["train/loss"]) for r in rows]
    assert losses[1] < losses[0] and float(rows[1]["val/loss"]) < float(rows[0]["val/loss"])
    final = helpers.final_metrics(out)
    assert final["val/acc"] >= 0.7, out[-1500:]                            # chance is 0.1; 0.78 measured
    ckpt = helpers.state_dict(tmp_path / "runs/fashion_cnn/checkpoints/last.pt")
    assert ckpt["step"] == 16 and ckpt["metrics"]["val/acc"] == pytest.approx(final["val/acc"], abs=1e-4)
    after = sorted(p.name for p in (tmp_path / "data/FashionMNIST/raw").iterdir() if p.name != ".cache")
    assert after == raw                                                  # nothing fetched (beside the decode cache)
