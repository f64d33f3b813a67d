"""The runtime: processes, devices, precision, seeds and collectives. The only module that reads
environment variables or touches torch.distributed / Accelerate (DESIGN.md section 5).

The same script runs under `python`, `torchrun`, `accelerate launch` and `srun`:

    prepare_env(cfg)      before CUDA is initialised: dist.gpus -> CUDA_VISIBLE_DEVICES, SLURM -> RANK...
    rt = setup(cfg)       Accelerator (DDP over NCCL or gloo, DeepSpeed), checks, seeds, signal flags
    model = rt.prepare_model(model)       DDP wrap (or the DeepSpeed engine)
    with rt.no_sync(model, not update), rt.autocast(): ...; rt.backward(loss)
    rt.clip_grad_norm_(optimizer, params, max_norm); rt.step(optimizer)
    rt.all_reduce_(t); rt.barrier(); rt.print0(...); rt.shutdown()

Mixed precision is ours, not Accelerate's: torch.autocast + torch.amp.GradScaler, so fp16 works (and
is tested) on CPU too, and the AMP order stays visible in the scripts. Accelerate silently runs fp32
when asked for fp16 on a CPU (accelerator.py, `self.device.type != "cpu"`); we do not.
"""
import contextlib
import datetime
import hashlib
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import time

from lib.errors import UserError

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
CURRENT = None  # the Runtime of this process once setup() ran (for clean shutdown on errors)
_GROUP_STARTED = False   # this process left a process group (see exit_now)


# ---------------------------------------------------------------------------------------------
# 1. Environment, before torch touches CUDA
# ---------------------------------------------------------------------------------------------

def prepare_env(cfg):
    """Apply GPU selection and SLURM launch variables; returns notes for the log.

    GPU precedence (first wins): dist.gpus, then CUDA_VISIBLE_DEVICES, then SLURM's own binding.
    dist.gpus indexes the GPUs already visible, so '1' under CUDA_VISIBLE_DEVICES=4,5 selects GPU 5.
    """
    notes = []
    torch = sys.modules.get("torch")
    if cfg.dist.gpus is not None:
        if torch is not None and torch.cuda.is_initialized():
            raise UserError("dist.gpus was given after CUDA was initialised in this process; set "
                            "CUDA_VISIBLE_DEVICES before starting Python instead.")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        wanted = cfg.dist.gpus.split(",")
        if visible not in (None, ""):
            pool = [v.strip() for v in visible.split(",") if v.strip()]
            bad = [g for g in wanted if int(g) >= len(pool)]
            if bad:
                raise UserError(f"dist.gpus={cfg.dist.gpus} asks for GPU {bad[0]} but only {len(pool)} are "
                                f"visible (CUDA_VISIBLE_DEVICES={visible}); dist.gpus counts within those.")
            chosen = ",".join(pool[int(g)] for g in wanted)
            notes.append(f"dist.gpus={cfg.dist.gpus} selects CUDA_VISIBLE_DEVICES={chosen} (from {visible})")
        else:
            chosen = cfg.dist.gpus
            notes.append(f"dist.gpus sets CUDA_VISIBLE_DEVICES={chosen}")
        os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    elif os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, ""):
        source = "SLURM" if os.environ.get("SLURM_STEP_GPUS") or os.environ.get("SLURM_JOB_GPUS") else "the environment"
        notes.append(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} (set by {source})")
    notes += _map_slurm_env()
    _check_launch_env()
    return notes


