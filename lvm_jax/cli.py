"""What every `python -m lvm_jax.NAME` entry point shares: flag parsing with one-line errors,
logging, and joining a multi-process job.

Logging is absl's: timestamped lines on stderr at INFO (`--verbosity`, `-v`), or with
`--log_dir=DIR` into DIR/<program>.INFO (a link to the newest file), stderr then showing
warnings and worse (`--alsologtostderr`: everything, `--stderrthreshold` to choose). Below
WARNING, the records of installed libraries (orbax logs ~60 INFO lines per checkpoint it
writes) are dropped unless `--verbosity=1`; lvm_jax's own lines, and those of scripts and config
files, always pass.

  --coordinator_address=host:port --num_processes=N --process_id=i   explicit (local, GPU clusters);
      defaults from $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID
  --distributed          JAX detects the cluster (SLURM, Kubernetes); on by itself on TPU VMs
  --cpu_devices=K        K CPU devices per process (tests, launch/local.sh)

SIGTERM (a preemption, `kill`, a scheduler's time limit) is handled from process start: until a
job reaches a point where it can stop cleanly it ends the process with exit 0 and one line (there
is nothing to save yet); inside `stop_requests()` it only sets a flag that the job polls (the
trainers save and exit 0, make_dataset finishes its shard).
"""

import ast
import contextlib
import glob
import importlib.util
import logging as std_logging
import os
import shlex
import signal
import sys
import sysconfig
from typing import Any, Callable, Iterator, Optional

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import lvm_jax

from lvm_jax import checkpoint, config, sharding, storage
from lvm_jax.data import store
from lvm_jax.kernels import flash_attention

_env_int = lambda name: int(os.environ[name]) if name in os.environ else None
_COORDINATOR = flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                                   "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", _env_int("JAX_NUM_PROCESSES"),
                                      "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", _env_int("JAX_PROCESS_ID"), "This process's index.")
_AUTO = flags.DEFINE_bool("distributed", None,
                          "Let JAX detect the cluster (default: on for TPU VMs, off elsewhere).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "CPU devices per process (for testing).")
_JOB_FLAGS = (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _AUTO, _CPU_DEVICES)
_ENTRY = ["__main__"]  # the module whose cli_main runs (its docstring is the --help text)

# Errors that mean "the input is wrong", reported as one line instead of a traceback; anything
# else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (config.ConfigError, sharding.MeshError,
                                                checkpoint.CheckpointError, store.StoreError,
                                                flash_attention.FlashError, PermissionError,
                                                storage.StorageError)


class Terminated(BaseException):
  """SIGTERM outside `stop_requests()`: a BaseException, so no `except Exception` swallows it."""


def _raise_terminated(*_) -> None:
  lvm_jax.note_sigterm()
  raise Terminated()


def terminated() -> bool:
  """Whether this process has received SIGTERM (at any time since it started)."""
  return lvm_jax.sigterm_received


