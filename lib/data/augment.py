"""Per-image and per-batch augmentation with torchvision's and timm's names, every draw a function of
(seed, epoch, sample index), so a sample is augmented the same way whatever its batch, rank, worker
or world size, and a resumed run draws exactly what the unbroken one drew.

    ImageTransform(d, train)   # per image, uint8 (C, H, W) of any size -> uint8 (C, S, S):
                               #   train: RandomResizedCrop(train_crop, crop_scale, crop_ratio) + flip
                               #          + TrivialAugmentWide / RandAugment / AutoAugment (ImageNet)
                               #   eval:  Resize(eval_resize, shorter side) + CenterCrop(eval_crop)
    erase_(x, key, ids, p)     # RandomErasing on a normalized float batch (per sample, value 0)
    Mix(d, num_classes)        # mixup / cutmix on a batch: (x, y) -> (x, soft y), pairs = roll by 1

ImageTransform runs in the DataLoader workers on decoded files, or on the device for in-memory
batches (one image at a time: each has its own crop box). Its draws come from a generator seeded by
stable_seed("sample", key, index); the auto-augment policies draw from torch's global generator, so
that one is seeded per image too (in a worker, or inside fork_rng in the main process, whose own
stream stays untouched).
"""
import math
import random

import torch

from lib.seeding import stable_seed

_POLICIES = ("trivialaugment", "randaugment", "autoaugment")


def _interp(name):
    from torchvision.transforms import InterpolationMode
    return {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
            "nearest": InterpolationMode.NEAREST}[name]


def crop_box(rng, height, width, scale, ratio):
    """RandomResizedCrop's box (top, left, h, w): area a uniform fraction `scale` of the image, aspect
    ratio log-uniform in `ratio`, ten tries, then the centre crop of the clamped ratio (torchvision's
    algorithm, drawing from `rng`, a random.Random)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageTransform:
    """The per-image part of the pipeline (see the module docstring); `active` is False when there is
    nothing per-image to do (no train_crop and no auto-augment), so the caller can skip it."""

    def __init__(self, d, train: bool):
        self.train = train
        self.crop = d.train_crop
        self.scale, self.ratio, self.hflip = tuple(d.crop_scale), tuple(d.crop_ratio), d.hflip
        self.eval_resize, self.eval_crop = d.eval_resize, d.eval_crop or d.train_crop
        self.interpolation = d.interpolation
        self.policy_name = d.auto_augment if train else "none"
        self.ra = (d.ra_num_ops, d.ra_magnitude)
        self.active = self.crop is not None or self.policy_name != "none"
        self._policy = None

    def policy(self):
        """The torchvision v2 auto-augment transform (built once per process, lazily: workers too)."""
        if self._policy is None and self.policy_name != "none":
            from torchvision.transforms import v2
            interp = _interp(self.interpolation)
            self._policy = {
                "trivialaugment": lambda: v2.TrivialAugmentWide(interpolation=interp),
                "randaugment": lambda: v2.RandAugment(num_ops=self.ra[0], magnitude=self.ra[1], interpolation=interp),
                "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=interp),
            }[self.policy_name]()
        return self._policy

    def __call__(self, img, key=None, index=None):
        """uint8 (C, H, W) -> uint8 (C, S, S). Training images need (key, index): the epoch's
        augmentation key and the sample's index in the dataset."""
        from torchvision.transforms.v2 import functional as TF
        if not self.train:
            if self.crop is None:
                return img
            img = TF.resize(img, self.eval_resize, interpolation=_interp(self.interpolation), antialias=True)
            return TF.center_crop(img, [self.eval_crop, self.eval_crop])
        seed = stable_seed("sample", key, int(index))
        if self.crop is not None:
            rng = random.Random(seed)
            top, left, h, w = crop_box(rng, img.shape[-2], img.shape[-1], self.scale, self.ratio)
            img = TF.resized_crop(img, top, left, h, w, [self.crop, self.crop],
                                  interpolation=_interp(self.interpolation), antialias=True)
            if rng.random() < self.hflip:
                img = img.flip(-1)
        if self.policy_name != "none":
            torch.default_generator.manual_seed(seed)   # the policy draws from the global CPU generator
            img = self.policy()(img)
        return img

    def each(self, images, key, ids):
        """The transform of each of `images` (any sizes; sample indices `ids`), as a list, leaving torch's
        global generator as it was (the auto-augment policies reseed it)."""
        with torch.random.fork_rng(devices=[]):
            return [self(img, key, i) for img, i in zip(images, ids.tolist())]

    def batch(self, x, key, ids):
        """The transform of each image of a same-size uint8 batch (the memory loader), stacked."""
        if not self.train:
            return self(x)                          # resize + centre crop are the same for every image
        return torch.stack(self.each(x, key, ids))


