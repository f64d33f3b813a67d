"""Throughput of train.py's real step against a bare hand-written loop, in one process, alternating.

    python bench/throughput.py --model lenet --image-size 28 --batch 256          # step: ours vs bare
    python bench/throughput.py --model resnet18 --image-size 32 --batch 128 --channels 3
    python bench/throughput.py --model lenet --set data.train_crop=28 --set data.auto_augment=trivialaugment
    python bench/throughput.py --loader                                           # loader alone vs seed-style
    python bench/throughput.py --end-to-end --model lenet                         # 60,000 FashionMNIST-format images
    python bench/throughput.py --ddp --model fashion_cnn                          # 2-process DDP vs 1 process
    python bench/throughput.py --device cuda --precision bf16 --channels-last --compile --model resnet18 ...

"Ours" is the real path of train.py: the config and runtime, the memory loader (uint8 on the device,
sliced, converted and normalized per batch), lib.steps.make_train_step, and engine.train_one_epoch with
its meters, non-finite guard and logger. "Bare" is the loop one writes by hand: float tensors already
normalized on the device, forward, cross-entropy, zero_grad, backward, step. Both use the same model
(same init), batch and data; blocks of steps alternate so that drift hits both. Images/s are medians.
"""
import argparse
import copy
import gzip
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLOCK = time.perf_counter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {"lenet": "lenet", "fashion_cnn": "fashion_cnn", "mlp": "mlp", "alexnet": "alexnet",
          "convnet": "convnet", "resnet18": "torchvision:resnet18", "linear": "mlp"}


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet", choices=sorted(MODELS))
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per timed block (default: ~0.5 s)")
    p.add_argument("--rounds", type=int, default=15, help="alternating blocks of each loop")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for ours only (repeatable), e.g. data.auto_augment=trivialaugment: "
                        "the step's cost with that option on, against the same bare loop")
    p.add_argument("--loader", action="store_true", help="time the data path alone vs the seed-style pipeline")
    p.add_argument("--end-to-end", action="store_true", help="whole epochs on 60,000 FashionMNIST-format images")
    p.add_argument("--ddp", action="store_true", help="2-process DDP (torchrun, gloo) vs this process")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data-root", default=None,
                   help="FashionMNIST files for --end-to-end (default: written to a temp dir)")
    p.add_argument("--json", action="store_true", help="print one JSON line (for scripts)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: this process's CPU time (steadier on a shared VM; CPU only)")
    return p.parse_args()


# ---------------------------------------------------------------------------------------------
# Setting up "ours" through the real config, runtime, data and step
# ---------------------------------------------------------------------------------------------

class Ours:
    def __init__(self, args, data_overrides, tmp):
        import torch
        from lib import checkpoint, config, engine, losses, models, optim, runlog, runtime
        from lib.data import build_data
        from lib.steps import make_train_step
        self.torch, self.engine = torch, engine
        overrides = [f"model.name={MODELS[args.model]}", f"data.image_size={args.image_size}",
                     f"data.batch_size={args.batch}", f"train.precision={args.precision}",
                     f"train.channels_last={str(args.channels_last).lower()}",
                     f"train.compile={str(args.compile).lower()}", "sched.name=none", "log.progress=false",
                     "log.plots=false", f"output_dir={tmp}", "name=bench", "checkpoint.every_epochs=0",
                     "train.log_every=1000000", "train.epochs=1000000", *data_overrides]
        if args.model == "resnet18":
            overrides.append("model.cifar_stem=true")
        if args.model == "linear":                      # ~no compute: the step's fixed overhead shows
            overrides.append("model.hidden=[]")
        cfg = config.load(config.Config, None, overrides)
        if args.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        self.rt = rt = runtime.setup(cfg, runtime.prepare_env(cfg))
        self.cfg = cfg
        self.data = build_data(cfg, rt)
        self.inputs = self.data.model_inputs(cfg.model)
        raw = models.build_model(cfg.model, **self.inputs, seed=cfg.seed)
        self.fresh = copy.deepcopy(raw)                          # the bare loop starts from the same weights
        self.loss_fn = losses.build_loss(cfg.loss, "classification").to(rt.device)
        optimizer = optim.build_optimizer(cfg.optim, raw)
        scheduler = optim.build_scheduler(cfg.sched, optimizer, steps_per_epoch=len(self.data.train),
                                          total_steps=10**9)
        self.model, self.optimizer = rt.prepare(raw, optimizer, compile=cfg.train.compile,
                                                channels_last=cfg.train.channels_last)
        self.step_fn = make_train_step(self.model, self.loss_fn, self.optimizer, scheduler, rt, cfg.train,
                                       "classification")
        self.state = engine.LoopState()
        self.run = checkpoint.Run(cfg, rt)
        self.log = runlog.RunLogger(Path(tmp), cfg, rt, self.state, lr_fn=lambda: optimizer.param_groups[0]["lr"])
        self.guard = engine.NonFiniteGuard(rt, "stop")
        self.objects = {}

    def block(self, steps):
        """`steps` optimizer steps through engine.train_one_epoch; returns images/s."""
        cfg, torch = self.cfg, self.torch
        cfg.train.max_steps = self.state.step + steps
        images = 0
        t = CLOCK()
        while self.state.step < cfg.train.max_steps:
            start = self.state.step
            self.engine.train_one_epoch(self.state, self.data.train, self.step_fn, self.rt, self.log, self.run,
                                        self.objects, cfg, self.guard)
            images += (self.state.step - start) * cfg.data.batch_size * self.rt.world_size
        self.guard.check("bench")                                # one host sync, as at a log step
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()
        return images / (CLOCK() - t)


