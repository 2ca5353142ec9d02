#!/usr/bin/env bash
# N local processes on CPU devices, joined through jax.distributed (gloo on 127.0.0.1): the
# multi-host code path on one machine.
#   bash launch/local.sh NPROC DEVICES_PER_PROC -- python -m lvm_jax.train --config C --workdir W
set -euo pipefail
nproc=$1; devices=$2; shift 2; [ "${1:-}" = "--" ] && shift
port=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < nproc; i++)); do
  JAX_PLATFORMS=cpu "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$nproc" \
    --process_id="$i" --cpu_devices="$devices" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
