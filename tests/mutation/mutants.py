"""The mutation catalogue: single-point bugs where this package's correctness lives, and the tests
that must catch each one. Run them with `python tests/mutation/run.py` (see its docstring).

Each mutant replaces `old` (a snippet that occurs exactly once in `file`) by `new`. `tests` are
pytest node ids ("tests/test_x.py::test_y" or "...::test_y[param]", run in the order given) or a
"-k EXPR" entry that narrows the others. `why` is the bug a user would pay for if it slipped in.
"""
from dataclasses import dataclass, field

AREAS = ("sharding and exact eval", "resume position and RNG", "accumulation and no_sync", "precision and scaler",
         "clipping order", "atomic writes and pruning", "EMA", "BN sync", "signal handling", "config validation")


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    file: str
    old: str
    new: str
    tests: list = field(default_factory=list)
    why: str = ""


F, D, E, T = "tests/test_faults.py", "tests/test_datasets.py", "tests/test_distributed.py", "tests/test_train.py"
SIGKILL = F + "::test_sigkill_mid_epoch_then_resume_is_bit_exact"
ACCUM = T + "::test_gradient_accumulation_equals_the_big_batch"
DAMAGED = F + "::test_damaged_or_uncommitted_newest_checkpoint_falls_back_with_a_warning"
CLIP = T + "::test_clipping_sees_unscaled_gradients_under_fp16"
ROUND_TRIP = "tests/test_finetune.py::test_round_trip_frozen_backbone_learns_new_digits[python]"
BAD_VALUES = "tests/test_config.py::test_bad_values_name_the_key"

