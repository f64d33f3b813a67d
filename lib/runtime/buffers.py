"""Batch-norm statistics across ranks. DDP broadcasts rank 0's buffers only at the start of the next
forward, so after the last training step every rank holds its own running statistics: an evaluation
sharded over the ranks would evaluate N different models, and a checkpoint would hold rank 0's.
DeepSpeed never broadcasts buffers after its engine starts (deepspeed/runtime/engine.py
_broadcast_model: parameters only, once), so there they drift apart for the whole run: the same fix.

    sync_buffers(modules, world_size, mode)   # before every evaluation and save (a collective)
    convert, note = check_sync_bn(model_cfg, device, world_size)   # at setup: refused on CPU, no file yet
    model, n = to_sync_batchnorm(model)        # model.sync_bn: SyncBatchNorm before DDP wraps it

dist.sync_buffers picks how: `broadcast` (rank 0's statistics everywhere: what DDP itself would do at
the next forward) or `mean` (the average over ranks, timm's distribute_bn 'reduce'). Integer buffers
(num_batches_tracked) are broadcast either way. Training is unchanged: a BatchNorm layer in training
mode normalises with the batch's own statistics, never the running ones.
"""
from lib.errors import UserError


def sync_buffers(modules, world_size: int, mode: str = "broadcast") -> None:
    """Make every buffer of `modules` equal on all ranks (one collective per dtype, coalesced)."""
    if world_size <= 1:
        return
    import torch
    import torch.distributed as tdist
    by_dtype, seen = {}, set()
    for b in (b for m in modules if m is not None for b in m.buffers()):
        if id(b) not in seen:                     # a buffer shared by two of the modules counts once
            seen.add(id(b))
            by_dtype.setdefault(b.dtype, []).append(b)
    for dtype, group in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):   # the same order on every rank
        flat = torch.cat([b.detach().reshape(-1) for b in group])
        if mode == "mean" and dtype.is_floating_point:
            tdist.all_reduce(flat)
            flat /= world_size
        else:
            tdist.broadcast(flat, src=0)
        offset = 0
        for b in group:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def check_sync_bn(model_cfg, device, world_size: int):
    """(convert, note): whether model.sync_bn converts this run's BatchNorm layers, and a note for the
    log when it is set but does nothing (one process). Called at setup, so a CPU multi-process run is
    refused before any data is decoded or any file is written: torch 2.14's SyncBatchNorm.forward
    raises "SyncBatchNorm expected input tensor to be on GPU or XPU or privateuseone" for a CPU tensor
    (torch/nn/modules/batchnorm.py), even in one process."""
    if not getattr(model_cfg, "sync_bn", False):
        return False, None
    if world_size <= 1:
        return False, "model.sync_bn has no effect in one process (BatchNorm already sees the whole batch)"
    if device.type != "cuda":
        raise UserError("model.sync_bn=true needs CUDA (torch's SyncBatchNorm runs on GPUs only); on CPU "
                        "remove it: the statistics are still synchronised before every evaluation and save "
                        "(dist.sync_buffers=broadcast or mean).")
    return True, None


def to_sync_batchnorm(model):
    """model.sync_bn: BatchNorm layers as SyncBatchNorm (statistics over the global batch, for small
    per-GPU batches). Returns (model, number of layers converted)."""
    import torch
    n = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model), n
