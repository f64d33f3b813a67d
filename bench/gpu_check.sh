#!/usr/bin/env bash
# GPU acceptance run (issue 15): on one H200-class GPU, in under 8 minutes, without network, prints a
# table of PASS / FAIL / SKIP rows and writes it to a results file (BENCHMARKS.md quotes it).
#
#   bash bench/gpu_check.sh                          # on the GPU machine -> bench/gpu_check_results.md
#   bash bench/gpu_check.sh --out results.md         # another results file
#   bash bench/gpu_check.sh --cpu-smoke --out r.md   # tiny sizes on the CPU (tests/test_cluster.py runs it);
#                                                    # CUDA-only rows are SKIP with the reason
#
# Rows: fp16 (GradScaler) and bf16 training of fashion_cnn and resnet18 with the loss falling; DeepSpeed
# ZeRO-2 bf16; train.deterministic twice -> identical weights; kill -9 at step k then resume == the
# unbroken run; channels_last and compile on and off; fashion_cnn@28 epoch time on 60,000 images (memory
# path); resnet18@32 bf16 images/s against a bare bf16 loop; the JPEG loader (224 crops of 500x375
# photos) with the JPEGs decoded batched on the GPU (nvJPEG) vs in 8 workers vs torchvision's reference,
# and nvJPEG's pixels against the CPU decode; with >= 2 GPUs, 2-GPU NCCL DDP == 1 GPU with the doubled batch. Exit status: 0 when no row failed, 1 otherwise.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$REPO/bench/gpu_check_results.md
SMOKE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) SMOKE=1 ;;
        --out) OUT=$2; shift ;;
        --out=*) OUT=${1#--out=} ;;
        *) echo "usage: bash bench/gpu_check.sh [--cpu-smoke] [--out FILE]" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled NO_ALBUMENTATIONS_UPDATE=1   # no network
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
ROWS=()
FAILED=0

