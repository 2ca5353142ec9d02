"""lvm_jax AIM params <-> ml-aim's PyTorch state-dict layout (numpy, safetensors).

  python -m lvm_jax.convert.aim_torch --workdir W --out aim.safetensors

exports a training workdir's trunk; `from_ml_aim` reads ml-aim's safetensors (apple/aim-600M
and siblings on the HF hub are saved as `model.safetensors` by their PyTorchModelHubMixin) into
our trunk and probe, which `python -m lvm_jax.evaluate --ml_aim FILE --aim_config C` probes.

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


def _from_torch(prefix: str, state: dict, norm: bool = False) -> dict[str, np.ndarray]:
  w = np.asarray(state[f"{prefix}.weight"], np.float32)
  out = {"scale": w} if norm else {"kernel": w.T if w.ndim == 2 else w.transpose(2, 3, 1, 0)}
  if f"{prefix}.bias" in state:
    out["bias"] = np.asarray(state[f"{prefix}.bias"], np.float32)
  return out


def from_ml_aim(state: dict[str, np.ndarray]) -> tuple[dict, Optional[dict]]:
  """ml-aim state dict -> (pure-dict params of aim.Model.trunk, of probe.AttentiveProbe with
  its BatchNorm statistics, or None when the file has no head); the inverse of to_ml_aim."""
  depth = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("trunk.blocks.")), default=-1)
  if depth == 0 or "preprocessor.patchifier.proj.weight" not in state:
    raise ValueError("not an ml-aim v1 state dict: no trunk.blocks.* or preprocessor.patchifier.proj.weight")
  trunk = {"proj": _from_torch("preprocessor.patchifier.proj", state),
           "patch_norm": _from_torch("preprocessor.patchifier.norm", state, norm=True),
           "post_trunk_norm": _from_torch("trunk.post_trunk_norm", state, norm=True)}
  per_block = [{ours: _from_torch(f"trunk.blocks.{i}.{theirs}", state, norm=ours.startswith("norm"))
                for ours, theirs in _BLOCK.items()} for i in range(depth)]
  trunk["blocks"] = {ours: {k: np.stack([b[ours][k] for b in per_block]) for k in per_block[0][ours]}
                     for ours in _BLOCK}
  used = {f"{p}.{w}" for p in ("preprocessor.patchifier.proj", "preprocessor.patchifier.norm", "trunk.post_trunk_norm",
                                *(f"trunk.blocks.{i}.{t}" for i in range(depth) for t in _BLOCK.values()))
          for w in ("weight", "bias")}
  # Anything else in the trunk (a learned position table, a cls token: other ml-aim settings, or
  # AIMv2's SwiGLU fc3) would be silently dropped and the features would be wrong.
  if extra := sorted(k for k in state if k not in used and not k.startswith("head.")):
    raise ValueError(f"not an ml-aim v1 trunk as lvm_jax builds it: unexpected {', '.join(extra[:3])}")
  if "head.cls_token" not in state:
    return trunk, None
  probe = {"query": np.asarray(state["head.cls_token"], np.float32),
           **{name: _from_torch(f"head.{name}", state) for name in ("k", "v", "linear")},
           "bn": {"mean": np.asarray(state["head.bn.running_mean"], np.float32),
                  "var": np.asarray(state["head.bn.running_var"], np.float32)}}
  return trunk, probe


def probe_buffers(probe_state: Any) -> dict[str, np.ndarray]:
  """The probe's BatchNorm running statistics under ml-aim's buffer names."""
  bn = probe_state["bn"]
  return {"head.bn.running_mean": np.asarray(bn["mean"], np.float32),
          "head.bn.running_var": np.asarray(bn["var"], np.float32)}


def save_safetensors(state: dict[str, np.ndarray], path: str) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(state, path, metadata={"format": "pt"})


def cli_main() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from lvm_jax import cli, config as config_lib, load  # pylint: disable=g-import-not-at-top
  from lvm_jax.models import aim  # pylint: disable=g-import-not-at-top
  workdir = flags.DEFINE_string("workdir", None, "AIM training workdir whose newest checkpoint's trunk is exported.")
  out = flags.DEFINE_string("out", None, "Output .safetensors in ml-aim's key layout.")

  def main(_):
    c = config_lib.load_from_workdir(workdir.value)
    if config_lib.model_module(c) is not aim:
      raise config_lib.ConfigError(f"{workdir.value}: model_name={c.get('model_name')!r}, not an AIM workdir")
    model_cfg, params, step = load.load_params(c, workdir.value)
    save_safetensors(to_ml_aim(params["trunk"]), out.value)
    print(f"step {step} of {workdir.value} -> {out.value} (ml-aim v1 trunk, depth {model_cfg.depth})")

  cli.run(main, required=["workdir", "out"])

if __name__ == "__main__":
  cli_main()
