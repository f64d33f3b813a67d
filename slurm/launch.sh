# shellcheck shell=bash
# Shared body of slurm/train.sh, gan.sh and finetune.sh (sourced by them; not submitted itself).
#
# One `torchrun` agent per node (srun --ntasks-per-node=1), each starting GPUS_PER_NODE workers that
# meet through torchrun's c10d rendezvous on the first node of the allocation. The batch shell
# forwards SIGUSR1/SIGTERM (from `#SBATCH --signal=B:USR1@120` or scancel) to srun, srun to the
# agents, the agents to the workers (--signals-to-handle); the workers checkpoint at the next step
# boundary, exit 0, and rank 0 runs `scontrol requeue` so the job resumes from that checkpoint.
#
# torchrun itself exits non-zero after forwarding a signal, even when every worker stopped cleanly;
# rank 0 then leaves a marker file ($TRAIN_STOP_MARKER) and this script exits 0 on its word.
#
# Environment (all optional): CONFIG (YAML config), OVERRIDES (extra key=value overrides),
# NODES (default: the allocation's), GPUS_PER_NODE (default: the allocation's, else 1),
# PYTHON (default: python3), REQUEUE_ON_SIGNAL (default 1), STOP_GRACE_S (seconds torchrun gives
# the workers to checkpoint after a signal before SIGKILL; default 110, inside --signal's 120).
set -euo pipefail

: "${SCRIPT:?set SCRIPT (train.py, gan_train.py or finetune.py) before sourcing slurm/launch.sh}"
: "${CONFIG:?set CONFIG}"
cd "${SLURM_SUBMIT_DIR:-$PWD}"

NODES=${NODES:-${SLURM_JOB_NUM_NODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}              # "a100:4" -> "4"
PYTHON=${PYTHON:-python3}
OVERRIDES=${OVERRIDES:-}
# The first host of the allocation. Read every name, then cut: `| head -n 1` closes the pipe early,
# scontrol dies of SIGPIPE on a long host list and pipefail ends the job with status 141.
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${HOSTS%%$'\n'*}
PORT=$((15000 + ${SLURM_JOB_ID:-0} % 5000))     # derived from the job id: concurrent jobs do not collide
export REQUEUE_ON_SIGNAL=${REQUEUE_ON_SIGNAL:-1}
# The CPUs of one task (one node's torchrun) are shared by its GPUS_PER_NODE workers.
CPUS=${SLURM_CPUS_PER_TASK:-$((8 * GPUS_PER_NODE))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((CPUS / GPUS_PER_NODE > 0 ? CPUS / GPUS_PER_NODE : 1))}
STOP_GRACE_S=${STOP_GRACE_S:-110}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$STOP_GRACE_S      # torchrun's SIGKILL comes 30 s after a signal otherwise
export TRAIN_STOP_MARKER="$PWD/.train-stopped-${SLURM_JOB_ID:-0}"
rm -f "$TRAIN_STOP_MARKER"

# torchrun forwards only TERM/INT/HUP/QUIT by default; add USR1 where it can (torch >= 2.6), and
# give the workers STOP_GRACE_S to checkpoint where the option exists.
TORCHRUN_HELP=$("$PYTHON" -m torch.distributed.run --help 2>/dev/null || true)
TORCHRUN_OPTS=()
if grep -q -- "--signals-to-handle" <<<"$TORCHRUN_HELP"; then
    TORCHRUN_OPTS=(--signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
fi
if grep -q -- "--shutdown-timeout" <<<"$TORCHRUN_HELP"; then
    TORCHRUN_OPTS+=(--shutdown-timeout "$STOP_GRACE_S")
fi

echo "job ${SLURM_JOB_ID:-?}: ${NODES} node(s) x ${GPUS_PER_NODE} process(es), rendezvous ${HEAD}:${PORT}"
echo "running: ${SCRIPT} --config ${CONFIG} ${OVERRIDES}"

# shellcheck disable=SC2086  # OVERRIDES is a list of words on purpose
srun --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "$PYTHON" -m torch.distributed.run \
        --nnodes="$NODES" --nproc_per_node="$GPUS_PER_NODE" \
        --rdzv_backend=c10d --rdzv_endpoint="${HEAD}:${PORT}" --rdzv_id="${SLURM_JOB_ID:-0}" \
        "${TORCHRUN_OPTS[@]}" \
        "$SCRIPT" --config "$CONFIG" $OVERRIDES &
SRUN_PID=$!

# shellcheck disable=SC2329  # called from the traps below
forward() {
    echo "batch shell: got SIG$1, forwarding it to the training processes"
    kill -s "$1" "$SRUN_PID" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# `wait` returns early when a trapped signal arrives; keep waiting until srun itself has exited.
status=0
while kill -0 "$SRUN_PID" 2>/dev/null; do
    wait "$SRUN_PID" && status=0 || status=$?
done
echo "srun exited with status ${status}"
if [ -f "$TRAIN_STOP_MARKER" ]; then           # a graceful stop: the checkpoint is written
    echo "training stopped cleanly: $(cat "$TRAIN_STOP_MARKER")"
    rm -f "$TRAIN_STOP_MARKER"
    exit 0
fi
exit "$status"
