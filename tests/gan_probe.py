"""Run under torchrun by test_gan.py: drives gan_train.py's own step (lib/gan.py's make_gan_step) for a
few iterations with counting DDP comm hooks on G and D, and prints how many all-reduces and bytes each
network sent, and whether the ranks agree on both networks' weights and on D's gradients."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: E402

from lib import config, engine, gan, optim, runtime  # noqa: E402
from lib.models.dcgan import Discriminator, Generator  # noqa: E402

STEPS = 3
cfg = config.load(config.GanConfig, None, ["gan.latent_dim=8", "gan.g_features=4", "gan.d_features=4",
                                           "train.clip_grad_norm=1.0", "optim.name=adam", "optim.lr=2e-4"])
rt = runtime.setup(cfg, runtime.prepare_env(cfg), broadcast_buffers=False)
torch.manual_seed(0)                                   # the same initial weights on every rank
g_raw, d_raw = Generator(8, 1, 16, 4, "tanh"), Discriminator(1, 16, 4)
opt_g, opt_d = optim.build_optimizer(cfg.optim, g_raw), optim.build_optimizer(cfg.optim, d_raw)
g, opt_g = rt.prepare(g_raw, opt_g)
d, opt_d = rt.prepare(d_raw, opt_d)
sent = {"G": [0, 0], "D": [0, 0]}                      # [all-reduces, bytes]


def counting(name):
    def hook(state, bucket):
        sent[name][0] += 1
        sent[name][1] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)
    return hook


g.register_comm_hook(None, counting("G"))
d.register_comm_hook(None, counting("D"))
step = gan.make_gan_step(g, d, opt_g, opt_d, rt, cfg)
torch.manual_seed(1 + rt.rank)                         # each rank its own data and noise
for _ in range(STEPS):
    step(torch.rand(6, 1, 16, 16) * 2 - 1, None, engine.Micro(update=True, scale=1.0))


def agree(tensors):
    flat = torch.cat([t.detach().flatten() for t in tensors])
    gathered = rt.gather_object(flat)
    return all(torch.equal(gathered[0], t) for t in gathered)


weights = agree(list(g_raw.parameters()) + list(d_raw.parameters()))
d_grads = agree([p.grad for p in d_raw.parameters()])
d_bytes = sum(p.numel() * p.element_size() for p in d_raw.parameters())
line = (f"rank {rt.rank}/{rt.world_size}: {STEPS} steps; D sent {sent['D'][0]} all-reduces ({sent['D'][1]} bytes, "
        f"{sent['D'][1] / (STEPS * d_bytes):g} x its gradients per step); G sent {sent['G'][0]} ({sent['G'][1]} "
        f"bytes); weights agree: {weights}; D gradients agree: {d_grads}")
lines = rt.gather_object(line)                         # printed by rank 0 alone: no interleaved lines
if rt.rank == 0:
    print("\n".join(lines), flush=True)
rt.shutdown()
runtime.exit_now(0)
