#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, all of its GPUs as local devices.
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh configs/lvm_1b.py /shared/runs/lvm_1b [TRAIN FLAGS...]
# The workdir must be visible to every node (a shared filesystem or gs://). Install first, once,
# on the shared filesystem: python3 -m venv .venv && .venv/bin/pip install -e . "jax[cuda12]"
# --dry_run (anywhere among the arguments) prints the srun command, shell-quoted, and exits 0:
#   bash launch/slurm_gpu.sh --dry_run configs/lvm_1b.py /shared/runs/lvm_1b
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
dry_run=0; args=()
for a in "$@"; do if [ "$a" = --dry_run ]; then dry_run=1; else args+=("$a"); fi; done  # the trainer has no --dry_run
set -- "${args[@]}"
config=$1; workdir=$2; shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# --distributed: JAX reads the coordinator, process count and index from SLURM's environment.
# LVM on GPUs: add --config.model.scan_layers=False (unrolled layers; on an H200 the LVM-300M
# step ran 1.25x faster in half the memory than under lax.scan, bench/accelerator.py), and
# --config.model.max_sentences=8 (cuDNN's packed attention with a run table of 9 ran at its plain
# causal speed, one of 17 15% slower; rows of single images then fill only half a 4096 row).
cmd=(srun --kill-on-bad-exit=1 .venv/bin/python -m lvm_jax.train --distributed --config "$config" --workdir "$workdir" "$@")
if ((dry_run)); then
  # Quoted as Python's shlex.quote does, so the line is exactly what would run.
  q() { if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"; else local s=${1//\'/\'\"\'\"\'}; printf "'%s'" "$s"; fi; }
  words=(); for w in "${cmd[@]}"; do words+=("$(q "$w")"); done
  echo "${words[*]}"
  exit 0
fi
"${cmd[@]}"
