"""Issue 17 items 1-3: the per-image transforms of torchvision's recipes (RandomResizedCrop + flip for
training, Resize + CenterCrop for evaluation, auto-augment policies), random erasing and mixup /
cutmix, on small real JPEG folders (varied sizes and aspect ratios, a grayscale and a CMYK JPEG, a PNG
among them), decoded with TorchCodec and with PIL."""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

import helpers
from lib import config
from lib.data import build_data
from lib.data.augment import ImageTransform, Mix, crop_box, erase_
from lib.data.formats import decode_image
from lib.errors import UserError
from lib.seeding import stable_seed

SIZES = [(500, 375), (375, 500), (320, 240), (256, 300), (410, 410), (640, 360)]


def _photo(w, h, seed):
    """A photo-like RGB array: smooth gradients, a few shapes, noise (JPEG compresses it like a photo)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([(xx * (c + 1) * 255 / w + yy * 128 / h + 60 * c) % 256 for c in range(3)], -1)
    for _ in range(4):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(10, 80)
        a[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    return np.clip(a + rng.normal(0, 6, a.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/train/<class>/ and root/val/<class>/: JPEGs of the SIZES, one grayscale, one CMYK, one PNG."""
    root = tmp_path_factory.mktemp("jpegs")
    n = 0
    for part, count in (("train", 12), ("val", 4)):
        for i in range(count):
            w, h = SIZES[i % len(SIZES)]
            d = root / part / f"c{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(_photo(w, h, n))
            if n == 1:
                im.convert("L").save(d / f"{n}.jpg", quality=90)
            elif n == 2:
                im.convert("CMYK").save(d / f"{n}.jpg", quality=90)
            elif n == 3:
                im.save(d / f"{n}.png")
            else:
                im.save(d / f"{n}.jpeg", quality=90)
            n += 1
    return root


def _cfg(*args):
    return config.load(config.Config, None, ["data.name=image_folder", "data.loader=dataloader", "data.num_workers=0",
                              "data.cache=false", "data.normalize=none", *args])


@pytest.mark.parametrize("decoder", ["pil", "torchcodec"])
def test_the_eval_transform_equals_torchvision_resize_and_center_crop(folder, decoder):
    """Resize(256) + CenterCrop(224) of a 500x375 JPEG, here vs torchvision's transforms on PIL's image:
    within 1/255 (the antialiased tensor resize against PIL's), through the decoder named."""
    from torchvision import transforms
    path = folder / "train/c0/0.jpeg"
    with Image.open(path) as im:
        assert im.size == (500, 375)
        ref = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])(
            im.convert("RGB"))
    d = _cfg("data.train_crop=224").data
    ours = ImageTransform(d, train=False)(decode_image(path, None, 3, decoder))
    assert ours.shape == ref.shape == (3, 224, 224) and ours.dtype == torch.uint8
    assert (ours.int() - ref.int()).abs().max() <= 1


def test_torchcodec_decodes_every_jpeg_as_pil_does(folder):
    """TorchCodec's RGB output equals PIL's convert("RGB") for the colour, grayscale and CMYK JPEGs;
    the PNG goes to PIL."""
    for path in sorted(folder.rglob("*.*")):
        with Image.open(path) as im:
            ref = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(decode_image(path, None, 3, "torchcodec"), ref), path


def test_training_crops_have_the_requested_scale_and_ratio():
    """crop_box draws areas within crop_scale and aspect ratios within crop_ratio (up to the rounding to
    whole pixels); both ends of each range are reached."""
    scale, ratio = (0.25, 0.8), (0.5, 2.0)
    areas, ratios = [], []
    for s in range(2000):
        top, left, h, w = crop_box(random.Random(s), 375, 500, scale, ratio)
        assert 0 <= top <= 375 - h and 0 <= left <= 500 - w
        areas.append(h * w / (375 * 500))
        ratios.append(w / h)
    assert scale[0] - 0.01 <= min(areas) < scale[0] + 0.05 and scale[1] - 0.05 < max(areas) <= scale[1] + 0.01
    assert ratio[0] * 0.97 <= min(ratios) < ratio[0] * 1.1 and ratio[1] * 0.9 < max(ratios) <= ratio[1] * 1.03
    square = [crop_box(random.Random(s), 400, 400, scale, ratio) for s in range(2000)]
    assert abs(np.mean([math.log(w / h) for _, _, h, w in square])) < 0.05   # log-uniform: symmetric around 1


