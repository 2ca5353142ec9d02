"""lvm_jax VQGAN params <-> diffusers `VQModel` state dicts (the amused layout), as numpy arrays.

Module names already match diffusers (models/vqgan.py), so the table is short: dotted paths,
conv kernels HWIO <-> OIHW, GroupNorm `scale` <-> `weight`, the codebook under
`quantize.embedding`. Files are read and written as safetensors, never pickles.
"""

from typing import Any

import numpy as np

from lvm_jax.models import vqgan

CODEBOOK = "quantize.embedding.weight"


class WeightsError(ValueError):
  """A weights file that does not fit the configured VQGAN."""


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
  return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
  """'encoder.down_blocks.0.resnets.1.conv1.kernel' -> nested dicts, integer keys for list items."""
  tree: dict = {}
  for key, value in flat.items():
    parts = [int(p) if p.isdigit() else p for p in key.split(".")]
    node = tree
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return tree


def diffusers_name(key: str) -> str:
  """Our dotted parameter path -> the diffusers state-dict name."""
  if key == "codebook":
    return CODEBOOK
  for ours in (".kernel", ".scale"):
    if key.endswith(ours):
      return key[:-len(ours)] + ".weight"
  return key


def _to_torch(key: str, value: np.ndarray) -> np.ndarray:
  return value.transpose(3, 2, 0, 1) if key.endswith(".kernel") else value  # HWIO -> OIHW


def to_diffusers(params: dict) -> dict[str, np.ndarray]:
  """Pure-dict params (nnx.to_pure_dict of the model's Params) -> diffusers VQModel state dict."""
  return {diffusers_name(k): np.ascontiguousarray(_to_torch(k, np.asarray(v, np.float32)))
          for k, v in _flatten(params).items()}


def from_diffusers(state: dict[str, Any], cfg: vqgan.Config) -> dict:
  """diffusers VQModel state dict -> pure-dict params for `vqgan.Model(cfg)`.

  Every parameter must be present with its shape and nothing may be left over: a file of
  another architecture fails on the first mismatch, named in one line.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(lambda: vqgan.Model(cfg, rngs=nnx.Rngs(0)))
  shapes = {k: v.shape for k, v in _flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))).items()}
  names = {diffusers_name(k): k for k in shapes}
  extra = sorted(set(state) - set(names))
  if extra:
    raise WeightsError(f"weights do not fit the VQGAN config: unexpected tensor {extra[0]} "
                       f"({len(extra)} unexpected in all)")
  flat = {}
  for name, key in sorted(names.items()):
    if name not in state:
      raise WeightsError(f"weights do not fit the VQGAN config: missing tensor {name}")
    value = np.asarray(state[name], np.float32)
    want = _to_torch(key, np.empty(shapes[key], np.float32)).shape
    if value.shape != want:
      raise WeightsError(f"weights do not fit the VQGAN config: {name} has shape {value.shape}, "
                         f"expected {want}")
    flat[key] = value.transpose(2, 3, 1, 0) if key.endswith(".kernel") else value  # OIHW -> HWIO
  return _unflatten(flat)


def load_safetensors(path: str, cfg: vqgan.Config) -> dict:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return from_diffusers(load_file(path), cfg)


def save_safetensors(params: dict, path: str) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(to_diffusers(params), path)
