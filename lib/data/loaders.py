"""The two loaders of a run and the sharding they share.

    MemoryLoader   batches sliced from uint8 tensors that live on the training device
    FileLoader     a torch DataLoader whose workers decode image files (or serve in-memory items)

Both shard like DistributedSampler (training order = f(seed, epoch), each rank every world-th index,
the tail of fewer than world indices dropped so every rank runs the same number of steps), start
mid-epoch at any batch (exact resume), shard evaluation without padding so every validation sample
counts exactly once (pytorch#25162), and run the per-image ImageTransform (in the workers, or on the
device for in-memory batches), the device-side BatchTransform, then mixup / cutmix on each batch.
A training sample's augmentation is a function of (seed, epoch, sample index) (lib/data/augment.py).
"""
import math
import weakref

import torch

from lib.data.formats import decode_image, decode_jpegs, is_jpeg
from lib.data.workers import ignore_stop_signals, stopped_at_exit
from lib.errors import UserError
from lib.seeding import stable_seed


def shard_indices(n, *, epoch, seed, shuffle, train, rank, world, start=0):
    """This rank's sample indices for one epoch, or for its rest after `start` samples (a CPU int64
    tensor).

    train: the epoch's global order = randperm(n) seeded by (seed, epoch) (or 0..n-1), the same for
    every world size. The samples not yet consumed, order[start:], lose their tail of fewer than
    `world` and are dealt out: rank r takes rest[r::world]. With start = 0 every rank gets n // world
    samples; since step k of a run consumes order[k*G:(k+1)*G] (G = batch x world x grad_accum), a run
    resumed on another world size continues at the exact sample. Evaluation: no shuffle, no drop,
    no padding: rank r takes r, r + world, ... so the ranks together see each sample once.
    """
    if train and shuffle:
        g = torch.Generator().manual_seed(stable_seed("order", seed, epoch))
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    if train:
        rest = order[start:]
        order = rest[: len(rest) - len(rest) % world]
    return order[rank::world]


class _Loader:
    """What both loaders share: epochs, mid-epoch starts (in samples of the epoch's global order),
    sharding and batch counting."""

    def __init__(self, n, *, batch_size, transform, device, rank, world, seed, shuffle, train,
                 image_tf=None, mix=None):
        self.n, self.batch_size, self.transform, self.device = n, batch_size, transform, device
        self.image_tf = image_tf if image_tf is not None and image_tf.active else None
        self.mix = mix if train and mix is not None and mix.active else None
        self.rank, self.world, self.seed, self.shuffle, self.train = rank, world, seed, shuffle, train
        self.epoch, self.start = 0, 0           # start: global samples of this epoch already consumed
        if train and n // world == 0:
            raise UserError(f"the training set has {n} samples, fewer than the {world} processes; "
                            f"use more data or fewer processes.")

    def set_epoch(self, epoch, start_batch=0, *, start_sample=None):
        """Iterate epoch `epoch` from batch `start_batch` on, or from global sample `start_sample` of
        the epoch's order (resume mid-epoch, possibly on another world size or batch size)."""
        self.epoch = epoch
        self.start = start_sample if start_sample is not None else start_batch * self.batch_size * self.world

    def indices(self):
        """This rank's sample indices from the current start on."""
        return shard_indices(self.n, epoch=self.epoch, seed=self.seed, shuffle=self.shuffle, train=self.train,
                             rank=self.rank, world=self.world, start=self.start if self.train else 0)

    def samples_per_rank(self, start=0):
        if not self.train:
            return len(range(self.rank, self.n, self.world))
        return (self.n - start) // self.world

    def __len__(self):
        """Batches of a whole epoch."""
        return math.ceil(self.samples_per_rank() / self.batch_size)

    def remaining(self):
        """Batches left from the current start (len(self) minus the start batch when it is aligned)."""
        return math.ceil(self.samples_per_rank(self.start if self.train else 0) / self.batch_size)

    def key(self):
        """The epoch's augmentation key: every training draw is f(key, sample index)."""
        return stable_seed("augment", self.seed, self.epoch)

    def draw(self, ids):
        """What the BatchTransform augments a training batch with: (the epoch's key, the batch's sample
        indices on the CPU); None for evaluation."""
        return (self.key(), ids) if self.train else None

    def finish(self, x, y, ids):
        """BatchTransform, then mixup / cutmix (training batches, soft targets) of a device batch."""
        x = self.transform(x, self.draw(ids))
        if self.mix is not None:
            x, y = self.mix(x, y, self.key(), ids[0])
        return x, y