def test_per_image_augmentation_is_a_function_of_seed_epoch_and_sample(folder):
    """The same (key, index) gives the same crop, flip and policy draw, wherever and whenever it runs;
    another sample index or epoch key gives another; the global torch stream is untouched by batch()."""
    d = _cfg("data.train_crop=64", "data.auto_augment=trivialaugment").data
    tf = ImageTransform(d, train=True)
    img = decode_image(folder / "train/c0/0.jpeg", None, 3)
    key = stable_seed("augment", 0, 1)
    a, b = tf(img, key, 7), tf(img, key, 7)
    assert a.shape == (3, 64, 64) and torch.equal(a, b)
    assert not torch.equal(a, tf(img, key, 8)) and not torch.equal(a, tf(img, key + 1, 7))
    batch = torch.stack([img[:, :300, :300]] * 3)
    state = torch.get_rng_state()
    out = tf.batch(batch, key, torch.tensor([7, 8, 7]))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(out[0], out[2]) and torch.equal(out[0], tf(img[:, :300, :300], key, 7))


def test_every_image_of_a_jpeg_folder_trains_through_the_workers(folder):
    """data.train_crop on files of varied sizes: the workers decode (TorchCodec), crop and flip each
    image; training batches are train_crop, evaluation batches eval_crop; the loader=memory choice is
    refused with the way out; the log line says what happens."""
    cfg = _cfg(f"data.images={folder}", "data.train_crop=96", "data.eval_resize=128", "data.eval_crop=112",
               "data.batch_size=4", "data.num_workers=2", "data.auto_augment=autoaugment", "data.random_erasing=0.5",
               "data.decoder=torchcodec")
    data = build_data(cfg)
    assert "3xHxW (as stored) -> 3x96x96 (RandomResizedCrop; eval resize 128, crop 112)" in data.describe()
    data.train.set_epoch(1)
    shapes = {tuple(x.shape[1:]) for x, _ in data.train}
    assert shapes == {(3, 96, 96)}
    assert {tuple(x.shape[1:]) for x, _ in data.val} == {(3, 112, 112)}
    with pytest.raises(UserError, match="data.loader=memory cannot hold image files of different sizes"):
        build_data(_cfg(f"data.images={folder}", "data.train_crop=96", "data.loader=memory"))


