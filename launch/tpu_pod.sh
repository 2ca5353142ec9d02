#!/usr/bin/env bash
# Train on Cloud TPU: one slice (a TPU VM, `gcloud compute tpus tpu-vm`), or several slices joined
# over the data-center network (DCN) as one multislice queued resource
# (`gcloud compute tpus queued-resources`). Every command is run from your own machine.
#
#   bash launch/tpu_pod.sh [--slices=N] [--dry_run] COMMAND NAME ...
#     create NAME ACCELERATOR                          reserve the slice(s); returns once they are up
#     run    NAME CONFIG WORKDIR [TRAIN FLAGS...]      install lvm_jax on every worker, start the trainer
#                                                      on all of them, detached (it outlives this ssh)
#     up     NAME ACCELERATOR CONFIG WORKDIR [...]     create unless it is up, then run
#     resume NAME ACCELERATOR CONFIG WORKDIR [...]     the same as up, meant for after a preemption: what
#                                                      was preempted, failed or deleted is re-created
#     logs   NAME                                      follow the trainer's log on worker 0 (Ctrl-C stops
#                                                      following, not training)
#     stop   NAME                                      SIGTERM the trainer on every worker: it saves, exits 0
#     status NAME                                      describe the TPU VM / queued resource
#     delete NAME                                      give the TPUs back
#   bash launch/tpu_pod.sh NAME ACCELERATOR CONFIG WORKDIR [TRAIN FLAGS...]     the older form of `up`
#
#   bash launch/tpu_pod.sh up lvm7b v5p-128 configs/lvm_7b.py gs://my-bucket/lvm_7b
#   bash launch/tpu_pod.sh --slices=2 up lvm7b2 v5p-128 configs/lvm_7b.py gs://my-bucket/lvm_7b_x2
#
# --slices=N, N > 1: a queued resource of N slices of ACCELERATOR (nodes NAME-0 ... NAME-<N-1>); the
#   trainer gets --config.mesh.dcn.data=N (data parallel across slices, FSDP within each) unless the
#   TRAIN FLAGS set config.mesh.dcn themselves. Give the same --slices to every command for NAME.
# --dry_run: print the commands instead of running them, one per line, shell-quoted, and exit 0.
#   State queries (describe) are printed too and answered by $DRY_RUN_STATE (default: empty, i.e.
#   NAME does not exist; e.g. PREEMPTED or SUSPENDED shows what resume does after a preemption).
# Environment: REPO (git URL of lvm_jax, needed by run/up/resume), ZONE (default us-east5-a),
# VERSION (TPU runtime, default v2-alpha-tpuv5), SPOT=1 for spot capacity, PROJECT (default:
# gcloud's). WORKDIR must be gs://: every worker writes checkpoints there, and a re-created slice
# finds them there (the trainer resumes from the newest checkpoint that verifies by itself).
set -euo pipefail

dry_run=0; slices=1; args=(); next_is_slices=0
for a in "$@"; do  # anywhere on the line: the trainer has no flag of these names
  if ((next_is_slices)); then slices=$a; next_is_slices=0; continue; fi
  case "$a" in
    --dry_run|--dry-run) dry_run=1 ;;
    --slices=*) slices=${a#--slices=} ;;
    --slices) next_is_slices=1 ;;
    *) args+=("$a") ;;
  esac