class MemoryLoader(_Loader):
    """Batches sliced from tensors that live on the training device (the split's own tensors, moved
    there: one copy of the dataset, not a host copy beside a device copy)."""

    def __init__(self, split, **kw):
        super().__init__(len(split), **kw)
        # The split itself moves to the device, so no host copy of the dataset stays beside it.
        split.x, split.y = split.x.to(self.device), split.y.to(self.device)
        self.x, self.y = split.x, split.y

    def __iter__(self):
        ids = self.indices()
        idx = ids.to(self.device)
        self.start = 0
        for b in range(math.ceil(len(idx) / self.batch_size)):
            part = slice(b * self.batch_size, (b + 1) * self.batch_size)
            sel, cpu = idx[part], ids[part]
            x = self.x.index_select(0, sel)
            if self.image_tf is not None:              # per image: crop boxes differ, so one at a time
                x = self.image_tf.batch(x, self.key() if self.train else None, cpu)
            yield self.finish(x, self.y.index_select(0, sel), cpu)


def _item(item):
    """A sampler item: a sample index, or (index, the epoch's augmentation key) for training."""
    return item if isinstance(item, tuple) else (item, None)


class TensorItems(torch.utils.data.Dataset):
    """In-memory tensors served one item at a time (data.loader=dataloader on an in-memory dataset)."""

    def __init__(self, split, image_tf=None):
        self.x, self.y = split.x, split.y
        self.image_tf = image_tf if image_tf is not None and image_tf.active else None

    def __len__(self):
        return len(self.y)

    def __getitem__(self, item):
        i, key = _item(item)
        x = self.x[i] if self.image_tf is None else self.image_tf(self.x[i], key, i)
        return x, self.y[i], None, i


class FileDataset(torch.utils.data.Dataset):
    """Decodes one image file per item into uint8 (C, S, S) (or as stored, for the per-image
    ImageTransform, which then runs here, in the worker); errors come back as values, not raises.
    An item is (image or None, label, error or None, sample index). With `encoded` (data.decode_on=
    device) a JPEG's item holds its bytes instead (a 1-D uint8 tensor), which the loader decodes on
    the device; other formats are decoded and transformed here as usual."""

    def __init__(self, split, spec, image_tf=None, decoder="pil", encoded=False):
        self.files, self.y, self.channels, self.decoder = split.files, split.y, spec.channels, decoder
        self.image_tf = image_tf if image_tf is not None and image_tf.active else None
        self.size = None if spec.size is None else spec.size[0]       # None: decoded as stored
        self.encoded = encoded

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        i, key = _item(item)
        try:
            if self.encoded and is_jpeg(self.files[i]):
                with open(self.files[i], "rb") as f:
                    return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), int(self.y[i]), None, i
            x = decode_image(self.files[i], self.size, self.channels, self.decoder)
        except (OSError, ValueError, SyntaxError, RuntimeError) as e:
            return None, int(self.y[i]), f"{self.files[i]} ({type(e).__name__}: {e})", i
        if self.image_tf is not None:
            x = self.image_tf(x, key, i)
        return x, int(self.y[i]), None, i


def collate(items):
    """(x, y, ids, bad) of a batch of (image or None, label, error or None, index) items: the readable
    images, their labels and sample indices stacked, and the error texts of the unreadable ones. With
    encoded JPEGs among them, x is the list of images and encoded files, for the loader to decode."""
    good = [it for it in items if it[0] is not None]
    bad = [it[2] for it in items if it[0] is None]
    if not good:
        return None, None, None, bad
    xs = [it[0] for it in good]
    return (_stack(xs) if all(t.ndim == 3 for t in xs) else xs, torch.stack([torch.as_tensor(it[1]) for it in good]),
            torch.tensor([it[3] for it in good], dtype=torch.int64), bad)


def _stack(images):
    """torch.stack of same-size images into a contiguous batch; in a DataLoader worker, straight into
    shared memory (as torch's default_collate does), which saves the copy there on the way out."""
    if torch.utils.data.get_worker_info() is None:
        return torch.stack(images).contiguous()
    elem = images[0]
    storage = elem._typed_storage()._new_shared(len(images) * elem.numel(), device=elem.device)
    return torch.stack(images, out=elem.new(storage).resize_(len(images), *elem.shape))