def _map_slurm_env():
    """`srun python train.py` (one task per GPU, no torchrun): derive torchrun's variables from SLURM's."""
    env = os.environ
    if "SLURM_PROCID" not in env or "RANK" in env or "TORCHELASTIC_RUN_ID" in env:
        return []
    ntasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")))
    if ntasks <= 1:
        return []
    nodes = slurm_hostnames(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
    if not nodes:
        raise UserError("running under srun with several tasks but SLURM_JOB_NODELIST is empty; "
                        "launch with srun inside an sbatch/salloc allocation.")
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(ntasks)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    env["LOCAL_WORLD_SIZE"] = per_node if per_node.isdigit() else str(max(1, ntasks // len(nodes)))
    env.setdefault("MASTER_ADDR", nodes[0])
    env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID", "0"))))
    notes = [f"srun launch: rank {env['RANK']}/{ntasks}, master {env['MASTER_ADDR']}:{env['MASTER_PORT']}"]
    visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if len(visible) == 1 and int(env["LOCAL_WORLD_SIZE"]) > 1:
        # SLURM bound one GPU to each task (--gpus-per-task=1, --gpu-bind): this task's GPU is its
        # cuda:0, so it computes (and joins NCCL barriers) as the only process of its own view.
        env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"] = "0", "1"
        notes.append(f"SLURM bound GPU {visible[0]} to this task; it is this process's cuda:0")
    return notes


def slurm_port(job_id):
    """A port derived from the job id, so concurrent jobs on one node do not collide (as Lightning)."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return 15000 + int(digits[-4:]) % 5000


def slurm_hostnames(nodelist):
    """Expand 'gpu[01-03,07],cpu1' like `scontrol show hostnames` (without needing scontrol)."""
    hosts, depth, token = [], 0, ""
    for ch in nodelist + ",":
        if ch == "," and depth == 0:
            if token:
                hosts += _expand_host(token)
            token = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        token += ch
    return hosts


def _expand_host(token):
    m = re.match(r"^(.*?)\[([^\]]+)\](.*)$", token)
    if not m:
        return [token]
    head, ranges, tail = m.groups()
    out = []
    for part in ranges.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += [f"{head}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(head + part)
    return [h for o in out for h in _expand_host(o + tail)]


def _check_launch_env():
    env = os.environ
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        if var in env and not env[var].isdigit():
            raise UserError(f"{var}={env[var]} is not a process count; check the launcher command (or unset it).")
    world = int(env.get("WORLD_SIZE", "1"))
    if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
        raise UserError(f"WORLD_SIZE={world} is set but MASTER_ADDR/MASTER_PORT are not; launch with torchrun, "
                        f"accelerate launch or srun (which set them), or unset WORLD_SIZE for one process.")
    for var in ("RANK", "LOCAL_RANK"):
        if var in env and not env[var].isdigit():
            raise UserError(f"{var}={env[var]} is not a process index; check the launcher command.")
    if int(env.get("RANK", "0")) >= world:
        raise UserError(f"RANK={env['RANK']} is not below WORLD_SIZE={world}; check the launcher command.")


# ---------------------------------------------------------------------------------------------
# 2. The Runtime object
# ---------------------------------------------------------------------------------------------

class Runtime:
    """Everything about where and how this process computes. Built by setup()."""

    def __init__(self, cfg, notes, broadcast_buffers=True):
        import torch
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        self.cfg = cfg
        self.torch = torch
        self.launcher = detect_launcher()
        precision = self._resolve_precision(cfg)
        cuda = torch.cuda.is_available()
        self._check_gpu_count(cuda)
        handlers = [InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.dist.timeout_s)),
                    DistributedDataParallelKwargs(find_unused_parameters=cfg.dist.find_unused_parameters,
                                                  broadcast_buffers=broadcast_buffers)]
        backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if cuda else "gloo")
        distributed = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) >= 1 \
            and "RANK" in os.environ
        if distributed:
            handlers[0].backend = backend   # Accelerate treats a named backend as "distributed"
        _resolve_accelerate_deepspeed_file()
        ds_plugin = self._deepspeed_plugin(cfg)
        use_ds = ds_plugin is not None or deepspeed_requested(cfg)
        if use_ds:
            _require_deepspeed()
            if cfg.train.on_nonfinite == "skip":
                raise UserError("train.on_nonfinite=skip cannot work under DeepSpeed, whose engine takes the step "
                                "itself; use train.on_nonfinite=stop (DeepSpeed's fp16 loss scaler already skips "
                                "overflow steps).")
            if not distributed:
                raise UserError("DeepSpeed needs a launcher: run under torchrun (--nproc_per_node=1 is fine) or "
                                "accelerate launch with a DeepSpeed config.")
            if not cuda and backend != "gloo":
                raise UserError(f"dist.backend={backend} needs GPUs; DeepSpeed on CPU runs over gloo "
                                f"(dist.backend=auto or gloo).")
        kwargs = dict(cpu=not cuda and not use_ds, kwargs_handlers=handlers,
                      mixed_precision=precision if use_ds else "no")
        if ds_plugin is not None:
            kwargs["deepspeed_plugin"] = ds_plugin
        if cuda:
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")   # a timed-out collective aborts
        _init_process_group(backend, cfg.dist.timeout_s)
        try:
            self.accelerator = Accelerator(**kwargs)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"the distributed runtime could not start: {e}") from None
        acc = self.accelerator
        self.deepspeed = acc.distributed_type.name == "DEEPSPEED"
        self.device = acc.device
        self.rank = acc.process_index
        self.world_size = acc.num_processes
        self.local_rank = acc.local_process_index
        self.is_main = acc.is_main_process
        self.precision = precision
        self.notes = notes
        check_world_size(int(os.environ.get("WORLD_SIZE", "1")), self.world_size, acc.distributed_type.name)
        self.amp_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16" and not self.deepspeed)
        self._control_group = None
        self.skipped_steps = 0              # updates skipped for a non-finite gradient (on_nonfinite=skip)
        # Fault-injection tests stop a run at an exact step: TRAIN_FAULT_PAUSE_AT_STEP=N holds every
        # rank (or only rank TRAIN_FAULT_PAUSE_RANK) after optimizer step N, its log line and
        # checkpoints written, until it is killed; only in a launcher's first attempt.
        pause = os.environ.get("TRAIN_FAULT_PAUSE_AT_STEP", "")
        who = os.environ.get("TRAIN_FAULT_PAUSE_RANK", "")
        self.fault_pause_step = int(pause) if pause.isdigit() and restart_count() == 0 and \
            (not who.isdigit() or int(who) == self.rank) else None
        self._stop_signal = None
        self._old_handlers = {}
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True   # TF32 on Ampere+ matmuls/convs (timm, nanoGPT)
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        if self.world_size > 1:
            self._control_group = self._make_control_group()
        self.engine = None
        if self.deepspeed:
            self._configure_deepspeed(cfg)

    # -- setup helpers ------------------------------------------------------------------------

    def _resolve_precision(self, cfg):
        """train.precision, or the one chosen at `accelerate launch --mixed_precision` when ours is unset."""
        ours = cfg.train.precision
        theirs = os.environ.get("ACCELERATE_MIXED_PRECISION")
        if theirs in (None, "", "no") or theirs == ours:
            return ours
        if "train.precision" in cfg._origins and ours != "no":
            raise UserError(f"train.precision={ours} but accelerate launch asks for mixed_precision={theirs}; "
                            f"make them agree (or drop one of them).")
        if theirs not in ("fp16", "bf16"):
            raise UserError(f"accelerate launch asks for mixed_precision={theirs}, which this package does not "
                            f"support; use no, fp16 or bf16.")
        return theirs

    def _check_gpu_count(self, cuda):
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if not cuda:
            return
        count = self.torch.cuda.device_count()
        if local_world > count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
            raise UserError(f"{local_world} processes were started on this node but only {count} GPUs are "
                            f"visible (CUDA_VISIBLE_DEVICES={visible}); start at most {count} processes per "
                            f"node (--nproc_per_node / --ntasks-per-node) or make more GPUs visible.")

    def _deepspeed_plugin(self, cfg):
        """dist.deepspeed (torchrun launches) -> a DeepSpeedPlugin; accelerate launch configs set it by env."""
        path = cfg.dist.deepspeed
        if not path:
            return None
        path = _from_repo(path)
        if not os.path.exists(path):
            raise UserError(f"dist.deepspeed={path} does not exist; point it at a DeepSpeed JSON file "
                            f"such as configs/deepspeed/zero2.json.")
        _require_deepspeed()
        from accelerate.utils import DeepSpeedPlugin
        try:
            return DeepSpeedPlugin(hf_ds_config=path)
        except (ValueError, OSError) as e:
            raise UserError(f"dist.deepspeed={path} is not a usable DeepSpeed config: {e}") from None

    def _configure_deepspeed(self, cfg):
        """Make DeepSpeed's batch settings agree with ours and the world size (its "auto" values are
        filled here; explicit values that disagree are a clear error instead of a wrong job)."""
        plugin = self.accelerator.state.deepspeed_plugin
        ds = plugin.deepspeed_config
        if cfg.train.grad_accum != 1:
            raise UserError("train.grad_accum > 1 is not supported under DeepSpeed here (its engine counts "
                            "micro-steps across epochs); use a larger data.batch_size or more processes.")
        want = {"train_micro_batch_size_per_gpu": cfg.data.batch_size, "gradient_accumulation_steps": 1,
                "train_batch_size": cfg.data.batch_size * self.world_size}
        for key, value in want.items():
            have = ds.get(key, "auto")
            if have not in ("auto", value):
                raise UserError(f"the DeepSpeed config sets {key}={have} but this run needs {value} (data.batch_size="
                                f"{cfg.data.batch_size}, {self.world_size} processes, grad_accum 1); set it to "
                                f'"auto" in the JSON.')
            ds[key] = value
        clip = cfg.train.clip_grad_norm or 0.0
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = clip
        elif cfg.train.clip_grad_norm and ds["gradient_clipping"] != clip:
            raise UserError(f"the DeepSpeed config clips at {ds['gradient_clipping']} but train.clip_grad_norm="
                            f"{clip}; set gradient_clipping to \"auto\" in the JSON.")
        self.zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0) or 0)
        if self.zero_stage == 3:
            ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True

    def _make_control_group(self):
        """A gloo group for tiny control-plane reductions (stop flags), so they never sync the GPU."""
        import torch.distributed as dist
        if dist.get_backend() == "gloo":
            return dist.group.WORLD
        return dist.new_group(backend="gloo")

    # -- precision ----------------------------------------------------------------------------

    def autocast(self):
        """Mixed-precision forward context (a no-op for precision 'no' and under DeepSpeed)."""
        enabled = self.amp_dtype is not None and not self.deepspeed
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

    # -- model wrapping -----------------------------------------------------------------------

    def prepare(self, model, optimizer=None, *, compile=False, channels_last=False):
        """Move the model to the device and wrap it: DDP when distributed (or the DeepSpeed engine),
        then torch.compile when asked (compiling the DDP module lets DDP's optimizer split graphs at
        bucket boundaries). The optimizer keeps the same parameter objects."""
        torch = self.torch
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
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
        return self.deepspeed and getattr(self, "zero_stage", 0) == 3 and self.world_size > 1

    def full_state_dict(self, model):
        """The model's complete state dict (a collective under DeepSpeed: ZeRO-3 gathers the shards)."""
        if self.deepspeed:
            return self.accelerator.get_state_dict(self.engine)
        return self.unwrap(model).state_dict()

    def no_sync(self, model, skip_sync):
        """No gradient all-reduce on accumulation micro-steps (DDP.no_sync)."""
        if skip_sync and self.world_size > 1 and hasattr(model, "no_sync") and not self.deepspeed:
            return model.no_sync()
        return contextlib.nullcontext()

    # -- collectives --------------------------------------------------------------------------

    def all_reduce_(self, tensor, op="sum"):
        """In-place sum/max/min over all processes (a no-op in one process)."""
        if self.world_size > 1:
            import torch.distributed as dist
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            dist.all_reduce(tensor, op=ops[op])
        return tensor

    def mean(self, tensor):
        """The mean of a scalar tensor over all processes."""
        if self.world_size == 1:
            return tensor
        t = tensor.detach().clone().float()
        self.all_reduce_(t)
        return t / self.world_size

    def gather_object(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's obj on every rank (decisions are made once and shared, never re-derived)."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    def agree(self, flag):
        """True on every rank if `flag` is true on any rank (a control-plane MAX over gloo)."""
        if self.world_size == 1:
            return bool(flag)
        t = self.torch.tensor([1 if flag else 0], dtype=self.torch.int32)
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control_group)
        return bool(t.item())

    @contextlib.contextmanager
    def main_process_first(self):
        """Rank 0 runs the block first (e.g. a download), then each node's first process, then the rest."""
        if self.world_size == 1:
            yield
            return
        first = self.is_main
        node_first = self.local_rank == 0 and not first
        if not first:
            self.barrier()                      # A: wait for rank 0
            if not node_first:
                self.barrier()                  # B: wait for this node's first process
        try:
            yield
        finally:
            if first:
                self.barrier()
                self.barrier()
            elif node_first:
                self.barrier()

    # -- seeds ---------------------------------------------------------------------------------

    def seed(self, seed):
        """Seed python, numpy and torch for this rank: seed + rank (dropout differs per rank)."""
        import numpy as np
        s = seed + self.rank
        random.seed(s)
        np.random.seed(s % 2**32)
        self.torch.manual_seed(s)

    def rng_state(self):
        """This rank's RNG states as tensors and ints (loadable with weights_only=True)."""
        import numpy as np
        torch = self.torch
        version, keys, gauss = random.getstate()
        np_state = np.random.get_state()
        state = {"python": torch.tensor(keys, dtype=torch.int64), "python_version": version,
                 "python_gauss": gauss,
                 "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
                 "numpy_gauss": [int(np_state[3]), float(np_state[4])],
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state):
        import numpy as np
        torch = self.torch
        random.setstate((state["python_version"], tuple(int(k) for k in state["python"].tolist()),
                         state["python_gauss"]))
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                             state["numpy_gauss"][0], state["numpy_gauss"][1]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    # -- signals -------------------------------------------------------------------------------

    def install_signal_handlers(self, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        """SIGTERM / SIGUSR1 (from setup on) and SIGINT (once training runs) only set a flag; the loop
        checkpoints at the next step boundary on every rank's agreement and exits 0.

        Saving inside a handler hangs (Lightning#21406), so the handler does no I/O. A second Ctrl-C
        while we are already stopping exits at once (status 130); repeated TERM/USR1 do not.
        """
        import threading
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in signals:
            if sig not in self._old_handlers:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        # A cluster asks more than once: at a time limit or preemption SLURM signals every process of
        # the step *and* the batch shell, whose trap and torchrun forward it again. Repeats of
        # TERM/USR1 are the same request; only a second Ctrl-C means "now" (status 130).
        if signum == signal.SIGINT and self._stop_signal == "SIGINT":
            os._exit(128 + signum)
        self._stop_signal = self._stop_signal or signal.Signals(signum).name

    def restore_signal_handlers(self, only=None):
        """Put back the handlers we replaced (`only` these signals: after training, Ctrl-C goes back to
        Python's, while a late TERM/USR1 still only sets the flag until shutdown())."""
        for sig in [s for s in self._old_handlers if only is None or s in only]:
            signal.signal(sig, self._old_handlers.pop(sig))

    def should_stop(self):
        """True on every rank as soon as any rank has received a stop signal."""
        return self.agree(self._stop_signal is not None)

    @property
    def stop_signal(self):
        return self._stop_signal

    def requeue_slurm_job(self):
        """After a stop by SIGUSR1/SIGTERM in a SLURM job launched by our sbatch templates
        (REQUEUE_ON_SIGNAL=1): `scontrol requeue <job>` (array-aware). Returns what was done."""
        env = os.environ
        if not self.is_main or "SLURM_JOB_ID" not in env or env.get("REQUEUE_ON_SIGNAL") != "1" \
                or self._stop_signal not in ("SIGUSR1", "SIGTERM"):
            return None
        job = slurm_job_id(env)
        try:
            subprocess.run(["scontrol", "requeue", job], check=True, timeout=60,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except FileNotFoundError:
            return f"not requeued: scontrol is not on PATH (requeue job {job} by hand)"
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            out = getattr(e, "stdout", b"") or b""
            return f"requeue of job {job} failed: {out.decode(errors='replace').strip() or e}"
        return f"requeued SLURM job {job}"

    def pause_for_fault_test(self):
        print(f"[rank {self.rank}] paused for a fault test (TRAIN_FAULT_PAUSE_AT_STEP)", flush=True)
        while self._stop_signal is None:     # a launcher's SIGTERM ends the pause (and the process)
            time.sleep(0.05)
        os._exit(128 + signal.Signals[self._stop_signal].value)

    def write_stop_marker(self, text):
        """After a graceful stop, rank 0 writes `text` to $TRAIN_STOP_MARKER when the launcher asked
        for it (slurm/launch.sh does): torchrun exits non-zero after forwarding a signal even when
        every worker stopped cleanly, so the batch script judges by this file instead."""
        path = os.environ.get("TRAIN_STOP_MARKER")
        if not path or not self.is_main:
            return
        with contextlib.suppress(OSError):
            with open(path, "w") as f:
                f.write(text + "\n")

    # -- output ----------------------------------------------------------------------------------

    def print0(self, *args, **kwargs):
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def describe(self):
        acc = self.accelerator
        kind = f"DeepSpeed ZeRO-{self.zero_stage}" if self.deepspeed else (
            "DDP" if self.world_size > 1 else "single process")
        return (f"{kind}, {self.world_size} process(es), device {self.device}, precision {self.precision}, "
                f"launcher {self.launcher}, backend "
                f"{self._backend() if self.world_size > 1 else 'none'} ({acc.distributed_type.name})")

    def _backend(self):
        import torch.distributed as dist
        return dist.get_backend() if dist.is_initialized() else "none"

    def env_info(self):
        """What env.json records: versions, commit, world size, host, devices."""
        torch = self.torch
        info = {
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "accelerate": _version("accelerate"), "deepspeed": _version("deepspeed"),
            "torchvision": _version("torchvision"), "numpy": _version("numpy"),
            "git_commit": git_commit(), "host": socket.gethostname(), "platform": platform.platform(),
            "world_size": self.world_size, "launcher": self.launcher, "device": str(self.device),
            "precision": self.precision, "distributed_type": self.accelerator.distributed_type.name,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [],
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "torch_threads": torch.get_num_threads(), "argv": sys.argv,
        }
        return info

    def shutdown(self, ok=True):
        """Leave the process group cleanly (a barrier first, so no rank tears down mid-collective)."""
        global CURRENT
        CURRENT = None
        self.restore_signal_handlers()
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            global _GROUP_STARTED
            _GROUP_STARTED = True
            if ok:
                with contextlib.suppress(Exception):
                    dist.barrier(group=self._control_group)
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        self._control_group = None


_PEER_SIGNS = ("Timed out waiting", "timed out", "Connection closed by peer", "Connection reset by peer",
               "Broken pipe", "connectFullMesh", "Watchdog caught collective operation timeout")


def peer_failure(err):
    """A sentence for an error that means another process of the job stopped answering (a collective
    timed out after dist.timeout_s, or its connection broke), else None."""
    import torch.distributed as dist
    if CURRENT is None or CURRENT.world_size <= 1 or not dist.is_initialized():
        return None
    backend_errors = tuple(getattr(dist, n) for n in ("DistBackendError", "DistNetworkError") if hasattr(dist, n))
    text = str(err)
    if not (isinstance(err, backend_errors) or isinstance(err, RuntimeError) and any(s in text for s in _PEER_SIGNS)):
        return None
    first = text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__
    return (f"another process of this job stopped answering ({first}); this process waited "
            f"dist.timeout_s={CURRENT.cfg.dist.timeout_s:g} s. Look at the other ranks' output for the cause "
            f"(an error, a hang, a killed process); the last checkpoint is intact.")


def exit_now(code):
    """End a process that ran a process group without the interpreter's final teardown.

    Gloo's worker threads outlive destroy_process_group() while anything refers to the group, and
    a DDP module's C++ reducer keeps it referenced even after the module is freed. In the final
    teardown such a thread can still be freeing the tensors of the last collective; it needs the
    GIL, Python no longer hands it out, and the process aborts with 'terminate called without an
    active exception' (SIGABRT after a successful run: 3 in 24 torchrun launches here with the CPUs
    loaded; gdb shows ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> take_gil in Py_FinalizeEx).
    So, after the run has said everything: run the atexit handlers (wandb, multiprocessing's
    worker clean-up, logging) and the garbage collector while Python is whole, flush, and leave
    with os._exit. Processes that never joined a group return and exit normally.
    """
    if not _GROUP_STARTED:
        return code
    import atexit
    import gc
    gc.collect()                 # DataLoader iterators shut their workers down in __del__
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def setup(cfg, notes=(), broadcast_buffers=True):
    """Build the Runtime: start the process group, pick the device, seed this rank.

    broadcast_buffers=False is for models called several times before backward (a GAN's batch-norm
    discriminator): DDP's buffer broadcast would modify buffers autograd saved (pytorch#22095).
    """
    global CURRENT
    rt = Runtime(cfg, list(notes), broadcast_buffers)
    CURRENT = rt
    rt.seed(cfg.seed)
    rt.install_signal_handlers((signal.SIGTERM, signal.SIGUSR1))   # SIGINT joins when training starts
    if rt.world_size > 1:      # where each rank computes (GPU selection is logged per rank)
        print(f"[rank {rt.rank}/{rt.world_size}] host {socket.gethostname()}, device {rt.device}, "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}", flush=True)
    return rt


def _init_process_group(backend, timeout_s):
    """Start the process group ourselves (Accelerate then adopts it), with the rendezvous keys of
    each torchrun restart under their own prefix.

    torchrun's workers share the agent's TCPStore across restarts (torch/distributed/rendezvous.py:
    "no need to add prefix for each attempt"), so after `--max-restarts` a new attempt can read the
    dead attempt's gloo addresses: we measured 8 failures in 12 restarts (refused connections, hangs),
    12 of 12 successes with a per-attempt prefix (cf. pytorch PR #61590, pytorch#167288).
    """
    import torch.distributed as dist
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return
    rank = int(env["RANK"])
    timeout = datetime.timedelta(seconds=timeout_s)
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world,
                              is_master=not agent_store and rank == 0, timeout=timeout,
                              wait_for_workers=False, multi_tenant=not agent_store)
        store = dist.PrefixStore(f"/train/attempt_{restart_count()}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        global _GROUP_STARTED
        _GROUP_STARTED = True
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"process {rank} of {world} could not join the others at {env['MASTER_ADDR']}:"
                        f"{env['MASTER_PORT']} ({str(e).splitlines()[0][:160]}); check MASTER_ADDR/MASTER_PORT, "
                        f"the network between nodes, and that every process was started.") from None


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def deepspeed_requested(cfg):
    """DeepSpeed asked for by dist.deepspeed (torchrun) or by an accelerate launch DeepSpeed config."""
    return bool(cfg.dist.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def _from_repo(path):
    """A relative path that is not there from the current directory but is in this repository
    (configs/deepspeed/zero2.json, as our accelerate configs name it) means the repository's file."""
    if os.path.isabs(path) or os.path.exists(path) or not os.path.exists(os.path.join(REPO, path)):
        return path
    return os.path.join(REPO, path)


def _resolve_accelerate_deepspeed_file():
    """`accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml` from any directory."""
    key = "ACCELERATE_DEEPSPEED_CONFIG_FILE"
    path = os.environ.get(key)
    if not path or path == "none":
        return
    os.environ[key] = _from_repo(path)
    if not os.path.exists(os.environ[key]):
        raise UserError(f"the accelerate config names the DeepSpeed file {path}, which does not exist (relative "
                        f"paths count from the current directory); give an absolute deepspeed_config_file.")


def _require_deepspeed():
    try:
        import deepspeed  # noqa: F401
        import transformers  # noqa: F401  (Accelerate's DeepSpeed path compares its version)
    except ImportError as e:
        raise UserError(f"DeepSpeed was asked for but {e.name} is not installed; pip install -r "
                        f"requirements-dev.txt (it has deepspeed and transformers).") from None


def check_world_size(launched, seen, kind):
    """Training must see every process the launcher started (Accelerate without cpu=True on a CUDA-less
    machine silently runs N independent single-process jobs; we refuse that)."""
    if launched != seen:
        raise UserError(f"the launcher started {launched} processes but training sees {seen} (distributed type "
                        f"{kind}); check the launch command and that every process can reach MASTER_ADDR.")


def slurm_job_id(env=None):
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def detect_launcher():
    env = os.environ
    if any(k.startswith("ACCELERATE_") for k in env) and "TORCHELASTIC_RUN_ID" in env:
        return "accelerate launch"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "SLURM_PROCID" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        return "srun"
    return "python"


def process_rank():
    """This process's rank from the launcher's variables (before setup; 0 when not distributed)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            if var == "SLURM_PROCID" and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
                continue
            return int(os.environ[var])
    return 0


def restart_count():
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _version(pkg):
    from importlib import metadata
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def git_commit():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def stable_seed(*parts):
    """A 63-bit seed from any tuple of ints/strings (data order = f(seed, epoch), augment = f(..., batch))."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def now():
    return time.perf_counter()
