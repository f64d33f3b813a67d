"""The JPEG data path (issue 17, item 3), measured in one run on this machine:

1. the decoders alone: one process, JPEG bytes already in memory -> an RGB uint8 image, milliseconds
   per image for PIL, PIL with draft() (libjpeg's DCT scaling to 1/2 size), TorchCodec
   (torchcodec.decoders.decode_jpeg), simplejpeg and PyTurboJPEG (the libjpeg-turbo bindings; each
   row is skipped, with the reason, when its package or library is missing);
2. the data path alone, images/s: this package's loader (lib.data.build_data, data.train_crop=224,
   data.dataloader, normalised float batches out) with decoder=torchcodec and decoder=pil (with
   --device cuda: decode_on=workers and decode_on=device, the JPEGs batched through nvJPEG), against
   torchvision's reference loader (ImageFolder + PIL + RandomResizedCrop(224) + RandomHorizontalFlip +
   PILToTensor + ConvertImageDtype + Normalize; evaluation Resize(256) + CenterCrop(224)), the same
   worker count and batch size, persistent workers for both, rounds alternating between them;
3. with --step MODEL, the whole training step (torchvision's MODEL) fed by each of those loaders.

The images are real photographs: scikit-learn's two sample photos (china.jpg, flower.jpg, 640x427)
cut into 500x375 windows (a quarter of them portrait), jittered in brightness and saved at JPEG
quality 90 with 4:2:0 chroma, like most of ImageNet's files.

    python bench/jpeg_loader.py                                  # 1,024 images, 2 workers, batch 64
    python bench/jpeg_loader.py --images 2048 --rounds 5 --turbojpeg-lib /path/libturbojpeg.so.0
    python bench/jpeg_loader.py --device cuda --workers 8 --images 4096     # the GPU figure (gpu_check.sh)
    python bench/jpeg_loader.py --step mobilenet_v3_small --skip-decoders   # the whole train step, each loader
"""
import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_photos(root: Path, n: int, classes: int = 10, seed: int = 0):
    """n JPEGs of ~500x375 cut from scikit-learn's sample photos into root/train/<c>/ and hard links of
    the same files into root/val/<c>/ (the two loaders read the same files)."""
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_sample_images
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for k in range(n):
        c = k % classes
        src = photos[k % len(photos)]
        w, h = (375, 500) if k % 4 == 3 else (500, 375)
        if h > src.height:                                            # portrait: from the upscaled photo
            src = src.resize((src.width * 500 // src.height + 1, 500), Image.BICUBIC)
        left, top = int(rng.integers(0, src.width - w + 1)), int(rng.integers(0, src.height - h + 1))
        img = src.crop((left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.7, 1.3)))
        for part in ("train", "val"):
            (root / part / f"c{c}").mkdir(parents=True, exist_ok=True)
        path = root / "train" / f"c{c}" / f"{k:05d}.jpg"
        img.save(path, quality=90, subsampling=2)
        os.link(path, root / "val" / f"c{c}" / f"{k:05d}.jpg")
    return root


# ---------------------------------------------------------------------------------------------
# 1. Decoders alone
# ---------------------------------------------------------------------------------------------

def decoders(turbojpeg_lib):
    """name -> (bytes -> RGB uint8 image) or the reason it cannot run here."""
    from PIL import Image

    def pil(b):
        with Image.open(io.BytesIO(b)) as im:
            return np.asarray(im.convert("RGB"))

    def pil_draft(b):
        with Image.open(io.BytesIO(b)) as im:
            im.draft("RGB", (im.width // 2, im.height // 2))
            return np.asarray(im.convert("RGB"))

    out = {"PIL (Image.open + convert RGB)": pil, "PIL draft 1/2 (DCT-scaled decode)": pil_draft}
    try:
        import torch
        from torchcodec.decoders import decode_jpeg
        out["TorchCodec decode_jpeg"] = lambda b: decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))
    except Exception as e:                                   # noqa: BLE001 (a row says why it is missing)
        out["TorchCodec decode_jpeg"] = f"not importable ({type(e).__name__}: {e})"
    try:
        import simplejpeg
        out["simplejpeg decode_jpeg"] = lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB")
    except Exception as e:                                   # noqa: BLE001
        out["simplejpeg decode_jpeg"] = f"not importable ({type(e).__name__})"
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG
        tj = TurboJPEG(turbojpeg_lib)
        out["PyTurboJPEG decode"] = lambda b: tj.decode(b, pixel_format=TJPF_RGB)
    except Exception as e:                                   # noqa: BLE001
        out["PyTurboJPEG decode"] = f"not usable ({type(e).__name__}: {str(e).splitlines()[0]})"
    return out


def time_decoders(files, turbojpeg_lib, rounds):
    blobs = [Path(f).read_bytes() for f in files]
    rows = {}
    for name, fn in decoders(turbojpeg_lib).items():
        if isinstance(fn, str):
            rows[name] = fn
            continue
        fn(blobs[0])
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            for b in blobs:
                fn(b)
            times.append((time.perf_counter() - t) / len(blobs))
        rows[name] = round(1e3 * statistics.median(times), 3)
    return rows


# ---------------------------------------------------------------------------------------------
# 2. The data path alone
# ---------------------------------------------------------------------------------------------

class Reference:
    """torchvision's reference classification loader (references/classification/presets.py, PIL
    backend): ImageFolder + the classic train / eval presets, normalised float batches out."""

    def __init__(self, root, train, batch, workers, device="cpu"):
        import torch
        from torchvision import datasets, transforms as T
        self.device = torch.device(device)
        norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        if train:
            tf = T.Compose([T.RandomResizedCrop(224, antialias=True), T.RandomHorizontalFlip(),
                            T.PILToTensor(), T.ConvertImageDtype(torch.float), norm])
        else:
            tf = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224), T.PILToTensor(),
                            T.ConvertImageDtype(torch.float), norm])
        self.ds = datasets.ImageFolder(str(root / ("train" if train else "val")), tf)
        self.loader = torch.utils.data.DataLoader(self.ds, batch_size=batch, shuffle=train, num_workers=workers,
                                                  persistent_workers=workers > 0, drop_last=train,
                                                  pin_memory=self.device.type == "cuda")

    def epoch(self):
        return drain(self.loader, self.device)


