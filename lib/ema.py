"""An exponential moving average of a model's weights (as in StyleGAN's G_ema, timm's ModelEma and
torchvision's reference ExponentialMovingAverage).

    ema = EMA(generator, decay=0.999)
    ema.update(generator)        # after each optimizer step
    ema.module(z)                # the averaged model, in eval mode
With ramp=True (the GAN's) the decay ramps up as min(decay, (1 + n) / (10 + n)) over the first
updates (as timm and StyleGAN do), so early random weights do not linger; train.py's EMA keeps the
decay constant and copies the weights during its warmup instead (torchvision's recipe). Buffers
(batch-norm statistics) are copied (the GAN's), or, with average_buffers (train.py / finetune.py, as
torchvision's use_buffers=True), the floating ones averaged like the weights so that they match them:
copied statistics of the current weights under averaged weights made a ResNet's EMA evaluate at chance.
state_dict() holds tensors only, the update count included.
"""
import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, ramp: bool = True, average_buffers: bool = False):
        self.decay, self.ramp, self.average_buffers = decay, ramp, average_buffers
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, copy_weights=False):
        """One EMA step towards `model`'s weights (copy_weights: become a copy of them)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.ramp else self.decay
        if copy_weights:
            decay = 0.0
        params = [p.detach() for p in model.parameters()]
        ema_params = list(self.module.parameters())
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            if self.average_buffers and b.is_floating_point():
                b_ema.lerp_(b, 1.0 - decay)       # batch-norm statistics that match the averaged weights
            else:
                b_ema.copy_(b)

    def state_dict(self):
        return {**self.module.state_dict(), "_ema_updates": torch.tensor(self.updates)}

    def load_state_dict(self, state):
        state = dict(state)
        self.updates = int(state.pop("_ema_updates", 0))
        self.module.load_state_dict(state)


def ema_hook(ema, model, every: int, warmup_steps: int):
    """on_update(state) for engine.fit: every `every` optimizer steps, an EMA step towards `model`'s
    weights, or a copy of them while state.step <= warmup_steps."""
    def on_update(state):
        if state.step % every == 0:
            ema.update(model, copy_weights=state.step <= warmup_steps)
    return on_update


def for_run(train_cfg, model, updates_per_epoch: int):
    """(EMA of `model` (the unwrapped module, on its device), its engine.fit on_update hook) for the
    train section's ema / ema_every / ema_warmup_epochs; (None, None) when train.ema is null."""
    if train_cfg.ema is None:
        return None, None
    ema = EMA(model, train_cfg.ema, ramp=False, average_buffers=True)     # torchvision's use_buffers=True
    warmup = round(train_cfg.ema_warmup_epochs * updates_per_epoch)
    return ema, ema_hook(ema, model, train_cfg.ema_every, warmup)
