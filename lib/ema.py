"""An exponential moving average of a model's weights (as in StyleGAN's G_ema or timm's ModelEma).

    ema = EMA(generator, decay=0.999)
    ema.update(generator)        # after each optimizer step
    ema.module(z)                # the averaged model, in eval mode
The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates (as timm and StyleGAN
do), so early random weights do not linger. Buffers (batch-norm statistics) are copied, not
averaged. state_dict() holds tensors only, the update count included.
"""
import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = [p.detach() for p in model.parameters()]
        ema_params = list(self.module.parameters())
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self):
        return {**self.module.state_dict(), "_ema_updates": torch.tensor(self.updates)}

    def load_state_dict(self, state):
        state = dict(state)
        self.updates = int(state.pop("_ema_updates", 0))
        self.module.load_state_dict(state)