def erase_(x, key, ids, p, scale=(0.02, 0.33), ratio=(0.3, 3.3)):
    """RandomErasing (torchvision's defaults: value 0 on the normalized image) of each sample with
    probability p, in place on the float batch x (B, C, H, W); sample i's box from its own seed."""
    b, _, height, width = x.shape
    boxes = torch.zeros(b, 4, dtype=torch.int64)      # top, left, bottom, right (empty: 0, 0, 0, 0)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for i, index in enumerate(ids.tolist()):
        rng = random.Random(stable_seed("erase", key, index))
        if rng.random() >= p:
            continue
        for _ in range(10):
            target = height * width * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if h < height and w < width:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                boxes[i] = torch.tensor([top, left, top + h, left + w])
                break
    if not boxes.any():
        return x
    boxes = boxes.to(x.device)
    rows = torch.arange(height, device=x.device)[None, :, None]
    cols = torch.arange(width, device=x.device)[None, None, :]
    inside = ((rows >= boxes[:, 0, None, None]) & (rows < boxes[:, 2, None, None])
              & (cols >= boxes[:, 1, None, None]) & (cols < boxes[:, 3, None, None]))     # (B, H, W)
    return x.masked_fill_(inside[:, None], 0.0)


class Mix:
    """mixup (Zhang et al. 2017) and cutmix (Yun et al. 2019) on a training batch, as torchvision's
    v2.MixUp / v2.CutMix: each sample is mixed with its neighbour in the batch (roll by 1), the
    weight lam ~ Beta(alpha, alpha), the targets become lam * onehot(y) + (1 - lam) * onehot(y
    rolled); cutmix pastes a box of area (1 - lam) and sets lam to the pasted area's complement.
    With both on, a batch uses cutmix with probability mix_switch_prob. The batch's draws come from
    stable_seed("mix", key, its first sample index): the same batch is mixed the same way on resume."""

    def __init__(self, d, num_classes):
        self.mixup, self.cutmix, self.switch = d.mixup_alpha, d.cutmix_alpha, d.mix_switch_prob
        self.num_classes = num_classes
        self.active = self.mixup > 0 or self.cutmix > 0

    def __call__(self, x, y, key, first_index):
        rng = random.Random(stable_seed("mix", key, int(first_index)))
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or rng.random() < self.switch)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = rng.betavariate(alpha, alpha)
        onehot = torch.nn.functional.one_hot(y, self.num_classes).to(x.dtype)
        if use_cutmix:
            height, width = x.shape[-2:]
            cy, cx = rng.randint(0, height - 1), rng.randint(0, width - 1)
            r = 0.5 * math.sqrt(1.0 - lam)
            half_h, half_w = int(r * height), int(r * width)
            top, bottom = max(cy - half_h, 0), min(cy + half_h, height)
            left, right = max(cx - half_w, 0), min(cx + half_w, width)
            x = x.clone()
            x[..., top:bottom, left:right] = x.roll(1, 0)[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        else:
            x = x.mul(lam).add_(x.roll(1, 0), alpha=1.0 - lam)
        return x, onehot.mul(lam).add_(onehot.roll(1, 0), alpha=1.0 - lam)
