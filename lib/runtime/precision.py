"""Mixed precision: which precision the run uses, and the AMP steps in their required order.

    precision = resolve_precision(cfg.train.precision, "train.precision" in cfg._origins)
    amp = MixedPrecision(precision, device, accelerator, deepspeed)
    with amp.autocast(): loss = ...
    amp.backward(loss); amp.clip_grad_norm_(optimizer, params, max_norm); amp.step(optimizer)

Mixed precision is ours, not Accelerate's: torch.autocast + torch.amp.GradScaler, so fp16 works (and
is tested) on CPU too, and the AMP order stays visible in the scripts. Accelerate silently runs fp32
when asked for fp16 on a CPU (accelerator.py, `self.device.type != "cpu"`); we do not. Under
DeepSpeed its engine does the scaling, the clipping and the step, and our autocast still runs the
forward (its bf16/fp16 blocks cast the weights, not the batch; issue 15).
"""
import os

from lib.errors import UserError


def resolve_precision(ours: str, set_by_user: bool) -> str:
    """train.precision (`ours`), or the one chosen at `accelerate launch --mixed_precision` when ours
    was not set by the user; `set_by_user`: train.precision came from a config file or the command line."""
    theirs = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if theirs in (None, "", "no") or theirs == ours:
        return ours
    if set_by_user and ours != "no":
        raise UserError(f"train.precision={ours} but accelerate launch asks for mixed_precision={theirs}; "
                        f"make them agree (or drop one of them).")
    if theirs not in ("fp16", "bf16"):
        raise UserError(f"accelerate launch asks for mixed_precision={theirs}, which this package does not "
                        f"support; use no, fp16 or bf16.")
    return theirs


class MixedPrecision:
    """autocast, (scaled) backward, clipping on unscaled gradients and the (skippable) step.

    accelerator: takes the backward under DeepSpeed (anything with .backward(loss)).
    """

    def __init__(self, precision, device, accelerator, deepspeed):
        import torch
        self.torch = torch
        self.device = device
        self.accelerator = accelerator
        self.deepspeed = deepspeed
        self.amp_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and not self.deepspeed)
        self.skipped_steps = 0              # updates skipped for a non-finite gradient (on_nonfinite=skip)

    def autocast(self):
        """Mixed-precision forward context (a no-op for precision 'no'). Under DeepSpeed too: its bf16 /
        fp16 blocks cast the parameters but not the inputs (its fp16 `auto_cast` casts only fp32 inputs
        to fp16, and bf16 has no such option), so fp32 batches meet low-precision weights; autocast
        runs each op in the parameters' dtype, as Accelerate's autocast does without DeepSpeed."""
        enabled = self.amp_dtype is not None
        return self.torch.autocast(self.device.type, dtype=self.amp_dtype or self.torch.float32, enabled=enabled)

    def backward(self, loss):
        """loss.backward(), scaled under fp16 (GradScaler) and through the engine under DeepSpeed."""
        if self.deepspeed:
            self.accelerator.backward(loss)
        else:
            self.scaler.scale(loss).backward()

    def clip_grad_norm_(self, optimizer, parameters, max_norm):
        """Clip on *unscaled* gradients: unscale_ first under fp16 (pytorch/examples#1196 gets it wrong)."""
        if self.deepspeed:
            return None  # DeepSpeed clips inside its step (gradient_clipping in its config)
        self.scaler.unscale_(optimizer)
        return self.torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def step(self, optimizer, skip_if_nonfinite=None, update_scale=True):
        """optimizer.step(); under fp16 the scaler skips steps with inf/NaN gradients and adapts.

        skip_if_nonfinite: a gradient norm; when it is NaN/inf the update is skipped (train.on_nonfinite
        =skip). The norm is taken after DDP's all-reduce, so every rank makes the same decision.
        update_scale=False: more optimizers step in this iteration; the last one updates the scale
        (the GradScaler recipe for several optimizers).
        """
        if self.deepspeed:
            optimizer.step()
        elif self.scaler.is_enabled():
            self.scaler.step(optimizer)     # the scaler already skips non-finite steps
            if update_scale:
                self.scaler.update()
        elif skip_if_nonfinite is not None and not bool(self.torch.isfinite(skip_if_nonfinite)):
            self.skipped_steps += 1         # the same decision (and count) on every rank
            return False
        else:
            optimizer.step()
        return True
