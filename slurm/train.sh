#!/bin/bash
# Supervised training on a SLURM cluster:   sbatch slurm/train.sh
#   CONFIG=configs/resnet18_cifar10.yaml OVERRIDES="train.epochs=90" sbatch --nodes=4 slurm/train.sh
#SBATCH --job-name=train
#SBATCH --nodes=1                  # nodes (or sbatch --nodes=N)
#SBATCH --ntasks-per-node=1        # one torchrun agent per node; it starts one process per GPU
#SBATCH --gpus-per-node=4          # GPUs (= processes) per node
#SBATCH --cpus-per-task=32         # CPU cores per node: data workers and threads
#SBATCH --time=24:00:00
#SBATCH --requeue                  # after preemption or the USR1 below, the job queues again and resumes
#SBATCH --signal=B:USR1@120        # USR1 to this shell 120 s before the time limit: checkpoint and requeue
#SBATCH --output=slurm-%x-%j.out
SCRIPT=train.py
CONFIG=${CONFIG:-configs/default.yaml}
# shellcheck source=slurm/launch.sh
source "${SLURM_SUBMIT_DIR:-$PWD}/slurm/launch.sh"