MUTANTS = [
    # -- sharding and exact eval ------------------------------------------------------------------
    Mutant("shard-ranks-take-the-same-samples", "sharding and exact eval", "lib/datasets.py",
           "    return order[rank::world]", "    return order[::world]",
           [D + "::test_training_shards_are_disjoint_and_cover_the_epoch"],
           "every rank trains on the same shard: N GPUs see 1/N of the data, N times"),
    Mutant("shard-train-keeps-the-tail", "sharding and exact eval", "lib/datasets.py",
           "        order = order[: n - n % world]", "        order = order[: n]",
           [D + "::test_training_shards_are_disjoint_and_cover_the_epoch"],
           "ranks get different batch counts: the last step of an epoch waits forever in DDP's all-reduce"),
    Mutant("shard-order-ignores-epoch", "sharding and exact eval", "lib/datasets.py",
           'stable_seed("order", seed, epoch)', 'stable_seed("order", seed)',
           [D + "::test_training_shards_are_disjoint_and_cover_the_epoch"],
           "the same sample order every epoch (shuffling only once)"),
    Mutant("eval-shards-drop-the-tail", "sharding and exact eval", "lib/datasets.py",
           "    if train:\n        order = order[: n - n % world]",
           "    if train or world > 1:\n        order = order[: n - n % world]",
           [D + "::test_evaluation_shards_count_every_sample_once"],
           "validation under DDP silently skips n % world samples: accuracy depends on the GPU count"),
    Mutant("meter-counts-batches-not-samples", "sharding and exact eval", "lib/engine.py",
           'self.count += float(stats["count"])', "self.count += 1.0",
           [T + "::test_eval_only_evaluates_the_checkpoint_and_writes_nothing"],
           "metrics are sums / number of batches: loss and accuracy scaled by the batch size"),
    Mutant("eval-metrics-not-all-reduced", "sharding and exact eval", "lib/engine.py",
           "        rt.all_reduce_(t)\n        values = dict(", "        values = dict(",
           [E + "::test_evaluation_is_exact_across_process_counts"],
           "each rank reports its own shard's accuracy; rank 0's log is a 1/N sample, not the validation set"),

    # -- resume position and RNG -------------------------------------------------------------------
    Mutant("rng-not-restored", "resume position and RNG", "lib/checkpoint.py",
           "            self.rt.set_rng_state(rng[self.rt.rank])", "            self.rt.seed(self.cfg.seed)",
           [SIGKILL + "[train.py-python]", SIGKILL + "[finetune.py-python]", SIGKILL + "[gan_train.py-python]"],
           "a resumed run re-draws the random numbers of the run's start (noise, dropout): not the run it resumes"),
    Mutant("resume-restarts-the-epoch-at-batch-0", "resume position and RNG", "lib/engine.py",
           "    loader.set_epoch(state.epoch, state.batch)", "    loader.set_epoch(state.epoch)",
           [SIGKILL + "[train.py-python]"],
           "a mid-epoch resume trains the epoch's first batches twice and never sees its last ones"),
    Mutant("resume-drops-the-epoch-running-sums", "resume position and RNG", "lib/engine.py",
           "        meter.load_global_state(state.saved_meter, rt)", "        pass",
           [SIGKILL + "[train.py-python]"],
           "the epoch row after a resume averages only the batches since the resume"),
    Mutant("rank-seeds-identical", "resume position and RNG", "lib/runtime.py",
           "        s = seed + self.rank", "        s = seed",
           [E + "::test_two_processes_with_batch_b_equal_one_process_with_batch_2b"],
           "every rank draws the same random numbers (dropout masks, GAN noise): N GPUs, one noise stream"),
    Mutant("memory-loader-augment-seed-relative-to-resume", "resume position and RNG", "lib/datasets.py",
           "self.augment_seed(b)), self.y.index_select(0, sel)",
           "self.augment_seed(b - start)), self.y.index_select(0, sel)",
           [D + "::test_loader_resumes_mid_epoch_with_the_same_batches"],
           "a resumed epoch augments its batches with the draws of the epoch's first batches"),
    Mutant("file-loader-resume-offset-off-by-one", "resume position and RNG", "lib/datasets.py",
           "iter(lo.indices()[lo.start * lo.batch_size:].tolist())",
           "iter(lo.indices()[max(lo.start - 1, 0) * lo.batch_size:].tolist())",
           [D + "::test_file_loader_resumes_mid_epoch_with_the_same_batches",
            D + "::test_image_folder_memory_and_dataloader_give_the_same_batches"],
           "the DataLoader path resumes one batch early: a batch trained twice, every later batch misaligned"),

    # -- accumulation and no_sync ------------------------------------------------------------------
    Mutant("train-step-always-syncs", "accumulation and no_sync", "train.py",
           "with rt.no_sync(model, skip_sync=not micro.update):", "with rt.no_sync(model, skip_sync=False):",
           [E + "::test_accumulation_micro_steps_do_not_all_reduce"],
           "every accumulation micro-step all-reduces gradients: grad_accum x the network traffic for nothing"),
    Mutant("no-sync-condition-inverted", "accumulation and no_sync", "lib/runtime.py",
           'hasattr(model, "no_sync") and not self.deepspeed:', 'hasattr(model, "no_sync") and self.deepspeed:',
           [E + "::test_accumulation_micro_steps_do_not_all_reduce"],
           "DDP's no_sync is never entered: accumulation all-reduces on every micro-step"),
    Mutant("scheduler-steps-every-micro-batch", "accumulation and no_sync", "train.py",
           "            rt.step(optimizer, skip_if_nonfinite=norm if skip_nonfinite else None)\n"
           "            scheduler.step()",
           "            rt.step(optimizer, skip_if_nonfinite=norm if skip_nonfinite else None)\n"
           "        scheduler.step()",
           [ACCUM],
           "with grad_accum=k the learning-rate schedule runs k times too fast (warmup and decay end early)"),
    Mutant("last-partial-group-scaled-by-grad-accum", "accumulation and no_sync", "lib/engine.py",
           "scale=1.0 / group,", "scale=1.0 / t.grad_accum,",
           [ACCUM],
           "the epoch's last, shorter accumulation group gets a gradient scaled too small"),
    Mutant("zero-grad-every-micro-batch", "accumulation and no_sync", "lib/engine.py",
           "first=state.batch == group_start)", "first=True)",
           [ACCUM],
           "gradients are dropped on every micro-batch: accumulation keeps only the last micro-batch"),
    Mutant("accumulated-loss-not-scaled", "accumulation and no_sync", "train.py",
           "rt.backward(loss * micro.scale if micro.scale != 1 else loss)", "rt.backward(loss)",
           [ACCUM],
           "accumulated gradients are a sum, not a mean: grad_accum=k multiplies the learning rate by k"),

    # -- precision and scaler ----------------------------------------------------------------------
    Mutant("scaler-not-restored", "precision and scaler", "lib/checkpoint.py",
           "        restore_objects(ckpt, objects, self.resume_path)",
           '        restore_objects(ckpt, {k: v for k, v in objects.items() if k != "scaler"}, self.resume_path)',
           [T + "::test_fp16_resume_restores_the_scaler_exactly"],
           "an fp16 run resumes with scale 65536 again: overflow-skipped steps, not the run it resumes"),
    Mutant("autocast-never-enabled", "precision and scaler", "lib/runtime.py",
           "enabled = self.amp_dtype is not None and not self.deepspeed",
           "enabled = self.amp_dtype is not None and self.deepspeed",
           [T + "::test_mixed_precision_on_cpu"],
           "train.precision=fp16/bf16 silently trains in fp32 (no speed-up, the log says otherwise)"),
    Mutant("scaler-update-condition-inverted", "precision and scaler", "lib/runtime.py",
           "            if update_scale:\n                self.scaler.update()",
           "            if not update_scale:\n                self.scaler.update()",
           [T + "::test_mixed_precision_on_cpu"],
           "the fp16 loss scale never adapts (and GradScaler refuses the second step)"),
    Mutant("scaler-enabled-for-the-wrong-precision", "precision and scaler", "lib/runtime.py",
           'enabled=precision == "fp16" and not self.deepspeed', 'enabled=precision == "bf16" and not self.deepspeed',
           [T + "::test_mixed_precision_on_cpu"],
           "fp16 trains without loss scaling: small gradients underflow to zero"),
    Mutant("backward-not-scaled", "precision and scaler", "lib/runtime.py",
           "            self.scaler.scale(loss).backward()", "            loss.backward()",
           [CLIP],
           "fp16 backward without the scale, then unscaled by it: gradients 65536 x too small"),
    Mutant("nonfinite-loss-not-stopped", "precision and scaler", "lib/engine.py",
           "        if step < 2**62:", "        if step < 0:",
           [F + "::test_nonfinite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint"],
           "a NaN loss trains on and overwrites the good checkpoints with NaN weights"),
    Mutant("skip-nonfinite-norm-not-passed", "precision and scaler", "train.py",
           "rt.step(optimizer, skip_if_nonfinite=norm if skip_nonfinite else None)", "rt.step(optimizer)",
           [F + "::test_nonfinite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint"],
           "train.on_nonfinite=skip steps with NaN gradients anyway: the weights become NaN"),

    # -- clipping order ----------------------------------------------------------------------------
    Mutant("clip-before-unscale", "clipping order", "lib/runtime.py",
           "        self.scaler.unscale_(optimizer)\n        return self.torch.nn.utils.clip_grad_norm_(",
           "        return self.torch.nn.utils.clip_grad_norm_(",
           [CLIP],
           "under fp16 the norm is measured on scaled gradients: clipping at 1.0 clips everything to ~0"),
    Mutant("clip-threshold-ignored", "clipping order", "lib/runtime.py",
           "clip_grad_norm_(parameters, max_norm)", 'clip_grad_norm_(parameters, float("inf"))',
           [CLIP],
           "train.clip_grad_norm reports the norm but never clips"),

    # -- atomic writes and pruning -----------------------------------------------------------------
    Mutant("atomic-save-writes-the-final-path", "atomic writes and pruning", "lib/checkpoint.py",
           'tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")\n    try:\n        with open(tmp, "wb") as f:',
           'tmp = path\n    try:\n        with open(tmp, "wb") as f:',
           [F + "::test_atomic_writes_keep_the_old_file_when_a_write_fails"],
           "a save cut short (full disk, kill) leaves a truncated file under the final name, or deletes the old one"),
    Mutant("prune-keeps-one-too-few", "atomic writes and pruning", "lib/checkpoint.py",
           "periodic_files(self.ckpt_dir)[self.cfg.checkpoint.keep_last:]",
           "periodic_files(self.ckpt_dir)[self.cfg.checkpoint.keep_last - 1:]",
           [T + "::test_default_run_leaves_the_documented_run_directory"],
           "checkpoint.keep_last=3 keeps 2: one fallback fewer than promised when the newest is damaged"),
    Mutant("periodic-files-oldest-first", "atomic writes and pruning", "lib/checkpoint.py",
           "key=lambda p: int(p.stem[5:]), reverse=True)", "key=lambda p: int(p.stem[5:]))",
           [DAMAGED],
           "resume picks the oldest checkpoint and pruning deletes the newest ones"),
    Mutant("sha256-not-verified", "atomic writes and pruning", "lib/checkpoint.py",
           "        if sha256_file(path) != expected:", "        if len(expected) != 64:",
           [DAMAGED],
           "a checkpoint with flipped bits loads and resumes silently with corrupted weights"),

    # -- EMA -----------------------------------------------------------------------------------------
    Mutant("gan-ema-never-updated", "EMA", "gan_train.py",
           "            ema.update(rt.unwrap(g))", "            pass",
           ["tests/test_gan.py::test_ema_follows_its_recurrence"],
           "the EMA generator (used for every sample grid and --sample) stays at its initial weights"),
    Mutant("ema-lerp-weight-swapped", "EMA", "lib/ema.py",
           "torch._foreach_lerp_(ema_params, params, 1.0 - decay)", "torch._foreach_lerp_(ema_params, params, decay)",
           ["tests/test_gan.py::test_ema_follows_its_recurrence"],
           "the EMA moves 99.9% toward the current weights each step: no averaging at all"),
    Mutant("ema-no-warmup", "EMA", "lib/ema.py",
           "decay = min(self.decay, (1 + self.updates) / (10 + self.updates))", "decay = self.decay",
           ["tests/test_gan.py::test_ema_follows_its_recurrence"],
           "early random weights linger in the EMA for thousands of steps"),
    Mutant("ema-update-count-not-restored", "EMA", "lib/ema.py",
           '        self.updates = int(state.pop("_ema_updates", 0))', '        state.pop("_ema_updates", 0)',
           [SIGKILL + "[gan_train.py-python]"],
           "after a resume the EMA warms up again from decay 0.1: the resumed run's EMA is not the unbroken one"),

    # -- BN sync -------------------------------------------------------------------------------------
    Mutant("gan-ddp-broadcasts-bn-buffers", "BN sync", "gan_train.py",
           "runtime.prepare_env(cfg), broadcast_buffers=False)", "runtime.prepare_env(cfg), broadcast_buffers=True)",
           ["tests/test_gan.py::test_two_processes_with_a_batch_norm_discriminator"],
           "multi-GPU DCGAN dies: DDP's buffer broadcast modifies batch-norm buffers autograd saved"),
    Mutant("frozen-bn-back-to-train-mode", "BN sync", "lib/finetune.py",
           "    return nn.Module.train(self, False)", "    return nn.Module.train(self, mode)",
           [ROUND_TRIP],
           "model.train() puts frozen batch-norm back in training: the 'frozen' backbone's statistics drift"),
    Mutant("freeze-bn-inverted", "BN sync", "lib/finetune.py",
           "        if f.freeze_bn:", "        if not f.freeze_bn:",
           [ROUND_TRIP],
           "finetune.freeze_bn=true (the default) leaves frozen batch-norm updating its statistics"),

    # -- signal handling ---------------------------------------------------------------------------
    Mutant("signal-handler-sets-no-flag", "signal handling", "lib/runtime.py",
           "self._stop_signal = self._stop_signal or signal.Signals(signum).name",
           "self._stop_signal = self._stop_signal and signal.Signals(signum).name",
           ["tests/test_faults.py::test_stop_signals_set_a_flag_that_every_check_sees"],
           "SIGUSR1/SIGTERM before a SLURM time limit are ignored: no checkpoint, no requeue, work lost"),
    Mutant("ctrl-c-requeues-the-job", "signal handling", "lib/runtime.py",
           'self._stop_signal not in ("SIGUSR1", "SIGTERM")', 'self._stop_signal not in ("SIGUSR1", "SIGTERM", "SIGINT")',
           ["tests/test_cluster.py::test_requeue_calls_scontrol_for_array_jobs"],
           "a user's Ctrl-C requeues the SLURM job it meant to stop"),
    Mutant("requeue-ignores-array-task", "signal handling", "lib/runtime.py",
           'if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):',
           'if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK"):',
           ["tests/test_cluster.py::test_requeue_calls_scontrol_for_array_jobs"],
           "a preempted array task requeues by its own job id, not JOBID_TASK: the wrong job, or none"),

    # -- config validation -------------------------------------------------------------------------
    Mutant("unknown-key-ignored", "config validation", "lib/config.py",
           "            raise UserError(f\"{source}: unknown config key '{dotted}'{hint}; \"",
           "            continue\n            raise UserError(f\"{source}: unknown config key '{dotted}'{hint}; \"",
           [BAD_VALUES],
           "a typo (train.epoch=3) is silently ignored: the run trains with the default instead"),
    Mutant("did-you-mean-too-strict", "config validation", "lib/errors.py",
           "n=1, cutoff=0.6)", "n=1, cutoff=0.9)",
           [BAD_VALUES],
           "error messages stop suggesting the key the user meant"),
    Mutant("user-error-exits-1", "config validation", "lib/cli.py",
           '        _report("error", e)\n        return 2', '        _report("error", e)\n        return 1',
           [F + "::test_fuzz_bad_configs"],
           "config mistakes exit 1 like crashes: schedulers and scripts retry a job that can never work"),
    Mutant("batch-size-zero-accepted", "config validation", "lib/config.py",
           "need(d.batch_size >= 1,", "need(d.batch_size >= 0,",
           [BAD_VALUES],
           "data.batch_size=0 passes validation and fails later with a stack trace"),
    Mutant("grad-accum-zero-accepted", "config validation", "lib/config.py",
           "need(t.grad_accum >= 1,", "need(t.grad_accum >= 0,",
           [F + "::test_fuzz_bad_configs[train.grad_accum=0]"],
           "train.grad_accum=0 passes validation and dies in a ZeroDivisionError after loading data"),
]
