#!/usr/bin/env bash
# N local processes on CPU devices, joined through jax.distributed (gloo on 127.0.0.1): the
# multi-host code path on one machine.
#   bash launch/local.sh [--dry_run] NPROC DEVICES_PER_PROC -- python -m lvm_jax.train --config C --workdir W
# --dry_run prints the NPROC commands (one per line, shell-quoted; they run in parallel) and exits 0.
# Ctrl-C or SIGTERM reaches every process (SIGTERM: each saves a checkpoint and exits); if one
# process fails, the others are stopped instead of waiting forever for it in a collective.
set -uo pipefail
dry_run=0; [ "${1:-}" = "--dry_run" ] && { dry_run=1; shift; }
nproc=$1; devices=$2; shift 2; [ "${1:-}" = "--" ] && shift
port=${PORT:-$((20000 + RANDOM % 20000))}
if ((dry_run)); then
  # Quoted as Python's shlex.quote does, so each line is exactly what would run.
  q() { if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"; else local s=${1//\'/\'\"\'\"\'}; printf "'%s'" "$s"; fi; }
  for ((i = 0; i < nproc; i++)); do
    words=(); for w in env JAX_PLATFORMS=cpu "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$nproc" \
      --process_id="$i" --cpu_devices="$devices"; do words+=("$(q "$w")"); done
    echo "${words[*]}"
  done
  exit 0
fi
pids=()
stop() { kill -TERM "${pids[@]}" 2>/dev/null; }
trap 'stop; wait; exit 143' INT TERM
for ((i = 0; i < nproc; i++)); do
  JAX_PLATFORMS=cpu "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$nproc" \
    --process_id="$i" --cpu_devices="$devices" &
  pids+=($!)
done
status=0
while [ ${#pids[@]} -gt 0 ]; do
  wait -n -p done_pid "${pids[@]}"; rc=$?
  left=(); for p in "${pids[@]}"; do [ "$p" != "$done_pid" ] && left+=("$p"); done; pids=("${left[@]}")
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; stop; fi
done
exit $status
