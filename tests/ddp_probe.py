"""Run under torchrun by test_distributed.py: counts DDP gradient all-reduces during accumulation."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: E402

from lib import config, runtime  # noqa: E402

cfg = config.load(config.Config, None, [])
rt = runtime.setup(cfg, runtime.prepare_env(cfg))
model, _ = rt.prepare(torch.nn.Linear(4, 2))
calls = []


def counting_hook(state, bucket):
    calls.append(1)
    return allreduce_hook(state, bucket)


model.register_comm_hook(None, counting_hook)
for micro in range(6):
    update = micro % 3 == 2                      # grad_accum = 3
    with rt.no_sync(model, skip_sync=not update):
        rt.backward(model(torch.randn(5, 4)).square().mean())
print(f"rank {rt.rank}/{rt.world_size}: {len(calls)} all-reduces", flush=True)
rt.shutdown()
runtime.exit_now(0)      # as the scripts end (lib/cli.py): no interpreter teardown racing gloo's threads
