"""lvm_jax AIM params -> ml-aim's PyTorch state-dict layout (numpy, written as safetensors).

The trunk maps onto ml-aim v1's `preprocessor.patchifier.{proj,norm}`, `trunk.blocks.{i}.
{norm_1, attn.qkv, attn.proj, norm_2, mlp.fc1, mlp.fc2}` and `trunk.post_trunk_norm`; an
attentive probe (models/probe.py) onto its `head.{bn, cls_token, k, v, linear}`. Conv kernels
go HWIO -> OIHW, dense kernels (in, out) -> (out, in), LayerNorm scale -> weight; the stacked
block axis is split into `blocks.{i}`. q/k/v share one linear in both layouts, in (3, heads,
head dim) order, so nothing is permuted. ml-aim released no pretraining head, so ours is not
exported.
"""

from typing import Any, Optional

import numpy as np

_BLOCK = {"norm_1": "norm_1", "qkv": "attn.qkv", "proj": "attn.proj", "norm_2": "norm_2", "fc1": "mlp.fc1",
          "fc2": "mlp.fc2"}


def _linear_or_norm(prefix: str, p: dict) -> dict[str, np.ndarray]:
  out = {}
  for name, value in p.items():
    value = np.asarray(value, np.float32)
    if name == "kernel":
      out[f"{prefix}.weight"] = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
    elif name == "scale":
      out[f"{prefix}.weight"] = value
    else:
      out[f"{prefix}.{name}"] = value
  return out


def to_ml_aim(trunk: dict, probe: Optional[dict] = None, depth: Optional[int] = None) -> dict[str, np.ndarray]:
  """Pure-dict params of aim.Model.trunk (and of a probe.AttentiveProbe) -> ml-aim state dict."""
  out = {**_linear_or_norm("preprocessor.patchifier.proj", trunk["proj"]),
         **_linear_or_norm("preprocessor.patchifier.norm", trunk["patch_norm"]),
         **_linear_or_norm("trunk.post_trunk_norm", trunk["post_trunk_norm"])}
  depth = depth or len(np.asarray(trunk["blocks"]["qkv"]["kernel"]))
  for i in range(depth):
    for ours, theirs in _BLOCK.items():
      layer = {k: np.asarray(v)[i] for k, v in trunk["blocks"][ours].items()}
      out.update(_linear_or_norm(f"trunk.blocks.{i}.{theirs}", layer))
  if probe is not None:
    out["head.cls_token"] = np.asarray(probe["query"], np.float32)
    for name in ("k", "v", "linear"):
      out.update(_linear_or_norm(f"head.{name}", probe[name]))
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def probe_buffers(probe_state: Any) -> dict[str, np.ndarray]:
  """The probe's BatchNorm running statistics under ml-aim's buffer names."""
  bn = probe_state["bn"]
  return {"head.bn.running_mean": np.asarray(bn["mean"], np.float32),
          "head.bn.running_var": np.asarray(bn["var"], np.float32)}


def save_safetensors(state: dict[str, np.ndarray], path: str) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(state, path, metadata={"format": "pt"})
