#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, all of its GPUs as local devices.
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh configs/lvm_1b.py /shared/runs/lvm_1b [TRAIN FLAGS...]
# The workdir must be visible to every node (a shared filesystem or gs://). Install first, once,
# on the shared filesystem: python3 -m venv .venv && .venv/bin/pip install -e . "jax[cuda12]"
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
config=$1; workdir=$2; shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# --distributed: JAX reads the coordinator, process count and index from SLURM's environment.
# LVM on GPUs: add --config.model.scan_layers=False (unrolled layers; on an H200 the LVM-300M
# step ran 1.25x faster in half the memory than under lax.scan, bench/accelerator.py).
srun --kill-on-bad-exit=1 .venv/bin/python -m lvm_jax.train --distributed \
  --config "$config" --workdir "$workdir" "$@"
