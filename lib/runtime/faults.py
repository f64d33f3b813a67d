"""Failures, reported as a user can act on them: the fault-injection hook of the tests (an exception
raised inside the model's forward), the sentence an out-of-memory error adds, and the one traceback
a crash under a launcher prints (the failing rank's, named).

    model = inject_forward_fault(model, rank)     # TRAIN_FAULT_RAISE_AT_STEP=k [TRAIN_FAULT_RAISE_RANK=r]
    report_crash(err, rank, world_size)           # the traceback once, rank named, + the OOM advice
"""
import os
import sys
import traceback

OOM_ADVICE = ("the device ran out of memory: lower data.batch_size (and raise train.grad_accum to keep the "
              "effective batch), train in train.precision=bf16 or fp16, or set train.channels_last=false.")


def inject_forward_fault(model, rank):
    """Fault-injection tests: TRAIN_FAULT_RAISE_AT_STEP=k raises inside the k-th training forward (of
    rank TRAIN_FAULT_RAISE_RANK only, if set): a RuntimeError, or torch.OutOfMemoryError when
    TRAIN_FAULT_RAISE=oom. Only in a launcher's first attempt. Returns the model."""
    from lib.runtime.launch import restart_count
    at, who = os.environ.get("TRAIN_FAULT_RAISE_AT_STEP", ""), os.environ.get("TRAIN_FAULT_RAISE_RANK", "")
    if not at.isdigit() or restart_count() != 0 or (who.isdigit() and int(who) != rank):
        return model
    calls = [0]

    def hook(module, args):
        if not module.training:
            return
        calls[0] += 1
        if calls[0] == int(at):
            import torch
            kind = torch.OutOfMemoryError if os.environ.get("TRAIN_FAULT_RAISE") == "oom" else RuntimeError
            raise kind(f"injected fault in the forward of rank {rank} (TRAIN_FAULT_RAISE_AT_STEP={at})")

    model.register_forward_pre_hook(hook)
    return model


def is_oom(err):
    import torch
    return isinstance(err, torch.OutOfMemoryError) or "CUDA out of memory" in str(err)


def report_crash(err, rank, world_size):
    """Print an unexpected exception's traceback once, as one block, with the rank named (several
    ranks' lines no longer interleave), and the advice for an out-of-memory error."""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    lines = [f"{prefix}error: an unexpected exception ended the run (traceback below); the last checkpoint "
             f"is intact."] + [prefix + line for line in text.rstrip().splitlines()]
    if "torch" in sys.modules and is_oom(err):
        lines.append(prefix + OOM_ADVICE)
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()