class Ours:
    """This package's loader through its own config and build_data (no runtime: one CPU process)."""

    def __init__(self, root, train, batch, workers, tmp, device="cpu", decoder="torchcodec", decode_on="workers"):
        import torch
        from lib import config
        from lib.data import build_data
        cfg = config.load(config.Config, None, [
            "data.name=image_folder", f"data.images={root}", "data.train_crop=224", "data.eval_resize=256",
            "data.eval_crop=224", "data.normalize=imagenet", "data.loader=dataloader", f"data.num_workers={workers}",
            f"data.batch_size={batch}", f"data.eval_batch_size={batch}", f"data.decoder={decoder}",
            f"data.decode_on={decode_on}", "data.augment=none", "data.cache=false", f"output_dir={tmp}"])
        self.device = torch.device(device)
        data = build_data(cfg, device=self.device)
        self.loader = data.train if train else data.val
        self.train, self.e = train, 0

    def epoch(self):
        self.e += 1
        self.loader.set_epoch(self.e)
        return drain(self.loader, self.device)


def drain(batches, device):
    """One epoch of a loader's (x, y) batches on `device` (through STEP when --step): how many images."""
    import torch
    count = 0
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        if STEP:
            STEP[0](x, y.to(device, non_blocking=True))
        count += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count


STEP = []       # with --step: the training step every loader's batches go through


def make_step(name, device):
    """A plain training step of torchvision's `name` (10 classes, SGD; bf16 autocast + channels_last on
    CUDA), so that the whole step's images/s can be compared with each loader feeding it."""
    import torch
    import torchvision
    cuda = device == "cuda"
    model = torchvision.models.get_model(name, num_classes=10).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x, y):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def loaders_for(root, train, args, tmp):
    """The loaders compared: on the CPU TorchCodec and PIL in the workers; on CUDA TorchCodec in the
    workers and batched on the GPU (nvJPEG); the reference first."""
    out = {REF: Reference(root, train, args.batch, args.workers, args.device)}
    if args.device == "cpu":
        for dec in ("torchcodec", "pil"):
            out[f"ours (decoder={dec})"] = Ours(root, train, args.batch, args.workers, tmp, decoder=dec)
    else:
        for where in ("workers", "device"):
            out[f"ours (decode_on={where})"] = Ours(root, train, args.batch, args.workers, tmp, args.device,
                                                    decode_on=where)
    return out


