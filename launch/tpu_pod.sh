#!/usr/bin/env bash
# Train on a TPU pod slice: create the TPU VM (or reuse it), install lvm_jax on every worker,
# run the trainer on all workers at once.
#   bash launch/tpu_pod.sh NAME ACCELERATOR CONFIG WORKDIR [TRAIN FLAGS...]
#   bash launch/tpu_pod.sh lvm7b v5p-128 configs/lvm_7b.py gs://my-bucket/lvm_7b
# Environment: ZONE (default us-east5-a), VERSION (TPU VM image), REPO (git URL of lvm_jax), SPOT=1.
set -euo pipefail
name=$1; accel=$2; config=$3; workdir=$4; shift 4
zone=${ZONE:-us-east5-a}
version=${VERSION:-v2-alpha-tpuv5}
repo=${REPO:?set REPO to the git URL of your lvm_jax checkout}
tpu=(gcloud compute tpus tpu-vm)

if ! "${tpu[@]}" describe "$name" --zone "$zone" >/dev/null 2>&1; then
  "${tpu[@]}" create "$name" --zone "$zone" --accelerator-type "$accel" --version "$version" \
    ${SPOT:+--spot}
fi
ssh_all() { "${tpu[@]}" ssh "$name" --zone "$zone" --worker=all --command "$1"; }

ssh_all "set -e; [ -d lvm_jax ] || git clone -q $repo lvm_jax; cd lvm_jax && git pull -q;
  python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
# On TPU VMs the trainer joins all workers by itself (jax.distributed). Async collective
# fusion lets XLA overlap FSDP all-gathers with compute.
ssh_all "cd lvm_jax && LIBTPU_INIT_ARGS='--xla_tpu_enable_async_collective_fusion=true \
  --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true' \
  .venv/bin/python -m lvm_jax.train --config $config --workdir $workdir $* \
  2>&1 | tee -a train.log"
