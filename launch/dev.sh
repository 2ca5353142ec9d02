#!/usr/bin/env bash
# Set up .venv once (idempotent) and run the demo or the tests on this machine.
#   bash launch/dev.sh demo [WORKDIR]      the README main job
#   bash launch/dev.sh test [PYTEST ARGS]  the default test suite
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LVM_VENV:-.venv}
cmd=${1:-}; shift || true
# What each use installs (setup.py EXTRAS): the demo only its own extra; the tests everything.
case "$cmd" in
  demo) extras=demo ;;
  test) extras=tpu,torch,dev ;;
  *) echo "usage: bash launch/dev.sh demo [WORKDIR] | test [PYTEST ARGS]" >&2; exit 2 ;;
esac
STAMP="$VENV/.installed-$extras"
if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch first, pinned: 2.13.0 is the CPU build these machines keep on disk; a looser spec
  # (or the bare `torch` of the extra) would pull a multi-GB CUDA build.
  case ",$extras," in *,torch,*) "$VENV/bin/pip" install -q torch==2.13.0 ;; esac
  "$VENV/bin/pip" install -q -e ".[$extras]"
  touch "$STAMP"
fi
# libtpu (the tpu extra, for AOT compiles) probes noisily for TPUs on machines that have none:
# the entry points keep JAX off it by themselves (cli.select_platforms); pytest needs this.
if ! ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1; then export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}; fi
case "$cmd" in
  demo) exec "$VENV/bin/python" -m lvm_jax.demo --workdir "${1:-workdir/demo}" ;;
  test) exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@" ;;
esac