def test_decoding_on_the_device_gives_the_workers_batches(folder, tmp_path):
    """data.decode_on=device (what CUDA runs batched through nvJPEG; here the same code on the CPU):
    the workers send the JPEGs' bytes, the loader decodes them together and crops / augments each
    with the workers' draws. Training and evaluation batches equal the workers' bit for bit, the PNG
    (decoded in a worker) and a truncated JPEG (skipped) included; the run's log line says where."""
    import shutil
    root = tmp_path / "imgs"
    shutil.copytree(folder, root)
    good = next((root / "train" / "c0").glob("*.jpeg")).read_bytes()
    (root / "train" / "c1" / "broken.jpg").write_bytes(good[: len(good) // 3])  # readable file, bad JPEG
    (root / "train" / "c1" / "empty.jpg").write_bytes(b"")
    common = [f"data.images={root}", "data.train_crop=64", "data.eval_resize=80", "data.eval_crop=72",
              "data.batch_size=5", "data.num_workers=2", "data.auto_augment=trivialaugment", "data.random_erasing=0.5",
              "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "data.on_bad_sample=skip", "data.normalize=imagenet"]
    runs = {}
    for where in ("workers", "device"):
        data = build_data(_cfg(*common, f"data.decode_on={where}"))
        assert data.train.dataloader.dataset.encoded == (where == "device")
        assert ("JPEGs decoded on cpu" in data.describe()) == (where == "device")
        batches = []
        for epoch in (1, 2):
            data.train.set_epoch(epoch)
            batches += [(x, y) for x, y in data.train]
        batches += [(x, y) for x, y in data.val]
        runs[where] = (batches, data.train.skipped)
    (workers, skipped_w), (device, skipped_d) = runs["workers"], runs["device"]
    assert skipped_w == skipped_d == 4                         # 2 unreadable files x 2 epochs
    assert len(workers) == len(device) and len(workers) > 6
    for (xw, yw), (xd, yd) in zip(workers, device):
        assert torch.equal(xw, xd) and torch.equal(yw, yd)
    with pytest.raises(UserError, match="data.decode_on .*is device, which needs data.train_crop"):
        build_data(_cfg(f"data.images={folder}", "data.decode_on=device"))


def test_decoding_on_a_device_torchcodec_cannot_use_falls_back_or_is_refused(folder, capsys):
    """Where TorchCodec cannot decode on the device (a CPU-only build on a GPU machine; here: CUDA
    without a GPU, and the meta device), auto decodes in the workers with a note; an explicit
    data.decode_on=device is refused with the way out, not run one image at a time."""
    from lib.data.build import _decode_on_device
    d = _cfg(f"data.images={folder}", "data.train_crop=64").data
    spec = type("Spec", (), {"channels": 3})()
    assert _decode_on_device(d, spec, "torchcodec", torch.device("cpu")) is False          # auto on a CPU
    assert _decode_on_device(d, spec, "torchcodec", torch.device("cuda")) is False
    assert "cannot decode JPEGs on cuda" in capsys.readouterr().out
    d.decode_on = "device"
    assert _decode_on_device(d, spec, "torchcodec", torch.device("cpu")) is True
    with pytest.raises(UserError, match="data.decode_on=device but TorchCodec cannot decode a JPEG on meta"):
        _decode_on_device(d, spec, "torchcodec", torch.device("meta"))


EXIT_WITH_A_LIVE_LOADER = """
import sys
from lib import config
from lib.data import build_data
cfg = config.load(config.Config, None, ["data.name=image_folder", "data.images=" + sys.argv[1], "data.cache=false",
                  "data.loader=dataloader", "data.num_workers=2", "data.train_crop=32", "data.batch_size=2"])
data = build_data(cfg)
data.train.set_epoch(1)
batches = iter(data.train)
next(batches)
raise SystemExit(3)       # the loader and its two workers are still referenced
"""


def test_python_exits_while_a_file_loader_with_workers_is_alive(folder):
    """The workers ignore SIGTERM (a SLURM signal to the process group must not kill them), which is
    also how multiprocessing ends daemonic children at exit before joining them: a loader still
    referenced at exit (a global, a failed test's traceback) hung Python forever. It exits at once."""
    import subprocess
    import time
    t = time.perf_counter()
    try:
        r = subprocess.run([helpers.PY, "-c", EXIT_WITH_A_LIVE_LOADER, str(folder)], cwd=helpers.REPO,
                           capture_output=True, text=True, timeout=60, env=helpers.env())
    except subprocess.TimeoutExpired:
        pytest.fail("Python did not exit within 60 s with a FileLoader's workers alive")
    assert r.returncode == 3, r.stderr[-2000:]
    assert time.perf_counter() - t < 45


def test_mixup_and_cutmix_targets_are_weights_summing_to_one():
    """Each row of the soft targets sums to 1; mixup mixes the images with the same weight as the
    targets; cutmix's weight is the share of pixels kept (the pasted box's complement)."""
    d = _cfg("data.mixup_alpha=0.4", "data.cutmix_alpha=1.0").data
    mix = Mix(d, num_classes=5)
    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 1, 16, 16).contiguous()
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    kinds = set()
    for first in range(40):
        xm, ym = mix(x, y, key=3, first_index=first)
        assert torch.allclose(ym.sum(1), torch.ones(8))
        lam = float(ym[0, 0])                              # sample 0 (class 0) mixed with sample 7 (class 2)
        kept = float((xm[0] == 0).float().mean())
        distinct = xm[0].unique().numel()
        if distinct == 1 and 0 < lam < 1:                 # mixup: every pixel 0 * lam + 7 * (1 - lam)
            kinds.add("mixup")
            assert torch.allclose(xm[0], torch.full_like(xm[0], 7 * (1 - lam)))
        else:                                              # cutmix: pixels are 0 or 7
            kinds.add("cutmix")
            assert math.isclose(kept, lam, abs_tol=1e-6)
    assert kinds == {"mixup", "cutmix"}
    a, b = mix(x, y, key=3, first_index=5), mix(x, y, key=3, first_index=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_random_erasing_zeroes_one_box_per_chosen_sample():
    """p=1 erases a box of 2-33% of the image in every sample (value 0, per sample), p=0 nothing."""
    x = torch.ones(16, 3, 32, 32)
    erase_(x, key=5, ids=torch.arange(16), p=1.0)
    for img in x:
        zero = (img == 0).all(0)
        rows, cols = zero.any(1).nonzero(), zero.any(0).nonzero()
        area = zero.float().mean()
        assert 0.02 - 0.01 <= area <= 0.34
        assert zero.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)   # one box
    y = torch.ones(4, 3, 8, 8)
    assert torch.equal(erase_(y, key=5, ids=torch.arange(4), p=0.0), torch.ones(4, 3, 8, 8))


def test_mixing_refuses_a_loss_that_needs_class_indices(tmp_path):
    """nll cannot take soft targets: refused before anything runs, cross_entropy named."""
    code, out, err = helpers.in_process("train.py", ["data.mixup_alpha=0.2", "loss.name=nll"], tmp_path)
    assert code == 2 and "loss.name=nll needs class indices" in err + out and "cross_entropy" in err + out
    assert not (tmp_path / "runs").exists()