done
set -- "${args[@]+"${args[@]}"}"
usage() { sed -n '6,19p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $slices =~ ^[1-9][0-9]*$ ]] || { echo "tpu_pod.sh: --slices=$slices: expected a positive integer" >&2; exit 2; }

zone=${ZONE:-us-east5-a}
version=${VERSION:-v2-alpha-tpuv5}
where=(--zone "$zone"); [ -n "${PROJECT:-}" ] && where+=(--project "$PROJECT")
spot=(); [ "${SPOT:-0}" = 1 ] && spot=(--spot)
exec 3>&1  # the real stdout: dry-run lines of queries must not vanish into $(...)

# One word quoted as Python's shlex.quote does, so a printed line is exactly what would run and
# shlex.split gives the argv back.
q() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"
  else local s=${1//\'/\'\"\'\"\'}; printf "'%s'" "$s"; fi
}
qjoin() { local w out=(); for w in "$@"; do out+=("$(q "$w")"); done; printf '%s\n' "${out[*]}"; }
do_() { if ((dry_run)); then qjoin "$@"; else "$@"; fi; }  # a command that changes something
query() { if ((dry_run)); then qjoin "$@" >&3; printf '%s\n' "${DRY_RUN_STATE:-}"; else "$@" 2>/dev/null || true; fi; }

# The two kinds of TPU resource: one slice is a TPU VM; several are one queued resource whose
# nodes GCP starts with MEGASCALE_COORDINATOR_ADDRESS, MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID and
# MEGASCALE_PORT in their tpu-env metadata, where libtpu and jax.distributed read them (so neither
# this script nor the trainer sets them).
if ((slices == 1)); then
  state() { query gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format='value(state)'; }
  create() {  # synchronous: returns when the VM is READY
    do_ gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type "$accel" \
      --version "$version" "${spot[@]+"${spot[@]}"}"
  }
  remove() { do_ gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet; }
  describe() { do_ gcloud compute tpus tpu-vm describe "$name" "${where[@]}"; }
  ssh_all() { do_ gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command "$1"; }
  ssh_0() { do_ gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=0 --command "$1"; }
  up_states=READY; wait_states='CREATING|STARTING|RESTARTING|REPAIRING|REIMAGING'
else
  state() { query gcloud compute tpus queued-resources describe "$name" "${where[@]}" --format='value(state.state)'; }
  create() {  # returns once queued; wait_up waits for the slices
    do_ gcloud compute tpus queued-resources create "$name" "${where[@]}" --accelerator-type "$accel" \
      --runtime-version "$version" --node-count "$slices" --node-prefix "$name" "${spot[@]+"${spot[@]}"}"
  }
  # --force deletes the nodes with the request; without it a queued resource with nodes stays.
  remove() { do_ gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet; }
  describe() { do_ gcloud compute tpus queued-resources describe "$name" "${where[@]}"; }
  ssh_all() { do_ gcloud compute tpus queued-resources ssh "$name" "${where[@]}" --node=all --worker=all --command "$1"; }
  ssh_0() { do_ gcloud compute tpus queued-resources ssh "$name" "${where[@]}" --node=0 --worker=0 --command "$1"; }
  up_states=ACTIVE; wait_states='ACCEPTED|WAITING_FOR_RESOURCES|PROVISIONING|CREATING'
fi

wait_up() {  # a queued request can wait hours for capacity; say so every poll
  ((dry_run)) && return 0
  local s
  while s=$(state); [[ $s != "$up_states" ]]; do
    [[ $s =~ ^($wait_states)$ ]] || { echo "tpu_pod.sh: $name is ${s:-gone} instead of $up_states" >&2; exit 1; }
    echo "tpu_pod.sh: $name is $s; checking again in 60 s" >&2; sleep 60
  done
}

# Up: reuse what runs, wait for what is coming, create what is missing, and delete and re-create
# what was preempted or failed (PREEMPTED/TERMINATED VMs, SUSPENDED/FAILED queued resources):
# they hold no TPUs and cannot be restarted.
ensure_up() {
  local s; s=$(state)
  if [[ $s == "$up_states" ]]; then return 0; fi
  if [[ -n $s && $s =~ ^($wait_states)$ ]]; then wait_up; return 0; fi
  if [[ -n $s ]]; then echo "tpu_pod.sh: $name is $s: deleting and re-creating it" >&2; remove; fi
  create; wait_up
}

# Workers run an older Python than lvm_jax needs (3.11+): uv provides one in the venv. Reruns
# (resume, a new run) update the checkout and reuse the venv.
setup_cmd() {
  printf '%s' "set -eo pipefail; [ -d lvm_jax ] || git clone -q $(q "$repo") lvm_jax; cd lvm_jax && git pull -q;" \
    " python3 -m pip install -q --user uv && { [ -x .venv/bin/python ] || ~/.local/bin/uv venv -q -p 3.12 .venv; }" \
    " && ~/.local/bin/uv pip install -q -p .venv/bin/python -e '.[tpu]'"
}

# The trainer on one worker: refuses to start a second one next to a live one (`stop` first; the
# pid file's process counts only if it is lvm_jax.train: a rebooted VM reuses pids), appends to
# ~/lvm_jax/train.log, remembers its pid for `stop`. On TPU VMs it joins the other
# workers (and slices) by itself through jax.distributed.
train_cmd() {
  local flags=("$@") f words=()
  if ((slices > 1)); then
    local has_dcn=0; for f in "${flags[@]+"${flags[@]}"}"; do [[ $f == --config.mesh.dcn* ]] && has_dcn=1; done
    ((has_dcn)) || flags+=("--config.mesh.dcn.data=$slices")
  fi
  for f in .venv/bin/python -m lvm_jax.train --config "$config" --workdir "$workdir" "${flags[@]+"${flags[@]}"}"; do
    words+=("$(q "$f")")
  done
  # Async collective fusion lets XLA overlap the FSDP all-gathers (and, across slices, the DCN
  # gradient all-reduce) with compute.
  local libtpu='--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true'
  printf '%s' "cd lvm_jax; if [ -f train.pid ] && grep -qas lvm_jax.train \"/proc/\$(cat train.pid)/cmdline\";" \
    " then echo \"\$(hostname): lvm_jax.train already runs (pid \$(cat train.pid)); stop it first\" >&2; exit 1; fi;" \
    " LIBTPU_INIT_ARGS=$(q "$libtpu") nohup ${words[*]} >> train.log 2>&1 < /dev/null & echo \$! > train.pid"
}

run() {
  repo=${REPO:?set REPO to the git URL of your lvm_jax checkout}
  [[ $workdir == gs://* ]] || echo "tpu_pod.sh: warning: WORKDIR $workdir is not gs://: each worker writes its own" >&2
  ssh_all "$(setup_cmd)"
  ssh_all "$(train_cmd "$@")"
  ((dry_run)) || echo "started on all workers of $name ($slices slice(s)); follow it: bash $0 --slices=$slices logs $name" >&2
}

cmd=${1:-}
case "$cmd" in
  create) (($# == 3)) || usage; name=$2; accel=$3; ensure_up ;;
  run) (($# >= 4)) || usage; name=$2; config=$3; workdir=$4; shift 4; run "$@" ;;
  up|resume) (($# >= 5)) || usage; name=$2; accel=$3; config=$4; workdir=$5; shift 5; ensure_up; run "$@" ;;
  logs) (($# == 2)) || usage; name=$2; ssh_0 "tail -n 200 -F lvm_jax/train.log" ;;
  stop) (($# == 2)) || usage; name=$2
    ssh_all "cd lvm_jax && if [ -f train.pid ] && grep -qas lvm_jax.train \"/proc/\$(cat train.pid)/cmdline\"; then kill -TERM \"\$(cat train.pid)\"; fi" ;;
  status) (($# == 2)) || usage; name=$2; describe ;;
  delete) (($# == 2)) || usage; name=$2; remove ;;
  ""|-h|--help|help) usage ;;
  *) # the older form; a mistyped COMMAND must not become the name of a new TPU
    if ! (($# >= 4)) || ! [[ $2 =~ ^v[0-9]+[a-z]*-[0-9]+$ ]]; then usage; fi
    name=$1; accel=$2; config=$3; workdir=$4; shift 4; ensure_up; run "$@" ;;
esac
