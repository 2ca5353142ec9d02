#!/usr/bin/env bash
# Train on a TPU pod slice: create the TPU VM (or reuse it), install lvm_jax on every worker,
# start the trainer on all workers at once, detached (it outlives this ssh session).
#   bash launch/tpu_pod.sh NAME ACCELERATOR CONFIG WORKDIR [TRAIN FLAGS...]
#   bash launch/tpu_pod.sh lvm7b v5p-128 configs/lvm_7b.py gs://my-bucket/lvm_7b
# Environment: REPO (git URL of lvm_jax, required), ZONE (default us-east5-a), VERSION (TPU VM
# image), SPOT=1 for spot capacity. WORKDIR must be gs:// (every worker writes checkpoints there).
# Follow progress: gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=0 --command 'tail -f lvm_jax/train.log'
set -euo pipefail
name=$1; accel=$2; config=$3; workdir=$4; shift 4
zone=${ZONE:-us-east5-a}
version=${VERSION:-v2-alpha-tpuv5}
repo=${REPO:?set REPO to the git URL of your lvm_jax checkout}
tpu=(gcloud compute tpus tpu-vm)
spot=(); [ "${SPOT:-0}" = 1 ] && spot=(--spot)

if ! "${tpu[@]}" describe "$name" --zone "$zone" >/dev/null 2>&1; then
  "${tpu[@]}" create "$name" --zone "$zone" --accelerator-type "$accel" --version "$version" "${spot[@]}"
fi
ssh_all() { "${tpu[@]}" ssh "$name" --zone "$zone" --worker=all --command "$1"; }

# TPU VM images ship an older Python than lvm_jax needs (3.11+): uv provides one in the venv.
ssh_all "set -eo pipefail; [ -d lvm_jax ] || git clone -q $repo lvm_jax; cd lvm_jax && git pull -q;
  python3 -m pip install -q --user uv && ~/.local/bin/uv venv -q -p 3.12 .venv &&
  ~/.local/bin/uv pip install -q -p .venv/bin/python -e '.[tpu]'"
# On TPU VMs the trainer joins all workers by itself (jax.distributed). Async collective
# fusion lets XLA overlap FSDP all-gathers with compute.
ssh_all "cd lvm_jax && LIBTPU_INIT_ARGS='--xla_tpu_enable_async_collective_fusion=true \
  --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true' \
  nohup .venv/bin/python -m lvm_jax.train --config $config --workdir $workdir $* \
  >> train.log 2>&1 < /dev/null &"
echo "started on all workers of $name; logs in ~/lvm_jax/train.log on each worker"
