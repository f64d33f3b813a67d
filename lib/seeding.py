"""Seeds and random-number state: derived seeds, seeding a rank, saving and restoring every RNG a
run draws from, and a block that draws from its own seed without disturbing the global stream.

    stable_seed("order", seed, epoch)   # the same 63-bit seed on every machine and Python
    seed_everything(seed + rank)        # python, numpy, torch
    state = rng_state(device); set_rng_state(state, device)   # checkpointable (weights_only=True)
    with seeded(seed): model = build()  # identical weights on every rank; the global stream goes on
    sample_bits(key, ids, stream)       # per-sample random 32-bit ints = f(key, sample index, stream)
"""
import contextlib
import hashlib
import json
import random


def stable_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (data order = f(seed, epoch), augmentation key =
    f(seed, epoch)); unlike hash(), the same in every process and Python version."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


_M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (xorshift-multiply, Wellons' `lowbias32` family) of an int64 tensor
    holding values < 2**32; every product stays below 2**59, so int64 never overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def sample_bits(key: int, ids, stream: int):
    """Random 32-bit ints (int64 tensor, on ids' device), one per sample index in `ids`: a pure
    function of (key, index, stream). Augmentation draws from it, so a sample is augmented the same
    way whatever batch, rank, worker count or world size it falls in, and a resumed run draws what
    the unbroken one drew."""
    import torch
    x = ids.to(dtype=torch.int64) & _M32
    for word in (key & _M32, (key >> 32) & _M32, stream & _M32):
        x = _mix32(x ^ word)
    return x


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (CUDA's follow torch.manual_seed)."""
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with torch's CPU generator seeded by `seed`, then put the previous state back."""
    import torch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def rng_state(device=None) -> dict:
    """Every global RNG's state as tensors and plain values (loadable with weights_only=True); with
    a CUDA `device`, its generator's state too."""
    import numpy as np
    import torch
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"python": torch.tensor(keys, dtype=torch.int64), "python_version": version,
             "python_gauss": gauss,
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "numpy_gauss": [int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device=None) -> None:
    """Restore what rng_state() returned."""
    import numpy as np
    import torch
    random.setstate((state["python_version"], tuple(int(k) for k in state["python"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