class _ShardSampler(torch.utils.data.Sampler):
    """Feeds the DataLoader this rank's indices from the current start batch on. It holds its loader
    weakly: a reference cycle would leave the DataLoader to the cyclic GC, which finalizes its queues
    in any order and then waits 5 s per worker to shut them down."""

    def __init__(self, loader):
        self.loader = weakref.proxy(loader)

    def __iter__(self):
        ids = self.loader.indices().tolist()
        if self.loader.train and self.loader.image_tf is not None:   # the workers need the epoch's key
            key = self.loader.key()
            return iter([(i, key) for i in ids])
        return iter(ids)

    def __len__(self):
        lo = self.loader
        return lo.samples_per_rank(lo.start if lo.train else 0)


class FileLoader(_Loader):
    """A tuned torch DataLoader (workers, pinned memory, persistent workers, prefetch) over files."""

    def __init__(self, dataset, *, num_workers, on_bad_sample, **kw):
        super().__init__(len(dataset), image_tf=getattr(dataset, "image_tf", None), **kw)
        self.on_bad_sample = on_bad_sample
        self.skipped = 0
        self.fallbacks = 0                      # JPEGs the device could not decode (decoded on the CPU)
        cuda = self.device.type == "cuda"
        self.dataloader = torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size, sampler=_ShardSampler(self), num_workers=num_workers,
            collate_fn=collate, pin_memory=cuda, persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=ignore_stop_signals)
        stopped_at_exit(self.dataloader)

    def __iter__(self):
        # The sampler reads self.start when the first batch is asked for: at once with workers, but
        # only at the first next() without them. So the start is reset after the first batch (or
        # when the epoch had nothing left), not here.
        for x, y, ids, bad in self.dataloader:
            self.start = 0
            if isinstance(x, list):                             # data.decode_on=device
                x, y, ids, failed = self.decode_on_device(x, y, ids)
                bad = bad + failed
            if bad:
                if self.on_bad_sample == "error":
                    raise UserError(f"could not read image {bad[0]}; fix or remove the file, or set "
                                    f"data.on_bad_sample=skip to skip unreadable images.")
                if x is None:
                    raise UserError(f"every image of a batch was unreadable (first: {bad[0]}); the data "
                                    f"is too damaged to train on.")
                self.skipped += len(bad)
                # Keep the batch size (and so every rank's step) unchanged: repeat good samples.
                fill = torch.arange(len(bad)) % len(x)
                x, y, ids = torch.cat([x, x[fill]]), torch.cat([y, y[fill]]), torch.cat([ids, ids[fill]])
            x = x.to(self.device, non_blocking=True)
            yield self.finish(x, y.to(self.device, non_blocking=True), ids)
        self.start = 0

    def decode_on_device(self, items, y, ids):
        """A batch of encoded JPEGs and worker-decoded images -> (x, y, ids, errors) on the device: the
        JPEGs decoded together there (lib/data/formats.py decode_jpegs), each then cropped and augmented
        by the ImageTransform the workers run, with the same draws (seed, epoch, sample index); files
        nothing decodes become errors, handled as the workers' unreadable files are."""
        coded = [k for k, t in enumerate(items) if t.ndim == 1]
        images, fallback = decode_jpegs([items[k] for k in coded], self.device)
        if fallback and not self.fallbacks:
            print(f"note: {fallback} JPEG(s) of a batch could not be decoded on {self.device} and were "
                  f"decoded on the CPU (TorchCodec or PIL); said once per loader", flush=True)
        self.fallbacks += fallback
        decoded = [k for k, img in zip(coded, images) if img is not None]
        failed = [k for k, img in zip(coded, images) if img is None]
        out = list(items)
        crops = self.image_tf.each([img for img in images if img is not None],
                                   self.key() if self.train else None, ids[decoded])
        for k, crop in zip(decoded, crops):
            out[k] = crop
        files = self.dataloader.dataset.files
        errors = [f"{files[int(ids[k])]} (neither TorchCodec nor PIL can decode it)" for k in failed]
        keep = [k for k in range(len(out)) if k not in failed]
        if not keep:
            return None, None, None, errors
        x = torch.stack([out[k].to(self.device, non_blocking=True) for k in keep]).contiguous()
        return x, y[keep], ids[keep], errors
