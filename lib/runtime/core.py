"""The Runtime: one object that says where and how this process computes, built by setup(). It starts
Accelerate (DDP over NCCL or gloo, or DeepSpeed), and composes the launch checks, the process group
and its collectives, mixed precision, seeds and stop signals of the modules beside it.

    rt = setup(cfg, prepare_env(cfg))
    model, optimizer = rt.prepare(model, optimizer)   # to the device, DDP (or the DeepSpeed engine)
    with rt.no_sync(model, not update), rt.autocast(): ...; rt.backward(loss)
    rt.clip_grad_norm_(optimizer, params, max_norm); rt.step(optimizer)
    rt.all_reduce_(t); rt.barrier(); rt.should_stop(); rt.print0(...); rt.shutdown()
"""
import contextlib
import datetime
import os
import signal

from lib import seeding
from lib.errors import UserError
import lib.runtime.buffers as buffers
import lib.runtime.dist as dist
import lib.runtime.launch as launch
from lib.runtime.faults import inject_forward_fault
from lib.runtime.deepspeed import (check_can_start, configure, deepspeed_plugin, deepspeed_requested,
                                   resolve_accelerate_deepspeed_file)
from lib.runtime.precision import MixedPrecision, resolve_precision
from lib.runtime.signals import (STOP_SIGNALS, fault_pause_step, install_handlers, next_stop_signal,
                                 pause_for_fault_test, requeue_slurm_job, restore_handlers, write_stop_marker)

CURRENT = None  # the Runtime of this process once setup() ran (for clean shutdown on errors)


