"""Readers of the on-disk formats: IDX (MNIST, FashionMNIST), CIFAR-10 python batches (unpickled
with only numpy types allowed), Kaggle pixel CSVs (a bad row is reported by its line number), and
image files (decode, or probe channels and size). Unreadable or malformed files raise UserError
naming the file and the fix; decode_image raises OSError/ValueError for the caller to report.
"""
import gzip
import io
import math
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from lib.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


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


def header_lines(path):
    """1 when the first line of a CSV is a header (it holds a letter), else 0."""
    with open(path) as f:
        return 1 if re.search(r"[A-Za-z]", f.readline()) else 0


def read_pixel_csv(path):
    """A Kaggle pixel CSV (label, pixel1..pixelN) -> (uint8 (N, C, S, S), int64 labels).

    Rows of the wrong length, non-numeric values, pixels outside 0..255 and negative labels are
    reported with their line number before any training starts.
    """
    path = Path(path)
    header = header_lines(path)
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


def decode_image(path, size, channels, decoder="pil"):
    """An image file -> uint8 tensor (C, S, S), or (C, H, W) as stored when size is None; raises
    OSError/ValueError for unreadable files. decoder: "torchcodec" decodes JPEGs with TorchCodec
    (libjpeg-turbo; RGB output equal to PIL's, CMYK and grayscale files included), "pil" everything
    with PIL; other formats, and grayscale output, always take PIL."""
    if decoder == "torchcodec" and channels == 3 and is_jpeg(path):
        t = _torchcodec_jpeg(path)
        if t is not None:
            if size is not None and tuple(t.shape[1:]) != (size, size):
                t = _pil_resize(t, size)
            return t
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        a = np.array(im, dtype=np.uint8)
    t = torch.from_numpy(a)
    if t.ndim == 2:
        return t.unsqueeze(0)
    # (C, H, W) over the (H, W, C) bytes, as TorchCodec returns it: the crop-resize of the per-image
    # transform is faster on that layout (0.41 vs 0.68 ms a 224 crop) and the transpose copy is saved.
    return t.permute(2, 0, 1) if size is None else t.permute(2, 0, 1).contiguous()


def is_jpeg(path) -> bool:
    return str(path).lower().endswith((".jpg", ".jpeg"))


def decode_jpegs(blobs, device):
    """Encoded JPEGs (1-D uint8 CPU tensors of the files' bytes) -> RGB uint8 (3, H, W) tensors on
    `device`, decoded together by TorchCodec (one nvJPEG call on a GPU), with None for a file nothing
    decodes, and how many images needed the fallback: when the batch call fails, each image is decoded
    on its own on the device, and one the device cannot decode (a JPEG variant nvJPEG lacks) on the CPU
    by TorchCodec, then PIL, which is what the workers would have given."""
    from torchcodec.decoders import decode_jpeg
    if not blobs:
        return [], 0
    try:
        return list(decode_jpeg(list(blobs), mode="RGB", device=device)), 0
    except Exception:                           # noqa: BLE001 (any failure: one image at a time)
        pass
    out, fallback = [], 0
    for b in blobs:
        try:
            out.append(decode_jpeg(b, mode="RGB", device=device))
            continue
        except Exception:                       # noqa: BLE001
            fallback += 1
        img = _torchcodec_jpeg(b)
        if img is None:
            img = _pil_bytes(b)
        out.append(None if img is None else img.to(device))
    return out, fallback


def device_decode_problem(device):
    """None when TorchCodec decodes a JPEG on `device` (a tiny one, made here), else why not: a CPU-only
    TorchCodec (PyPI's wheels) cannot decode on CUDA, and decoding every batch's images one at a time
    after failing would be slower than the workers."""
    from PIL import Image
    from torchcodec.decoders import decode_jpeg
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 60)).save(buf, format="JPEG")
    try:
        out = decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], mode="RGB", device=device)
        ok = out[0].shape == (3, 16, 16) and out[0].device.type == torch.device(device).type
        return None if ok else "an unexpected result"
    except Exception as e:                      # noqa: BLE001 (the reason is reported)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def _pil_bytes(blob):
    """PIL's RGB decode of encoded bytes, or None when PIL cannot read them either."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(blob.numpy().tobytes())) as im:
            a = np.array(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError):
        return None
    return torch.from_numpy(a).permute(2, 0, 1)


def _torchcodec_jpeg(source):
    """TorchCodec's RGB decode (on the CPU) of a JPEG file, or of its bytes (a 1-D uint8 tensor), or
    None when TorchCodec cannot (the caller uses PIL)."""
    try:
        from torchcodec.decoders import decode_jpeg
        return decode_jpeg(source if torch.is_tensor(source) else str(source), mode="RGB")
    except Exception:                               # not installed, or a JPEG variant it does not take
        return None


def _pil_resize(t, size):
    """The square resize of the PIL path (bilinear, PIL's antialiasing) applied to a decoded tensor."""
    from PIL import Image
    im = Image.fromarray(t.permute(1, 2, 0).numpy()).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def resolve_decoder(name):
    """data.decoder -> "torchcodec" or "pil": auto takes TorchCodec when it imports (and decodes)."""
    if name == "pil":
        return "pil"
    try:
        from torchcodec.decoders import decode_jpeg  # noqa: F401
        return "torchcodec"
    except Exception:
        if name == "torchcodec":
            raise UserError("data.decoder=torchcodec but torchcodec cannot be imported; pip install torchcodec "
                            "(>= 0.16, matching your torch), or set data.decoder=pil.") from None
        return "pil"


def probe_image(path):
    """(channels, (H, W)) of an image file without decoding it all."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return (1 if im.mode in ("L", "1", "I;16", "I", "F") else 3), (im.size[1], im.size[0])
    except (OSError, ValueError) as e:
        raise UserError(f"could not read image {path} ({e}); fix or remove the file.") from None
