"""Multi-process start-up, shared by every entry point.

  --coordinator_address=host:port --num_processes=N --process_id=i   explicit (local, GPU clusters)
  --distributed=auto                                                 TPU VMs, SLURM: JAX detects all
  --cpu_devices=K                                                    K CPU devices per process (tests)
"""

import jax
from absl import flags

_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_AUTO = flags.DEFINE_bool("distributed", False, "Let JAX detect the cluster (TPU pods, SLURM).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "CPU devices per process (for testing).")


def initialize() -> None:
  """Joins the job's processes before any device is touched; single-process runs skip it."""
  if _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif _AUTO.value:
    jax.distributed.initialize()