def gpu_decode_difference(files, device):
    """nvJPEG against TorchCodec's CPU decode of the same files: mean and max |difference| in levels."""
    import torch
    from lib.data.formats import decode_jpegs
    blobs = [torch.frombuffer(bytearray(Path(f).read_bytes()), dtype=torch.uint8) for f in files]
    gpu, fallback = decode_jpegs(blobs, device)
    cpu, _ = decode_jpegs(blobs, "cpu")
    diffs = [(g.cpu().int() - c.int()).abs() for g, c in zip(gpu, cpu)]
    return {"mean_abs": round(statistics.mean(float(d.float().mean()) for d in diffs), 3),
            "max_abs": max(int(d.max()) for d in diffs), "fallback": fallback, "images": len(files)}


REF = "reference (torchvision, PIL)"


def time_paths(root, args, tmp):
    """{path: {loader: images/s (median of rounds)}}, rounds alternating between the loaders."""
    out = {}
    for train in (True,) if STEP else (True, False):
        loaders = loaders_for(root, train, args, tmp)
        for lo in loaders.values():
            lo.epoch()                                        # start the workers, warm the page cache
        rates = {k: [] for k in loaders}
        for _ in range(args.rounds):
            for k, lo in loaders.items():
                t = time.perf_counter()
                n = lo.epoch()
                rates[k].append(n / (time.perf_counter() - t))
        ref = REF
        out["train" if train else "eval"] = {
            k: {"img_s": round(statistics.median(v)), "ratio": round(statistics.median(
                a / b for a, b in zip(v, rates[ref])), 2),
                "round_ratios": [round(a / b, 2) for a, b in zip(v, rates[ref])]} for k, v in rates.items()}
        del loaders
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: batches to the GPU, and ours also with the JPEGs decoded there (nvJPEG)")
    p.add_argument("--turbojpeg-lib", default=None, help="libturbojpeg.so path for PyTurboJPEG (default: its search)")
    p.add_argument("--step", default=None, metavar="MODEL",
                   help="feed a training step of this torchvision model (e.g. resnet50) with every loader's batches "
                        "and time the whole step instead of the loader alone (training path only)")
    p.add_argument("--skip-decoders", action="store_true")
    p.add_argument("--no-huge-pages", action="store_true",
                   help="THP_MEM_ALLOC_ENABLE=0 (train.py sets 1 unless the environment says otherwise)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    # As train.py's runtime does (lib/runtime/launch.py), before torch's first CPU allocation; the
    # reference loader runs in this process too.
    os.environ["THP_MEM_ALLOC_ENABLE"] = "0" if args.no_huge_pages else os.environ.get("THP_MEM_ALLOC_ENABLE", "1")
    import torch
    from lib.runtime.launch import host_huge_pages
    with tempfile.TemporaryDirectory() as tmp:
        root = write_photos(Path(tmp) / "photos", args.images)
        files = sorted(str(f) for f in (root / "train").rglob("*.jpg"))
        result = {"images": args.images, "workers": args.workers, "batch": args.batch, "rounds": args.rounds,
                  "torch": torch.__version__, "cpus": os.cpu_count(), "host_huge_pages": host_huge_pages(torch),
                  "mean_jpeg_kb": round(sum(os.path.getsize(f) for f in files) / len(files) / 1024, 1)}
        if not args.skip_decoders:
            result["decode_ms"] = time_decoders(files[:256], args.turbojpeg_lib, args.rounds)
        if args.step:
            STEP.append(make_step(args.step, args.device))
            result["step"] = args.step
        if args.device == "cuda":
            result["device"] = torch.cuda.get_device_name(0)
            result["gpu_decode_vs_cpu"] = gpu_decode_difference(files[:64], "cuda")
        result["data_path"] = time_paths(root, args, tmp)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.images} JPEGs ~500x375 ({result['mean_jpeg_kb']} KiB), {args.workers} workers, batch {args.batch}, "
          f"{args.rounds} rounds, torch {result['torch']}, {result['cpus']} CPUs, "
          f"huge pages {result['host_huge_pages']}")
    if "gpu_decode_vs_cpu" in result:
        print(f"  {result['device']}: nvJPEG vs TorchCodec on the CPU: {result['gpu_decode_vs_cpu']}")
    for name, ms in result.get("decode_ms", {}).items():
        print(f"  decode  {name:38s} {ms if isinstance(ms, str) else f'{ms:7.3f} ms/image'}")
    for path, rows in result["data_path"].items():
        for name, r in rows.items():
            print(f"  {path:5s}   {name:38s} {r['img_s']:6d} images/s   x{r['ratio']:.2f} of the reference "
                  f"(rounds: {' '.join(f'{q:.2f}' for q in r['round_ratios'])})")


if __name__ == "__main__":
    main()