class Bare:
    """The hand-written loop: normalized float data already on the device."""

    def __init__(self, ours, args):
        import torch
        import torch.nn.functional as F
        self.torch, self.F, self.args = torch, F, args
        device = ours.rt.device
        split = ours.data.spec.train
        t = ours.data.transform
        with torch.no_grad():
            self.x = torch.cat([t(split.x[i:i + 4096].to(device)) for i in range(0, len(split), 4096)])
        self.y = split.y.to(device)
        self.model = ours.fresh.to(device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.opt = type(ours.optimizer)(self.model.parameters(), lr=ours.cfg.optim.lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        self.dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
        self.device = device
        if args.compile:
            self.model = torch.compile(self.model)
        self.i = 0

    def block(self, steps):
        torch, F, b = self.torch, self.F, self.args.batch
        n = len(self.y)
        t = CLOCK()
        for _ in range(steps):
            if (self.i + 1) * b > n:
                self.i = 0
            sl = slice(self.i * b, (self.i + 1) * b)
            self.i += 1
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                loss = F.cross_entropy(self.model(self.x[sl]), self.y[sl])
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return steps * b / (CLOCK() - t)


def alternate(loops, args, rt=None):
    """Warm up each loop, then time `rounds` alternating blocks of ~0.5 s; medians of images/s.
    Blocks that run back to back see the same machine, so the ratio is taken per round (this VM's
    speed drifts by tens of percent between rounds; the per-round ratio does not). Under DDP every
    rank must run the same number of steps: the block length is agreed on (rt)."""
    rate = max(loop.block(3) for loop in loops.values())        # warm-up, and a speed estimate
    steps = args.steps or max(1, round(0.5 * rate / args.batch))
    if rt is not None:                                          # all_reduce_ is a no-op in one process
        import torch
        agreed = torch.tensor([steps], device=rt.device)
        rt.all_reduce_(agreed, op="max")
        steps = int(agreed.item())
    results = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, loop in loops.items():
            results[name].append(loop.block(steps))
    alternate.steps = steps
    alternate.rounds = {name: [round(v) for v in values] for name, values in results.items()}
    return {name: statistics.median(v) for name, v in results.items()}


# ---------------------------------------------------------------------------------------------
# Data for the benchmarks
# ---------------------------------------------------------------------------------------------

def write_fashion_like(root, n_train=60000, n_val=10000):
    """FashionMNIST-format gzip IDX files of n 28x28 images (digits upscaled, noised): learnable."""
    import numpy as np
    from lib.data.sources import sklearn_digits
    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    table = sklearn_digits()
    rng = np.random.default_rng(0)
    for stem, n in (("train", n_train), ("t10k", n_val)):
        idx = rng.integers(0, len(table), n)
        img = np.kron((table[idx, :64] * (255 / 16)).reshape(-1, 8, 8), np.ones((4, 4)))[:, 2:30, 2:30]
        img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
        for kind, arr in (("images-idx3", img), ("labels-idx1", table[idx, 64].astype(np.uint8))):
            header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            with gzip.open(raw / f"{stem}-{kind}-ubyte.gz", "wb", compresslevel=1) as f:
                f.write(header + arr.tobytes())
    return Path(root)


class SeedStyle:
    """The seed's pipeline: per-sample ToPILImage -> Resize -> ToTensor in a DataLoader with
    worker processes (persistent, started before timing), feeding the bare step."""

    def __init__(self, x_uint8, y, size, batch, workers=2):
        import torch
        import torchvision.transforms as T

        class Items(torch.utils.data.Dataset):
            def __init__(self):
                self.t = T.Compose([T.ToPILImage(), T.Resize(size), T.ToTensor()])

            def __len__(self):
                return len(y)

            def __getitem__(self, i):
                return self.t(x_uint8[i]), int(y[i])

        self.loader = torch.utils.data.DataLoader(Items(), batch_size=batch, shuffle=True, num_workers=workers,
                                                  persistent_workers=workers > 0, drop_last=True)


def time_loader(batches, n):
    t = time.perf_counter()
    count = 0
    for i, (x, y) in enumerate(batches):
        count += len(y)
        if count >= n:
            break
    return count / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------

def step_mode(args, tmp):
    data = ["data.name=synthetic", f"data.channels={args.channels}", "data.num_samples=10000", *args.set]
    ours = Ours(args, data, tmp)
    bare = Bare(ours, args)
    r = alternate({"ours": ours, "bare": bare}, args)
    pairs = [o / b for o, b in zip(alternate.rounds["ours"], alternate.rounds["bare"])]
    overhead_us = (args.batch / r["ours"] - args.batch / r["bare"]) * 1e6
    return {"mode": "step", **vars_of(args), "ours_img_s": round(r["ours"]), "bare_img_s": round(r["bare"]),
            "ours_step_ms": round(1e3 * args.batch / r["ours"], 3),
            "bare_step_ms": round(1e3 * args.batch / r["bare"], 3),
            "overhead_us_per_step": round(overhead_us),
            "ratio": round(statistics.median(pairs), 3), "ratio_of_medians": round(r["ours"] / r["bare"], 3),
            "ratio_quartiles": [round(q, 3) for q in statistics.quantiles(pairs, n=4)],
            "steps_per_block": alternate.steps, "rounds": len(pairs), "device": str(ours.rt.device)}


def loader_mode(args, tmp):
    """The data path alone: 60,000 FashionMNIST-format images at 28x28 (gzip IDX files, decoded once
    like train.py does), or synthetic images of another size / channel count."""
    import torch
    if args.image_size == 28 and args.channels == 1:
        root = Path(args.data_root) if args.data_root else write_fashion_like(Path(tmp) / "data")
        data = ["data.name=fashion_mnist", f"data.root={root}", "data.download=false", "data.cache=false"]
    else:
        data = ["data.name=synthetic", f"data.channels={args.channels}", "data.num_samples=20000"]
    ours = Ours(args, data, tmp)
    split = ours.data.spec.train
    x_np = split.x.permute(0, 2, 3, 1).numpy()[..., 0] if args.channels == 1 else split.x.permute(0, 2, 3, 1).numpy()
    seed = SeedStyle(x_np, split.y.numpy(), args.image_size, args.batch)
    n = len(split)
    loader = ours.data.train

    def ours_epoch():
        loader.set_epoch(1)
        t = time.perf_counter()
        for x, y in loader:
            pass
        if ours.rt.device.type == "cuda":
            torch.cuda.synchronize()
        return n // args.batch * args.batch / (time.perf_counter() - t)

    ours_epoch()
    ours_rate = statistics.median(ours_epoch() for _ in range(5))
    time_loader(iter(seed.loader), 2 * args.batch)            # start the workers
    seed_rate = time_loader(iter(seed.loader), n - args.batch)
    return {"mode": "loader", **vars_of(args), "images": n, "data": ours.cfg.data.name,
            "ours_img_s": round(ours_rate), "seed_img_s": round(seed_rate), "ratio": round(ours_rate / seed_rate, 1)}


def end_to_end_mode(args, tmp):
    """Whole epochs over 60,000 FashionMNIST-format images: ours vs the seed pipeline vs bare."""
    import torch.nn.functional as F
    root = Path(args.data_root) if args.data_root else write_fashion_like(Path(tmp) / "data")
    t0 = time.perf_counter()
    ours = Ours(args, ["data.name=fashion_mnist", f"data.root={root}", "data.download=false",
                       "data.cache=false"], tmp)
    startup = time.perf_counter() - t0
    n_steps = len(ours.data.train)
    bare = Bare(ours, args)
    # One epoch of each, in alternating blocks of ~0.5 s so that the machine's drift hits both.
    rate = max(loop.block(3) for loop in (ours, bare))
    per_block = max(1, round(0.5 * rate / args.batch))
    args.steps, args.rounds = per_block, max(3, math.ceil(n_steps / per_block))
    alternate({"ours": ours, "bare": bare}, args)
    pairs = [o / b for o, b in zip(alternate.rounds["ours"], alternate.rounds["bare"])]
    epoch = {name: args.batch * args.steps * len(v) / sum(args.batch * args.steps / r for r in v)
             for name, v in alternate.rounds.items()}
    split = ours.data.spec.train
    seed = SeedStyle(split.x[:, 0].numpy(), split.y.numpy(), args.image_size, args.batch)
    model, opt = bare.model, bare.opt
    it = iter(seed.loader)
    for _ in range(3):
        x, y = next(it)
    t = time.perf_counter()
    count = 0
    for x, y in it:
        loss = F.cross_entropy(model(x.to(bare.device)), y.to(bare.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        count += len(y)
    epoch["seed"] = count / (time.perf_counter() - t)
    return {"mode": "end-to-end", **vars_of(args), "images": len(split), "startup_s": round(startup, 2),
            "ours_img_s": round(epoch["ours"]), "bare_img_s": round(epoch["bare"]),
            "seed_img_s": round(epoch["seed"]), "ours_vs_seed": round(epoch["ours"] / epoch["seed"], 2),
            "ours_vs_bare": round(epoch["ours"] / epoch["bare"], 3),
            "ours_vs_bare_median_of_rounds": round(statistics.median(pairs), 3), "blocks": len(pairs)}


def ddp_mode(args, tmp, repeats=3):
    """This process alone (torch's threads) and 2 processes under torchrun (1 thread each, gloo),
    measured in turn `repeats` times; the ratio is the median of the pairs."""
    single = Ours(args, ["data.name=synthetic", f"data.channels={args.channels}", "data.num_samples=10000"], tmp)
    args.rounds = max(3, args.rounds // repeats)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--ddp-worker", "--json", "--rounds", str(args.rounds),
           *[a for a in sys.argv[1:] if a not in ("--ddp", "--json")]]
    ones, twos = [], []
    for _ in range(repeats):
        ones.append(alternate({"ours": single}, args)["ours"])
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        line = [s for s in out.stdout.splitlines() if s.startswith("{")]
        if out.returncode != 0 or not line:
            raise SystemExit(f"torchrun failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        twos.append(json.loads(line[-1])["ours_img_s"])
    single.rt.shutdown()
    import torch
    ratios = [t / o for o, t in zip(ones, twos)]
    return {"mode": "ddp", **vars_of(args), "one_process_img_s": [round(v) for v in ones],
            "threads": torch.get_num_threads(), "two_process_global_img_s": [round(v) for v in twos],
            "ratio": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios]}


def ddp_worker(args, tmp):
    ours = Ours(args, ["data.name=synthetic", f"data.channels={args.channels}", "data.num_samples=10000"], tmp)
    rate = alternate({"ours": ours}, args, rt=ours.rt)["ours"]   # images/s of all ranks together
    result = {"ours_img_s": round(rate), "world": ours.rt.world_size}
    ours.rt.shutdown()
    return result if ours.rt.is_main else None


def vars_of(args):
    return {"model": args.model, "image_size": args.image_size, "batch": args.batch, "clock": args.clock,
            "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
            **({"set": args.set} if args.set else {})}


def main():
    global CLOCK
    args = parse()
    if args.clock == "cpu":
        CLOCK = time.process_time
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.ddp_worker:
            result = ddp_worker(args, tmp)
        elif args.ddp:
            result = ddp_mode(args, tmp)
        elif args.loader:
            result = loader_mode(args, tmp)
        elif args.end_to_end:
            result = end_to_end_mode(args, tmp)
        else:
            result = step_mode(args, tmp)
    if result is not None:
        result["torch"] = torch.__version__
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            width = max(map(len, result))
            for k, v in result.items():
                print(f"{k:>{width}}  {v}")
    from lib import runtime
    runtime.exit_now(0)      # after a process group (--ddp workers): no teardown racing gloo's threads


if __name__ == "__main__":
    main()
