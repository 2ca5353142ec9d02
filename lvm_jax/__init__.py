"""lvm_jax: JAX/Flax trainer for large autoregressive vision models (LVM and AIM)."""

import os as _os
import signal as _signal
import sys as _sys

__version__ = "0.1.0"

# Set by a SIGTERM at any time in this process (see cli.terminated()).
sigterm_received = False


def note_sigterm(*_) -> None:
  global sigterm_received
  sigterm_received = True


# An entry point (`python -m lvm_jax.NAME`, `lvm-NAME`) spends seconds importing JAX before its
# own handler is in place; a SIGTERM then would kill it with status 143 and no word. Until
# cli.run takes over, the signal is only noted, and cli.run exits 0 with one line.
if _sys.argv and (_sys.argv[0] == "-m" or _os.path.basename(_sys.argv[0]).startswith("lvm-")):
  if _signal.getsignal(_signal.SIGTERM) == _signal.SIG_DFL:
    _signal.signal(_signal.SIGTERM, note_sigterm)
