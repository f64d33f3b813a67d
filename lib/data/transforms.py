"""The device-side batch transform and the normalisation statistics.

BatchTransform turns a uint8 batch (B, C, H, W) on the training device into the model's float input:
channel conversion, resize, seeded augmentation (random crop + flip) and normalisation, then
RandomErasing. With data.train_crop the images arrive cropped by the per-image ImageTransform
(lib/data/augment.py) and are not resized here (evaluation crops may differ from training crops). norm_stats
gives the fixed statistics of data.normalize (none, symmetric, imagenet); channel_stats measures the
`dataset` statistics on a sample of the training images.
"""
import numpy as np
import torch
import torch.nn.functional as F

from lib.data.augment import ImageTransform, erase_
from lib.data.formats import decode_image
from lib.errors import UserError
from lib.seeding import sample_bits

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class BatchTransform:
    """uint8 (B, C, H, W) on the device -> float (B, C', S, S): convert, resize, augment, normalize.

    When no resize or channel change is needed, augmentation runs on the uint8 bytes and conversion
    plus normalization is one fused pass (x * 1/(255 std) - mean/std); otherwise the float image is
    converted, resized and augmented first. Augmentation is random per sample, each draw a function
    of (seed, epoch, sample index) (lib/seeding.py's sample_bits): the same for a sample whatever
    its batch, rank, worker count or world size, so a resumed run draws what the first one drew.
    """

    def __init__(self, spec, d, device, channels_last=False, channels=None):
        self.src_channels = spec.channels if spec.kind == "image" else None
        self.dst_channels = channels or spec.channels
        if d.train_crop:
            self.size = (d.train_crop, d.train_crop)                 # what training batches arrive as
        else:
            self.size = (d.image_size, d.image_size) if d.image_size else tuple(spec.size)
        self.resize = not d.train_crop                             # else the ImageTransform sized them
        self.augment = d.augment
        self.erasing = d.random_erasing
        self.eval_image_tf = ImageTransform(d, train=False)         # for the `dataset` statistics
        self.channels_last = channels_last
        self.device = device
        self.sequence = spec.kind == "sequence"
        if not self.sequence:
            if d.normalize == "dataset":
                if spec.mean is None:                              # measured once per DataSpec
                    spec.mean, spec.std = channel_stats(spec, self)
                mean, std = spec.mean, spec.std
            else:
                mean, std = norm_stats(d.normalize, self.dst_channels)
            self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self.scale = 1.0 / (255.0 * self.std)                  # bytes -> normalized, in one pass
            self.shift = -self.mean / self.std

    def __call__(self, x, draw=None):
        """draw: (key, sample indices of the batch) for a training batch, None for evaluation."""
        if self.sequence:
            return x.float()
        augment = draw is not None and self.augment != "none"
        if x.shape[1] == self.dst_channels and (not self.resize or tuple(x.shape[2:]) == self.size):
            if augment:
                x = self.random_augment(x, *draw)                  # on the uint8 bytes
            x = x.float().mul_(self.scale).add_(self.shift)      # (x / 255 - mean) / std
        else:
            x = self.to_unit(x, scale=255.0)                       # float in 0..255, right size
            if augment:
                x = self.random_augment(x, *draw)
            x = x.mul_(self.scale).add_(self.shift)
        if draw is not None and self.erasing > 0:
            x = erase_(x, draw[0], draw[1], self.erasing)
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
        if self.resize and tuple(x.shape[2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False,
                              antialias=x.shape[2] > self.size[0])
        return x

    def random_augment(self, x, key, ids):
        """Random crop with zero padding of size/8 (the CIFAR recipe), plus a horizontal flip; sample
        i's offsets and flip come from sample_bits(key, ids[i], stream)."""
        b, c, h, w = x.shape
        pad = max(1, h // 8)
        ids = ids.to(x.device)
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = sample_bits(key, ids, 0) % (2 * pad + 1)
        dx = sample_bits(key, ids, 1) % (2 * pad + 1)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]      # (B, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]      # (B, 1, 1, W)
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[bi, ci, rows, cols]
        if self.augment == "crop_flip":
            flip = (sample_bits(key, ids, 2) >> 16) & 1 == 1
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x


def norm_stats(normalize: str, channels: int) -> tuple[tuple, tuple]:
    """Per-channel (mean, std) in [0, 1] units for data.normalize = none, symmetric ([0, 1] -> [-1, 1])
    or imagenet (averaged to one channel for grayscale); `dataset` statistics are measured by
    channel_stats instead."""
    if normalize == "none":
        return (0.0,) * channels, (1.0,) * channels
    if normalize == "symmetric":
        return (0.5,) * channels, (0.5,) * channels
    if normalize == "imagenet":
        if channels == 3:
            return IMAGENET_MEAN, IMAGENET_STD
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    raise ValueError(f"data.normalize={normalize} has no fixed statistics")


def channel_stats(spec, transform):
    """Per-channel mean/std of (up to 10,000) training images after channel conversion, in float64."""
    if spec.train.x is not None:
        n = len(spec.train)
        idx = torch.linspace(0, n - 1, min(n, 10000)).long()
        sample = spec.train.x[idx]
    else:
        files = spec.train.files
        idx = np.linspace(0, len(files) - 1, min(len(files), 256)).astype(int)
        tf = transform.eval_image_tf              # train_crop: the evaluation crop of each image
        sample = torch.stack([tf(_decode_or_fail(files[i], spec)) for i in idx])
    x = transform.to_unit(sample.to("cpu")).double()
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def _decode_or_fail(path, spec):
    try:
        return decode_image(path, None if spec.size is None else spec.size[0], spec.channels)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read image {path} ({e}); fix or remove the file, or set "
                        f"data.on_bad_sample=skip.") from None