class Runtime:
    """Everything about where and how this process computes. Built by setup()."""

    def __init__(self, cfg, notes, broadcast_buffers=True):
        import torch
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        self.cfg = cfg
        self.torch = torch
        self.launcher = launch.detect_launcher()
        precision = resolve_precision(cfg.train.precision, "train.precision" in cfg._origins)
        cuda = torch.cuda.is_available()
        self._check_gpu_count(cuda)
        handlers = [InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.dist.timeout_s)),
                    DistributedDataParallelKwargs(find_unused_parameters=cfg.dist.find_unused_parameters,
                                                  broadcast_buffers=broadcast_buffers)]
        backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if cuda else "gloo")
        distributed = launch.is_distributed()
        if distributed:
            handlers[0].backend = backend   # Accelerate treats a named backend as "distributed"
        resolve_accelerate_deepspeed_file()
        ds_plugin = deepspeed_plugin(cfg.dist)
        use_ds = ds_plugin is not None or deepspeed_requested(cfg)
        if use_ds:
            check_can_start(cfg.train, distributed, cuda, backend, precision, cfg.dist)
        kwargs = dict(cpu=not cuda and not use_ds, kwargs_handlers=handlers,
                      mixed_precision=precision if use_ds else "no")
        if ds_plugin is not None:
            kwargs["deepspeed_plugin"] = ds_plugin
        if cuda:
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")   # timeouts raise in Python (dist.py)
        dist.init_process_group(backend, cfg.dist.timeout_s)
        try:
            self.accelerator = Accelerator(**kwargs)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"the distributed runtime could not start: {e}") from None
        acc = self.accelerator
        self.deepspeed = acc.distributed_type.name == "DEEPSPEED"
        self.device = acc.device
        self.rank = acc.process_index
        self.world_size = acc.num_processes
        self.local_rank = launch.node_local_rank(acc.local_process_index)[0]   # not the GPU index (launch.py)
        self.is_main = acc.is_main_process
        self.precision = precision
        self.notes = notes
        dist.check_world_size(int(os.environ.get("WORLD_SIZE", "1")), self.world_size, acc.distributed_type.name)
        self.amp = MixedPrecision(precision, self.device, acc, self.deepspeed)
        self._control_group = None
        self.fault_pause_step = fault_pause_step(self.rank)
        self._stop_signal = None            # the name of the first stop signal received
        self._old_handlers = {}
        launch.set_numerics(torch, cfg.train, self.device.type == "cuda")   # deterministic / tf32 flags
        self.sync_bn, note = buffers.check_sync_bn(cfg.model, self.device, self.world_size)   # CPU: refused
        self.notes += [note] if note else []
        if self.world_size > 1:
            self._control_group = dist.make_control_group(cfg.dist.timeout_s)
        self.engine = None                  # the DeepSpeed engine, once prepare() made it
        self.zero_stage = 0                 # DeepSpeed's ZeRO stage (0 without DeepSpeed)
        if self.deepspeed:
            ds_config = acc.state.deepspeed_plugin.deepspeed_config
            self.zero_stage = configure(ds_config, cfg.train, cfg.data, self.world_size)

    def _check_gpu_count(self, cuda):
        if cuda:
            launch.check_gpu_count(self.torch.cuda.device_count())

    # -- precision (lib/runtime/precision.py) ---------------------------------------------------

    def autocast(self):
        return self.amp.autocast()

    def backward(self, loss):
        self.amp.backward(loss)

    def clip_grad_norm_(self, optimizer, parameters, max_norm):
        return self.amp.clip_grad_norm_(optimizer, parameters, max_norm)

    def step(self, optimizer, skip_if_nonfinite=None, update_scale=True):
        return self.amp.step(optimizer, skip_if_nonfinite, update_scale)

    @property
    def scaler(self):
        return self.amp.scaler

    @property
    def skipped_steps(self):
        return self.amp.skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, count):
        self.amp.skipped_steps = count

    # -- model wrapping -------------------------------------------------------------------------

    def prepare(self, model, optimizer=None, *, compile=False, channels_last=False):
        """Move the model to the device and wrap it: DDP when distributed (or the DeepSpeed engine),
        then torch.compile when asked (compiling the DDP module lets DDP's optimizer split graphs at
        bucket boundaries). The optimizer keeps the same parameter objects."""
        torch = self.torch
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = inject_forward_fault(model, self.rank)     # fault-injection tests only (an env var)
        if self.sync_bn:
            model, n = buffers.to_sync_batchnorm(model)
            self.print0(f"model.sync_bn: {n} BatchNorm layers synchronised over the {self.world_size} processes")
        if self.deepspeed:
            try:
                model, optimizer = self.accelerator.prepare(model, optimizer)
            except (ValueError, AssertionError) as e:
                raise UserError(f"DeepSpeed could not start the engine: {str(e).splitlines()[0]}") from None
            self.engine = model
        else:
            model = model.to(self.device)
            if self.world_size > 1:
                model = self.accelerator.prepare_model(model)
        if compile:
            t = self.cfg.train
            model = torch.compile(model, mode=t.compile_mode, backend=t.compile_backend)
        return model, optimizer

    def unwrap(self, model):
        """The raw module under DDP / DeepSpeed / torch.compile wrappers (checkpoints hold its state)."""
        while True:
            if hasattr(model, "_orig_mod"):
                model = model._orig_mod
            elif hasattr(model, "module") and isinstance(model.module, self.torch.nn.Module) and \
                    type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine", "DataParallel"):
                model = model.module
            else:
                return model

    def eval_model(self, model):
        """The module to evaluate with: the raw one (no DDP collectives), or under ZeRO-3, whose
        parameters are gathered by collectives in every forward, the engine (see lockstep_eval)."""
        return model if self.lockstep_eval else self.unwrap(model)

    @property
    def lockstep_eval(self):
        """Every rank must run the same number of forwards (ZeRO-3 gathers parameters in forward)."""
        return self.deepspeed and self.zero_stage == 3 and self.world_size > 1

    def full_state_dict(self, model):
        """The model's complete state dict (a collective under DeepSpeed: ZeRO-3 gathers the shards)."""
        if self.deepspeed:
            return self.accelerator.get_state_dict(self.engine)
        return self.unwrap(model).state_dict()

    def sync_buffers(self, *modules):
        """Batch-norm statistics made equal on every rank (dist.sync_buffers; a collective every rank
        calls before evaluating or saving). Under DeepSpeed too: its engine never broadcasts buffers
        after it starts, and no ZeRO stage partitions them, so the raw module's are plain tensors."""
        buffers.sync_buffers([self.unwrap(m) for m in modules], self.world_size, self.cfg.dist.sync_buffers)

    def no_sync(self, model, skip_sync):
        """No gradient all-reduce on accumulation micro-steps (DDP.no_sync)."""
        if skip_sync and self.world_size > 1 and hasattr(model, "no_sync") and not self.deepspeed:
            return model.no_sync()
        return contextlib.nullcontext()

    # -- collectives (lib/runtime/dist.py) ------------------------------------------------------

    def all_reduce_(self, tensor, op="sum"):
        return dist.all_reduce_(tensor, self.world_size, op)

    def mean(self, tensor):
        return dist.mean(tensor, self.world_size)

    def gather_object(self, obj):
        return dist.gather_object(obj, self.world_size)

    def broadcast_object(self, obj):
        return dist.broadcast_object(obj, self.world_size)

    def barrier(self):
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    def agree(self, flag):
        return dist.agree(flag, self.world_size, self._control_group)

    def main_process_first(self):
        return dist.main_process_first(self.is_main, self.local_rank, self.world_size, self.barrier)

    # -- seeds (lib/seeding.py) -----------------------------------------------------------------

    def seed(self, seed):
        """Seed python, numpy and torch for this rank: seed + rank (dropout differs per rank)."""
        seeding.seed_everything(seed + self.rank)

    def rng_state(self):
        """This rank's RNG states as tensors and ints (loadable with weights_only=True)."""
        return seeding.rng_state(self.device)

    def set_rng_state(self, state):
        seeding.set_rng_state(state, self.device)

    # -- signals (lib/runtime/signals.py) -------------------------------------------------------

    def install_signal_handlers(self, signals=STOP_SIGNALS):
        """SIGTERM / SIGUSR1 (from setup on) and SIGINT (once training runs) only set a flag; the loop
        checkpoints at the next step boundary on every rank's agreement and exits 0.

        Saving inside a handler hangs (Lightning#21406), so the handler does no I/O. A second Ctrl-C
        while we are already stopping exits at once (status 130); repeated TERM/USR1 do not.
        """
        install_handlers(self._on_signal, signals, self._old_handlers)

    def _on_signal(self, signum, frame):
        self._stop_signal = next_stop_signal(self._stop_signal, signum)

    def restore_signal_handlers(self, only=None):
        """Put back the handlers we replaced (`only` these signals: after training, Ctrl-C goes back to
        Python's, while a late TERM/USR1 still only sets the flag until shutdown())."""
        restore_handlers(self._old_handlers, only)

    def should_stop(self):
        """True on every rank as soon as any rank has received a stop signal."""
        return self.agree(self._stop_signal is not None)

    @property
    def stop_signal(self):
        return self._stop_signal

    def requeue_slurm_job(self):
        """Rank 0, after a stop by SIGUSR1/SIGTERM under REQUEUE_ON_SIGNAL=1: requeue the SLURM job.
        Returns what was done, or None."""
        return requeue_slurm_job(self._stop_signal) if self.is_main else None

    def pause_for_fault_test(self):
        pause_for_fault_test(self.rank, lambda: self._stop_signal)

    def write_stop_marker(self, text):
        if self.is_main:
            write_stop_marker(text)

    # -- output ---------------------------------------------------------------------------------

    def print0(self, *args, **kwargs):
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def describe(self):
        kind = f"DeepSpeed ZeRO-{self.zero_stage}" if self.deepspeed else (
            "DDP" if self.world_size > 1 else "single process")
        return (f"{kind}, {self.world_size} process(es), device {self.device}, precision {self.precision}, "
                f"launcher {self.launcher}, backend "
                f"{dist.backend_name() if self.world_size > 1 else 'none'} "
                f"({self.accelerator.distributed_type.name})")

    def env_info(self):
        """What env.json records: versions, commit, world size, host, devices."""
        return launch.env_info(world_size=self.world_size, launcher=self.launcher, device=str(self.device),
                               precision=self.precision, distributed_type=self.accelerator.distributed_type.name)

    def shutdown(self, ok=True):
        """Leave the process group cleanly (a barrier first, so no rank tears down mid-collective)."""
        global CURRENT
        CURRENT = None
        self.restore_signal_handlers()
        dist.leave_process_group(ok, self._control_group)
        self._control_group = None


def setup(cfg, notes=(), broadcast_buffers=True) -> Runtime:
    """Build the Runtime: start the process group, pick the device, seed this rank.

    broadcast_buffers=False is for models called several times before backward (a GAN's batch-norm
    discriminator): DDP's buffer broadcast would modify buffers autograd saved (pytorch#22095).
    """
    global CURRENT
    rt = Runtime(cfg, list(notes), broadcast_buffers)
    CURRENT = rt
    rt.seed(cfg.seed)
    rt.install_signal_handlers((signal.SIGTERM, signal.SIGUSR1))   # SIGINT joins when training starts
    return rt


def peer_failure(err):
    """A sentence for an error that means another process of this job stopped answering, else None."""
    if CURRENT is None:
        return None
    return dist.peer_failure(err, CURRENT.world_size, CURRENT.cfg.dist.timeout_s)
