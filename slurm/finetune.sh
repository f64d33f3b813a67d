#!/bin/bash
# Fine-tuning on a SLURM cluster:   sbatch slurm/finetune.sh    (configs/finetune_resnet18.yaml)
#   CONFIG=configs/finetune_digits.yaml OVERRIDES="finetune.weights=runs/digits04/checkpoints/best.pt" sbatch slurm/finetune.sh
#SBATCH --job-name=finetune
#SBATCH --nodes=1                  # nodes (or sbatch --nodes=N)
#SBATCH --ntasks-per-node=1        # one torchrun agent per node; it starts one process per GPU
#SBATCH --gpus-per-node=4          # GPUs (= processes) per node
#SBATCH --cpus-per-task=32         # CPU cores per node
#SBATCH --time=12:00:00
#SBATCH --requeue                  # after preemption or the USR1 below, the job queues again and resumes
#SBATCH --signal=B:USR1@120        # USR1 to this shell 120 s before the time limit: checkpoint and requeue
#SBATCH --output=slurm-%x-%j.out
SCRIPT=finetune.py
CONFIG=${CONFIG:-configs/finetune_resnet18.yaml}
# shellcheck source=slurm/launch.sh
source "${SLURM_SUBMIT_DIR:-$PWD}/slurm/launch.sh"