@contextlib.contextmanager
def stop_requests() -> Iterator[None]:
  """Within: SIGTERM only sets the flag `terminated()` reads; the caller stops when it can."""
  previous = signal.signal(signal.SIGTERM, lvm_jax.note_sigterm)  # what lvm_jax/__init__.py installs
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def _fail(prog: str, message: str) -> None:
  print(f"{os.path.basename(prog)}: error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_error(argv: list[str], e: Exception) -> None:
  """One line for a config that does not load or an override that does not apply."""
  if isinstance(e, config.ConfigError):  # already one line of ours (e.g. an unknown built-in name)
    _fail(argv[0], str(e))
  # KeyError's str() is the repr of its message (escaped quotes and newlines), and
  # ml_collections may wrap that again: unquote to the message itself.
  message = str(e.args[0] if e.args and isinstance(e.args[0], str) else e)
  while len(message) > 1 and message[0] == message[-1] and message[0] in "'\"" and "\n" not in message:
    try:
      message = ast.literal_eval(message)
    except (ValueError, SyntaxError):
      break
  message = " ".join(message.split())
  if isinstance(e, OSError):
    _fail(argv[0], f"cannot load --config: {message}")
  # ml_collections names only the last part of an unknown key: find the override it came from.
  key = message.split()[0].strip("\"'") if message else ""
  culprit = [a for a in argv[1:] if a.startswith("--config.") and key and key in a.split("=")[0]]
  hint = message[len(key) + 2:].strip() if message.startswith(("'", '"')) else ""
  _fail(argv[0], (f"unknown config key in {culprit[0]}" + (f" ({hint})" if hint else "")) if culprit
        else f"bad --config: {message}")


def _config_argv(argv: list[str]) -> list[str]:
  """argv with built-in config names as paths (--config=NAME or --config NAME)."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + config.config_path(a.split("=", 1)[1])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = config.config_path(out[i + 1])
  return out


_CONFIG_ERRORS = (AttributeError, KeyError, ValueError, OSError)
CONFIG_HELP = ("Experiment config: a built-in name (lvm_300m, lvm_tiny, ...; see --help) or a config file, "
               "optionally FILE:ARG; override any key with --config.KEY=VALUE.")


def train_main(train: Callable[[Any, str, Optional[int]], Any]) -> None:
  """The command line of a trainer, train(config, workdir, stop_at): --config, --workdir, --stop_at."""
  config = define_config()
  workdir = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard go here.")
  stop_at = flags.DEFINE_integer("stop_at", None, "Save and exit after this step (a job's budget).")
  run(lambda _: train(config.value, workdir.value, stop_at.value), required=["config", "workdir"])


def define_config(default: str | None = None) -> flags.FlagHolder:
  """--config=FILE[:ARG] (a get_config(arg) file) with --config.key=value overrides; unknown
  keys are errors. With a default, ml_collections applies the overrides right here."""
  try:
    return config_flags.DEFINE_config_file("config", default and config.config_path(default), CONFIG_HELP, lock_config=True)
  except _CONFIG_ERRORS as e:
    _config_error(sys.argv, e)
    raise


def _parse(argv: list[str]) -> list[str]:
  if any(a in ("-h", "--help", "-?", "--helpshort") for a in argv[1:]):
    print(usage(argv[0]))
    sys.exit(0)
  try:
    rest = flags.FLAGS(_config_argv(argv))
    if "config" in flags.FLAGS and flags.FLAGS.config is not None:
      flags.FLAGS.config.keys()  # a config that failed to load raises only when used: use it here
    return rest
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    # A config file that raised arrives with its traceback: keep the flag and the error.
    _fail(argv[0], lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}")
  except _CONFIG_ERRORS as e:
    _config_error(argv, e)
  return []


def _own_flags() -> tuple[list, list]:
  """(the entry point's flags, the job flags every entry point has): lvm_jax's and the main
  module's, not absl's or JAX's."""
  by_module = flags.FLAGS.flags_by_module_dict()
  shared = [flags.FLAGS[h.name] for h in _JOB_FLAGS]
  own = [flags.FLAGS["config"]] if "config" in flags.FLAGS else []
  own += [f for m, fl in by_module.items() if m.startswith("lvm_jax") or m == sys.argv[0] for f in fl]
  return [f for f in {f.name: f for f in own}.values() if f not in shared], shared


def usage(prog: str) -> str:
  """--help: what the entry point does (its module's docstring) and its flags, one line each."""
  doc = (getattr(sys.modules.get(_ENTRY[0]), "__doc__", None) or "").strip()
  own, shared = _own_flags()
  line = lambda f: f"  --{f.name}: {f.help}" + ("" if f.default in (None, "") else f" (default: {f.default!r})")
  text = [f"usage: {os.path.basename(prog)} [--flag=value ...]", "", doc, "", "flags:", *map(line, own)]
  if "config" in flags.FLAGS:
    text += ["", "built-in configs: " + " ".join(config.builtin_configs())]
  text += ["", "job flags (every entry point):", *map(line, shared), "",
           "logging: --verbosity, --log_dir, --alsologtostderr; every absl and JAX flag: --helpfull"]
  return "\n".join(text)


def initialize() -> None:
  """Joins the job's processes before any device is touched; single-process runs skip it."""
  if _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  if _COORDINATOR.value:
    # Blocks until every process has joined: say so, or a missing peer looks like a hang.
    logging.info("joining %s as process %s of %s", _COORDINATOR.value, _PROCESS_ID.value, _NUM_PROCESSES.value)
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif _AUTO.value or (_AUTO.value is None and _on_tpu_vm()):
    logging.info("joining the job's other processes (found by jax.distributed)")
    jax.distributed.initialize()


# Where installed libraries live; lvm_jax itself may live there too (a non-editable install).
_LIBRARIES = tuple({os.path.join(sysconfig.get_paths()[k], "")
                    for k in ("purelib", "platlib", "stdlib", "platstdlib")})
_OWN = os.path.join(os.path.dirname(os.path.abspath(lvm_jax.__file__)), "")


class LibraryInfoFilter(std_logging.Filter):
  """Drops installed libraries' INFO and DEBUG records unless absl's verbosity is DEBUG. By file
  and not by logger name: orbax and grain log through absl's logger, as lvm_jax does."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING or logging.get_verbosity() >= logging.DEBUG:
      return True
    return record.pathname.startswith(_OWN) or not record.pathname.startswith(_LIBRARIES)


def _set_up_logging(argv: list[str]) -> None:
  """absl's handler, as app.run installed it: filtered, and into files under --log_dir."""
  handler = logging.get_absl_handler()
  handler.addFilter(LibraryInfoFilter())
  log_dir = flags.FLAGS.log_dir
  if log_dir:
    if not flags.FLAGS["stderrthreshold"].present:  # absl's default, fatal, would hide warnings
      flags.FLAGS.stderrthreshold = "warning"
    try:
      os.makedirs(log_dir, exist_ok=True)
      handler.use_absl_log_file()
    except OSError as e:
      _fail(argv[0], f"--log_dir={log_dir}: {e.strerror or e}")
  # The first line comes right after imports: a person sees at once what runs, with which flags.
  logging.info("starting: %s", shlex.join([os.path.basename(argv[0]), *argv[1:]]))


# Optional dependencies (setup.py EXTRAS): a missing one is one line naming the extra to install.
_EXTRA_OF = {"av": "data", "tensorflow_datasets": "data", "skimage": "data", "sklearn": "demo", "matplotlib": "demo",
             "gcsfs": "gcs", "google": "gcs", "torch": "torch", "transformers": "torch", "diffusers": "torch",
             "libtpu": "tpu"}


def select_platforms() -> None:
  """Keeps JAX off libtpu on hosts without TPU chips, before any backend starts: there libtpu
  only prints an error banner and holds /tmp/libtpu_lockfile, which fails the next lvm_jax
  process on the host. Leaves JAX_PLATFORMS alone when set. lvm-compile still gets libtpu's
  topologies (they load it apart from the backends)."""
  if os.environ.get("JAX_PLATFORMS") or _on_tpu_vm() or importlib.util.find_spec("libtpu") is None:
    return
  gpu = glob.glob("/dev/nvidia[0-9]*") and any(
      importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12"))
  jax.config.update("jax_platforms", "cuda,cpu" if gpu else "cpu")


def _on_tpu_vm() -> bool:
  """TPU VMs expose their chips as /dev/accel* (v4, v5p) or /dev/vfio/N (v5e, v6e)."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def run(main: Callable[[list[str]], None], required: list[str]) -> None:
  """app.run with one-line errors for bad flags, bad configs and bad inputs."""
  flags.mark_flags_as_required(required)
  caller = sys._getframe(1)  # pylint: disable=protected-access
  while caller and caller.f_globals.get("__name__") == __name__:
    caller = caller.f_back
  _ENTRY[0] = caller.f_globals.get("__name__", "__main__") if caller else "__main__"

  def wrapped(argv: list[str]) -> None:
    select_platforms()
    _set_up_logging(sys.argv)
    prog = os.path.basename(argv[0])
    try:
      # Multi-process jobs leave SIGTERM to JAX's preemption service (train.py's Preemption).
      if not (_COORDINATOR.value or _AUTO.value or (_AUTO.value is None and _on_tpu_vm())):
        signal.signal(signal.SIGTERM, _raise_terminated)
        if terminated():  # it came while Python was still importing
          raise Terminated()
      initialize()
      main(argv)
    except ModuleNotFoundError as e:
      top = (e.name or "").split(".")[0]
      if top not in _EXTRA_OF:
        raise
      _fail(argv[0], f"this needs the optional dependency {top!r}: pip install 'lvm_jax[{_EXTRA_OF[top]}]'")
    except Terminated:
      print(f"{prog}: SIGTERM before there was anything to save: exiting", flush=True)
      sys.exit(0)
    except Exception as e:  # pylint: disable=broad-except
      from lvm_jax import loop  # pylint: disable=g-import-not-at-top  (loop imports this module)
      if not isinstance(e, USER_ERRORS + (loop.RunError,)):
        raise
      _fail(argv[0], str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)

  app.run(wrapped, flags_parser=_parse)
