#!/bin/bash
# DCGAN on a SLURM cluster:   sbatch slurm/gan.sh          (configs/dcgan.yaml: CIFAR-10)
#   CONFIG=configs/dcgan_digits.yaml sbatch slurm/gan.sh
#SBATCH --job-name=dcgan
#SBATCH --nodes=1                  # nodes (or sbatch --nodes=N)
#SBATCH --ntasks-per-node=1        # one torchrun agent per node; it starts one process per GPU
#SBATCH --gpus-per-node=4          # GPUs (= processes) per node
#SBATCH --cpus-per-task=32         # CPU cores per node
#SBATCH --time=12:00:00
#SBATCH --requeue                  # after preemption or the USR1 below, the job queues again and resumes
#SBATCH --signal=B:USR1@120        # USR1 to this shell 120 s before the time limit: checkpoint and requeue
#SBATCH --output=slurm-%x-%j.out
SCRIPT=gan_train.py
CONFIG=${CONFIG:-configs/dcgan.yaml}
# shellcheck source=slurm/launch.sh
source "${SLURM_SUBMIT_DIR:-$PWD}/slurm/launch.sh"
