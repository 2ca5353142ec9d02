"""What a training workdir keeps besides checkpoints, written at every start by process 0:

  config.json                     the config of the newest start (what prompt / evaluate read)
  configs/<n>-step<S>.json        every start's config, never overwritten (n counts starts)
  data.json                       the data's identity at the first start: tokenizer id, tokens
                                  per image, vocabulary; later starts are checked against it

Local paths in the config are made absolute first, so the workdir means the same thing from any
directory. A resume whose config differs from the previous start's prints the changed keys; a
resume on data made by another tokenizer is refused (config.data.allow_new_tokenizer=True
allows it on purpose).
"""

import json
import os
from typing import Any, Optional

import jax
import ml_collections
from absl import logging
from etils import epath

from lvm_jax.config import ConfigError

# Config keys whose string values name files or folders.
PATH_KEYS = ("path", "root", "workdir", "weights", "lpips_weights", "store", "config")


def check_writable(workdir: str) -> None:
  """Fail in one line, before compiling, if the workdir (local or gs://) cannot be written."""
  probe = epath.Path(workdir) / f".write_test_{jax.process_index()}"
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    # OSError locally; the gs:// clients raise their own types (no bucket, no permission).
    reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:200]
    raise PermissionError(f"workdir {workdir} is not writable: {reason}") from None


def absolute_paths(c: ml_collections.ConfigDict) -> None:
  """Local relative paths in the config -> absolute, in place (gs:// and empty stay)."""
  for key in list(c.keys()):
    value = c[key]
    if isinstance(value, ml_collections.ConfigDict):
      absolute_paths(value)
    elif key in PATH_KEYS and isinstance(value, str) and value and "://" not in value:
      file, sep, arg = value.partition(":")  # a config file may carry its argument (FILE:ARG)
      c[key] = os.path.abspath(file) + sep + arg if key == "config" else os.path.abspath(value)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def changes(old: dict, new: dict) -> list[str]:
  """'key: old -> new' for every dotted key that differs (lists and tuples compare equal)."""
  norm = lambda v: json.loads(json.dumps(v))
  a, b = _flat(norm(old)), _flat(norm(new))
  return [f"{k}: {a.get(k, '(none)')} -> {b.get(k, '(none)')}" for k in sorted(a.keys() | b.keys())
          if a.get(k) != b.get(k)]


def _read_json(path: epath.Path) -> Optional[dict]:
  return json.loads(path.read_text()) if path.exists() else None


def check_data(c: Any, workdir: str, data: Optional[dict]) -> None:
  """A resume on data from another tokenizer is an error unless the config allows it."""
  recorded = _read_json(epath.Path(workdir) / "data.json")
  if not data or not recorded or recorded.get("tokenizer") == data.get("tokenizer"):
    return
  if not c.data.get("allow_new_tokenizer", False):
    raise ConfigError(f"{workdir} was trained on tokens of tokenizer {recorded['tokenizer']}, the data now comes "
                      f"from tokenizer {data['tokenizer']}: use a new workdir, or set "
                      "--config.data.allow_new_tokenizer=True to go on anyway")


def record_start(c: ml_collections.ConfigDict, workdir: str, start: int, data: Optional[dict] = None) -> None:
  """Writes this start's config (history and config.json) and the data record (check_data first)."""
  root = epath.Path(workdir)
  new = json.loads(c.to_json())
  old = _read_json(root / "config.json")
  if old is not None:
    diff = changes(old, new)
    if diff:
      logging.info("config changed since the last start (%d keys): %s", len(diff), "; ".join(diff))
  if jax.process_index() != 0:
    return
  history = root / "configs"
  history.mkdir(parents=True, exist_ok=True)  # a no-op on gs://, where folders exist through their objects
  n = len([p for p in history.iterdir() if p.name.endswith(".json")]) if history.exists() else 0
  text = json.dumps(new, indent=1)
  (history / f"{n:04d}-step{start}.json").write_text(text)
  (root / "config.json").write_text(text)
  recorded = _read_json(root / "data.json")
  if data and (recorded is None or recorded != data):
    (root / "data.json").write_text(json.dumps(data, indent=1))
