"""Run under torchrun by test_distributed.py: counts the DDP gradient all-reduces that train.py's own
step (lib/steps.py's make_train_step) makes during gradient accumulation, and checks the ranks end with
equal weights."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: E402

from lib import config, engine, losses, optim, runtime, steps  # noqa: E402

ACCUM = 3
cfg = config.load(config.Config, None, [f"train.grad_accum={ACCUM}", "optim.name=sgd", "optim.lr=0.1"])
rt = runtime.setup(cfg, runtime.prepare_env(cfg))
torch.manual_seed(0)                                   # the same initial weights on every rank
raw = torch.nn.Linear(4, 2)
optimizer = optim.build_optimizer(cfg.optim, raw)
scheduler = optim.build_scheduler(cfg.sched, optimizer, steps_per_epoch=2, total_steps=2)
model, optimizer = rt.prepare(raw, optimizer)
calls = []


def counting_hook(state, bucket):
    calls.append(1)
    return allreduce_hook(state, bucket)


model.register_comm_hook(None, counting_hook)
step = steps.make_train_step(model, losses.build_loss(cfg.loss, "classification"), optimizer, scheduler, rt,
                             cfg.train, "classification")
g = torch.Generator().manual_seed(1 + rt.rank)         # each rank its own data
for micro in range(2 * ACCUM):
    x, y = torch.randn(5, 4, generator=g), torch.randint(0, 2, (5,), generator=g)
    step(x, y, engine.Micro(update=micro % ACCUM == ACCUM - 1, scale=1.0 / ACCUM, first=micro % ACCUM == 0))
weights = torch.cat([p.detach().flatten() for p in raw.parameters()])
gathered = rt.gather_object(weights)
same = all(torch.equal(gathered[0], w) for w in gathered)
print(f"rank {rt.rank}/{rt.world_size}: {len(calls)} all-reduces, ranks agree: {same}", flush=True)
rt.shutdown()
runtime.exit_now(0)      # as the scripts end (lib/cli.py): no interpreter teardown racing gloo's threads
