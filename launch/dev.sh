#!/usr/bin/env bash
# Set up .venv once (idempotent) and run the demo or the tests on this machine.
#   bash launch/dev.sh demo [WORKDIR]      the README main job
#   bash launch/dev.sh test [PYTEST ARGS]  the default test suite
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LVM_VENV:-.venv}
STAMP="$VENV/.installed"
if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch first, pinned: 2.13.0 is the CPU build these machines keep on disk; a looser spec
  # (or the bare `torch` of the extra) would pull a multi-GB CUDA build.
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -e ".[tpu,torch,dev]"
  touch "$STAMP"
fi
# libtpu (the tpu extra, for AOT compiles) probes noisily for TPUs on machines that have none.
if ! ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1; then export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}; fi
cmd=${1:-}; shift || true
case "$cmd" in
  demo) exec "$VENV/bin/python" -m lvm_jax.demo --workdir "${1:-workdir/demo}" ;;
  test) exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@" ;;
  *) echo "usage: bash launch/dev.sh demo [WORKDIR] | test [PYTEST ARGS]" >&2; exit 2 ;;
esac