if [ "$SMOKE" = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
    NGPU=0
else
    NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    if [ "$NGPU" -lt 1 ]; then
        echo "gpu_check: no CUDA GPU is visible; run on the GPU machine, or use --cpu-smoke." >&2
        exit 2
    fi
fi

row() {   # row CHECK STATUS DETAIL
    ROWS+=("| $1 | $2 | $3 |")
    [ "$2" = FAIL ] && FAILED=1
    printf '%-44s %-5s %s\n' "$1" "$2" "$3"
}

train() {   # train DIR NAME OVERRIDES... -> runs train.py in DIR, its log in DIR/NAME.log
    local dir=$1 name=$2
    shift 2
    mkdir -p "$dir"
    (cd "$dir" && timeout 600 "$PY" "$REPO/train.py" "name=$name" log.plots=false log.progress=false \
        train.log_every=1 "$@" > "$name.log" 2>&1)
}

falling() {   # falling RUN_DIR -> "first -> last" of train/loss; fails unless the loss fell and is finite
    "$PY" - "$1/metrics.jsonl" <<'EOF'
import json, math, sys
losses = [json.loads(line)["train/loss"] for line in open(sys.argv[1])]
first, last = sum(losses[:3]) / len(losses[:3]), sum(losses[-3:]) / len(losses[-3:])
print(f"loss {first:.3f} -> {last:.3f} over {len(losses)} steps")
sys.exit(0 if math.isfinite(last) and last < first else 1)
EOF
}

same_weights() {   # same_weights A.pt B.pt -> exit 0 when every model tensor is bit-identical
    "$PY" - "$1" "$2" <<'EOF'
import sys, torch
a, b = (torch.load(p, map_location="cpu", weights_only=False)["model"] for p in sys.argv[1:3])
diff = [k for k in a if not torch.equal(a[k], b[k])]
print(f"{len(a) - len(diff)}/{len(a)} tensors identical" + (f", first differing: {diff[0]}" if diff else ""))
sys.exit(1 if diff else 0)
EOF
}

check_train() {   # check_train LABEL OVERRIDES...
    local label=$1 dir
    shift
    dir=$WORK/$(echo "$label" | tr -c 'a-zA-Z0-9' _)
    if train "$dir" run output_dir=runs "$@" && detail=$(falling "$dir/runs/run"); then
        row "$label" PASS "$detail"
    else
        row "$label" FAIL "$(tail -n 3 "$dir/run.log" 2>/dev/null | tr '\n|' ' /')"
    fi
}

if [ "$SMOKE" = 1 ]; then
    BASE=(model.name=mlp "model.hidden=[64]" sched.name=none optim.name=sgd optim.lr=0.1 optim.momentum=0.9
          train.epochs=1 train.max_steps=8 data.batch_size=64)
    STEPS=8
else
    BASE=(model.name=fashion_cnn data.name=digits data.image_size=28 sched.name=none train.epochs=1
          train.max_steps=60 data.batch_size=128)
    STEPS=60
fi
HAVE_DET=0
grep -qE '^ +deterministic:' "$REPO/lib/config/schema.py" && HAVE_DET=1    # train.deterministic (issue 15 item 2)

# -- training at fp16 / bf16 -------------------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
    row "fp16 GradScaler fashion_cnn, resnet18" SKIP "CUDA only (fp16 autocast + GradScaler)"
    check_train "bf16 mlp (CPU autocast)" "${BASE[@]}" train.precision=bf16
else
    for model in fashion_cnn resnet18; do
        extra=()
        [ "$model" = resnet18 ] && extra=(model.name=torchvision:resnet18 model.cifar_stem=true data.image_size=32
                                          data.channels=3)
        for precision in fp16 bf16; do
            check_train "$precision $model" "${BASE[@]}" "${extra[@]}" "train.precision=$precision"
        done
    done
fi

# -- DeepSpeed ZeRO-2 bf16 ---------------------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
    row "DeepSpeed ZeRO-2 bf16" SKIP "CPU form: tests/test_cluster.py::test_deepspeed_bf16_zero2_* (2 procs)"
else
    dir=$WORK/deepspeed     # DeepSpeed needs a launcher: torchrun with one process
    mkdir -p "$dir"
    if (cd "$dir" && timeout 600 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$REPO/train.py" \
            name=run output_dir=runs log.plots=false log.progress=false train.log_every=1 "${BASE[@]}" \
            train.precision=bf16 "dist.deepspeed=$REPO/configs/deepspeed/zero2.json" > run.log 2>&1) &&
       detail=$(falling "$dir/runs/run"); then
        row "DeepSpeed ZeRO-2 bf16 (torchrun, 1 GPU)" PASS "$detail"
    else
        row "DeepSpeed ZeRO-2 bf16 (torchrun, 1 GPU)" FAIL "$(tail -n 3 "$dir/run.log" | tr '\n|' ' /')"
    fi
fi

# -- determinism, and kill -9 / resume ---------------------------------------------------------------
DET=()
[ "$HAVE_DET" = 1 ] && DET=(train.deterministic=true)
KEEP=("${BASE[@]}" "${DET[@]}" checkpoint.every_steps=4 output_dir=runs)
if [ "$HAVE_DET" = 1 ]; then
    train "$WORK/det1" run "${KEEP[@]}" & p1=$!
    train "$WORK/det2" run "${KEEP[@]}" & p2=$!
    ok=1
    wait "$p1" || ok=0
    wait "$p2" || ok=0
    if [ "$ok" = 1 ] && detail=$(same_weights "$WORK/det1/runs/run/checkpoints/last.pt" \
                                               "$WORK/det2/runs/run/checkpoints/last.pt"); then
        row "train.deterministic twice: same weights" PASS "$detail"
    else
        row "train.deterministic twice: same weights" FAIL "${detail:-a run failed: see its log}"
    fi
else
    train "$WORK/det1" run "${KEEP[@]}" || true
    row "train.deterministic twice: same weights" SKIP "train.deterministic is not in this tree's schema"
fi
k=$((STEPS * 3 / 4))
mkdir -p "$WORK/cut"
# exec python itself (no `timeout` in between): the kill -9 below must hit the training process, not
# a wrapper that would leave it behind, paused forever. The wait loop bounds the time instead.
(cd "$WORK/cut" && TRAIN_FAULT_PAUSE_AT_STEP=$k exec "$PY" "$REPO/train.py" name=run log.plots=false \
    log.progress=false train.log_every=1 "${KEEP[@]}" > cut.log 2>&1) & cut=$!
for _ in $(seq 1200); do      # wait (at most 10 min) until step k is logged, then kill -9
    if [ -f "$WORK/cut/runs/run/metrics.jsonl" ] &&
       "$PY" -c "import json,sys; sys.exit(json.loads(open(sys.argv[1]).readlines()[-1])['step'] < $k)" \
           "$WORK/cut/runs/run/metrics.jsonl" 2>/dev/null; then
        break
    fi
    kill -0 "$cut" 2>/dev/null || break
    sleep 0.5
done
kill -9 "$cut" 2>/dev/null || true
wait "$cut" 2>/dev/null || true
if train "$WORK/cut" resume "${KEEP[@]}" name=run && grep -q "resumed from" "$WORK/cut/resume.log" &&
   detail=$(same_weights "$WORK/det1/runs/run/checkpoints/last.pt" "$WORK/cut/runs/run/checkpoints/last.pt"); then
    row "kill -9 at step $k, resume == unbroken" PASS "$detail"
else
    row "kill -9 at step $k, resume == unbroken" FAIL "${detail:-$(tail -n 2 "$WORK/cut/resume.log" | tr '\n|' ' /')}"
fi

# -- channels_last and compile -----------------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
    row "channels_last / compile on and off" SKIP "needs a conv model and a compiler: too slow for the smoke"
else
    for cl in false true; do
        for comp in false true; do
            check_train "channels_last=$cl compile=$comp (bf16)" "${BASE[@]}" train.precision=bf16 \
                "train.channels_last=$cl" "train.compile=$comp"
        done
    done
fi

# -- throughput ----------------------------------------------------------------------------------------
bench() {   # bench LABEL ARGS... -> one JSON line from bench/throughput.py, summarised
    local label=$1 json
    shift
    if json=$(timeout 600 "$PY" "$REPO/bench/throughput.py" --json "$@" 2> "$WORK/bench.err" | tail -n 1) &&
       detail=$("$PY" -c "import json,sys; r=json.loads(sys.argv[1]); print(', '.join(
           f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in r.items()
           if not isinstance(v, (list, dict))))" "$json"); then
        row "$label" PASS "$detail"
    else
        row "$label" FAIL "$(tail -n 2 "$WORK/bench.err" | tr '\n|' ' /')"
    fi
}
if [ "$SMOKE" = 1 ]; then
    row "fashion_cnn@28 epoch on 60,000 images" SKIP "GPU figure (60,000 images on this CPU take minutes)"
    bench "linear step: ours vs bare loop (CPU)" --model linear --batch 64 --steps 2 --rounds 2
else
    bench "fashion_cnn@28 epoch on 60,000 images" --end-to-end --model fashion_cnn --device cuda --precision bf16
    bench "resnet18@32 bf16 images/s: ours vs bare" --model resnet18 --image-size 32 --channels 3 --batch 256 \
        --device cuda --precision bf16 --channels-last --rounds 5
fi

# -- the JPEG data path with the GPU decoding (issue 17) ---------------------------------------------------
jpeg_row() {   # jpeg_row LABEL ARGS... -> bench/jpeg_loader.py --device cuda --json ARGS, summarised
    local label=$1 json
    shift
    if json=$(timeout 600 "$PY" "$REPO/bench/jpeg_loader.py" --device cuda --workers 8 --images 2048 \
                  --skip-decoders --json "$@" 2> "$WORK/jpeg.err" | tail -n 1) &&
       detail=$("$PY" - "$json" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
d = r["gpu_decode_vs_cpu"]
rates = [f"{path} {name.split(' (')[-1].rstrip(')')} {v['img_s']} img/s x{v['ratio']}"
         for path, rows in r["data_path"].items() for name, v in rows.items()]
print("; ".join(rates) + f"; nvJPEG vs CPU decode: mean |d| {d['mean_abs']}, max {d['max_abs']}, "
      f"{d['fallback']} fallbacks")
sys.exit(0 if d["mean_abs"] < 2 and d["fallback"] == 0 else 1)
EOF
       ); then
        row "$label" PASS "$detail"
    else
        row "$label" FAIL "${detail:-$(tail -n 2 "$WORK/jpeg.err" | tr '\n|' ' /')}"
    fi
}
if [ "$SMOKE" = 1 ]; then
    row "JPEG loader: nvJPEG batched vs workers" SKIP \
        "CUDA only (CPU form: tests/test_augment.py::test_decoding_on_the_device_gives_the_workers_batches)"
else
    jpeg_row "JPEG loader: nvJPEG batched vs workers" --rounds 3
    jpeg_row "JPEG loader + resnet50 bf16 step" --rounds 2 --step resnet50
fi

# -- 2-GPU DDP == 1 GPU with the doubled batch ---------------------------------------------------------
if [ "$NGPU" -ge 2 ]; then
    DDP=(model.name=fashion_cnn data.name=digits data.image_size=28 data.shuffle=false sched.name=none
         optim.name=sgd train.epochs=1 train.max_steps=20 output_dir=runs "${DET[@]}")
    mkdir -p "$WORK/ddp"
    if train "$WORK/one" run "${DDP[@]}" data.batch_size=128 &&
       (cd "$WORK/ddp" && CUDA_VISIBLE_DEVICES=0,1 timeout 600 "$PY" -m torch.distributed.run --standalone \
           --nproc_per_node=2 "$REPO/train.py" name=run log.plots=false "${DDP[@]}" data.batch_size=64 \
           > run.log 2>&1) &&
       detail=$("$PY" - "$WORK/one/runs/run/checkpoints/last.pt" "$WORK/ddp/runs/run/checkpoints/last.pt" <<'EOF'
import sys, torch
a, b = (torch.load(p, map_location="cpu", weights_only=False)["model"] for p in sys.argv[1:3])
worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
print(f"max |w_2gpu - w_1gpu| = {worst:.2e}")
sys.exit(0 if worst < 1e-4 else 1)
EOF
       ); then
        row "2-GPU NCCL DDP == 1 GPU, doubled batch" PASS "$detail"
    else
        row "2-GPU NCCL DDP == 1 GPU, doubled batch" FAIL "${detail:-a run failed: see its log}"
    fi
else
    row "2-GPU NCCL DDP == 1 GPU, doubled batch" SKIP "needs >= 2 GPUs (CPU form: tests/test_distributed.py)"
fi

# -- the table -----------------------------------------------------------------------------------------
{
    echo "# bench/gpu_check.sh $([ "$SMOKE" = 1 ] && echo "--cpu-smoke")"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), $("$PY" -c "import torch; print('torch', torch.__version__, \
'on', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')"), $((SECONDS - START)) s"
    echo
    echo "| check | result | detail |"
    echo "|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
} > "$OUT"
echo
cat "$OUT"
echo "results written to $OUT"
exit "$FAILED"
