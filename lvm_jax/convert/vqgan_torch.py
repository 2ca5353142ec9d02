"""lvm_jax VQGAN params <-> PyTorch state dicts, as numpy arrays: diffusers `VQModel` (amused)
and open-muse `VQGANModel` (the tokenizer the LVM release calls through `muse`).

Module names already match diffusers (models/vqgan.py), so that table is short: dotted paths,
conv kernels HWIO <-> OIHW, GroupNorm `scale` <-> `weight`, the codebook under
`quantize.embedding`. open-muse differs only in names (the renames of diffusers'
scripts/convert_amused.py), its decoder levels numbered from the output side. Files are read
and written as safetensors, never pickles.
"""

import re
from typing import Any

import numpy as np

from lvm_jax.models import vqgan

CODEBOOK = "quantize.embedding.weight"


class WeightsError(ValueError):
  """A weights file that does not fit the configured VQGAN."""


def diffusers_kwargs(cfg: vqgan.Config) -> dict[str, Any]:
  """Arguments of diffusers.VQModel for the same network as vqgan.Model(cfg)."""
  if cfg.downsample != "conv":
    raise WeightsError(f"diffusers' VQModel has no {cfg.downsample!r} downsampling (only strided convs)")
  if cfg.norm != "group":
    raise WeightsError(f"diffusers' VQModel has no norm={cfg.norm!r} (only GroupNorm over the image)")
  levels = range(len(cfg.channel_mult))
  down = tuple("AttnDownEncoderBlock2D" if i in cfg.attn_levels else "DownEncoderBlock2D" for i in levels)
  up = tuple("AttnUpDecoderBlock2D" if i in cfg.attn_levels else "UpDecoderBlock2D" for i in reversed(levels))
  return dict(down_block_types=down, up_block_types=up,
              block_out_channels=cfg.channels, layers_per_block=cfg.encoder_blocks, act_fn="silu",
              latent_channels=cfg.z_channels, num_vq_embeddings=cfg.codes, vq_embed_dim=cfg.z_channels,
              norm_num_groups=cfg.groups, mid_block_add_attention=cfg.mid_attention, lookup_from_codebook=True)


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
  """Conv HWIO -> OIHW, dense (in, out) -> (out, in); everything else as is."""
  if key.endswith(".kernel"):
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  return value


def _from_torch(key: str, value: np.ndarray) -> np.ndarray:
  if key.endswith(".kernel"):
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return value


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
    flat[key] = _from_torch(key, value)
  return _unflatten(flat)


def muse_name(name: str, levels: int) -> str:
  """diffusers VQModel name -> open-muse VQGANModel name (decoder levels counted from the output)."""
  rules = (  # mid-block resnets first, before the general resnets rule
      (r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
      (r"^(encoder|decoder)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
      (r"^encoder\.down_blocks\.(\d+)\.", lambda m: f"encoder.down.{m[1]}."),
      (r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}."),
      (r"\.resnets\.(\d+)\.", lambda m: f".block.{m[1]}."),
      (r"\.conv_shortcut\.", lambda m: ".nin_shortcut."),
      (r"\.(down|up)samplers\.0\.", lambda m: f".{m[1]}sample."),
  )
  for pattern, repl in rules:
    name = re.sub(pattern, repl, name)
  return name


def _check_muse(cfg: vqgan.Config) -> None:
  if cfg.mid_attention or cfg.attn_levels or cfg.downsample != "conv":
    raise WeightsError("the muse layout covers the amused architecture only (no attention, conv "
                       "downsampling); use the diffusers layout")


def from_muse(state: dict[str, Any], cfg: vqgan.Config) -> dict:
  """open-muse VQGANModel state dict -> pure-dict params (via the diffusers names)."""
  _check_muse(cfg)
  levels = len(cfg.channel_mult)
  abstract_names = {muse_name(n, levels): n for n in _diffusers_names(cfg)}
  return from_diffusers({abstract_names.get(k, k): v for k, v in state.items()}, cfg)


def to_muse(params: dict, cfg: vqgan.Config) -> dict[str, np.ndarray]:
  _check_muse(cfg)
  levels = len(cfg.channel_mult)
  return {muse_name(k, levels): v for k, v in to_diffusers(params).items()}


def _diffusers_names(cfg: vqgan.Config) -> list[str]:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(lambda: vqgan.Model(cfg, rngs=nnx.Rngs(0)))
  return [diffusers_name(k) for k in _flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))]


def load_safetensors(path: str, cfg: vqgan.Config, layout: str = "diffusers") -> dict:
  """Params from a safetensors file in the `diffusers` or `muse` layout."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  state = load_file(path)
  return from_muse(state, cfg) if layout == "muse" else from_diffusers(state, cfg)


def save_safetensors(params: dict, path: str, cfg: vqgan.Config, layout: str = "diffusers") -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(to_muse(params, cfg) if layout == "muse" else to_diffusers(params), path)


def cli_main() -> None:
  """Exports a VQGAN training workdir's EMA generator as a safetensors file for PyTorch."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from lvm_jax import cli, config as config_lib, load  # pylint: disable=g-import-not-at-top
  workdir = flags.DEFINE_string("workdir", None, "VQGAN training workdir whose newest checkpoint (EMA) is exported.")
  out = flags.DEFINE_string("out", None, "Output .safetensors (diffusers.VQModel's state dict, or open-muse's).")
  layout = flags.DEFINE_enum("layout", "diffusers", ["diffusers", "muse"], "Key layout of the output.")

  def main(_):
    c = config_lib.load_from_workdir(workdir.value)
    if config_lib.model_module(c) is not vqgan:
      raise config_lib.ConfigError(f"{workdir.value}: model_name={c.get('model_name')!r}, not a VQGAN workdir")
    model_cfg, params, step = load.load_params(c, workdir.value)
    save_safetensors(params, out.value, model_cfg, layout.value)
    torch_use = ("diffusers.VQModel(**diffusers_kwargs(cfg)).load_state_dict(safetensors.torch.load_file(out))"
                 if model_cfg.norm == "group" else f"diffusers has no norm={model_cfg.norm!r}: lvm_jax loads it")
    print(f"step {step} of {workdir.value} -> {out.value} ({layout.value} layout; {torch_use})")

  cli.run(main, required=["workdir", "out"])


if __name__ == "__main__":
  cli_main()
