"""An exponential moving average of a model's weights (as in StyleGAN's G_ema or timm's ModelEma).

    ema = EMA(generator, decay=0.999)
    ema.update(generator)        # after each optimizer step
    ema.module(z)                # the averaged model, in eval mode
Buffers (batch-norm statistics) are copied, not averaged. state_dict() holds tensors only.
"""
import copy

import torch


class EMA:
    def __init__(self, model, decay):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        params = [p for p in model.parameters()]
        ema_params = [p for p in self.module.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state):
        self.module.load_state_dict(state)
