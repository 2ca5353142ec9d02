"""lvm_jax transformer params <-> Hugging Face LlamaForCausalLM (numpy and safetensors, no torch).

The table is the one in models/transformer.py's docstring: renames, a transpose for every
matrix, a reshape for the per-head q/k/v/o layouts, and a split along the stacked layer axis.
Both layouts use rotate-half RoPE, so no permutation of q/k is needed.

  # a training workdir -> a directory LlamaForCausalLM.from_pretrained loads
  python -m lvm_jax.convert.hf_llama --config configs/lvm_7b.py --workdir W --out /tmp/lvm_hf --codes 8192

`save_pretrained` writes model.safetensors, config.json and a generation_config.json that keeps
`generate` inside the VQGAN's codebook (suppress_tokens = the ids past it, as the release's
generation does). `load_pretrained` reads such a directory back, sharded safetensors included,
so the released Emma02/LVM_ckpts can be prompted in JAX; pickled .bin checkpoints are not read:
re-save them with transformers (`save_pretrained(safe_serialization=True)`) if you trust them.
"""

import json
import os
from typing import Any, Optional

import numpy as np

from lvm_jax.models import transformer

_MLP = {"w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
_ATTN = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj"}


def hf_config(cfg: transformer.Config, max_positions: int = 4096) -> dict[str, Any]:
  """Keyword arguments for transformers.LlamaConfig describing the same network."""
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn,
              num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
              num_key_value_heads=cfg.heads, head_dim=cfg.head_dim, hidden_act="silu",
              max_position_embeddings=max_positions, rms_norm_eps=cfg.norm_eps,
              rope_theta=cfg.rope_theta, tie_word_embeddings=False, attention_bias=False,
              mlp_bias=False)


def to_hf(params: dict, cfg: transformer.Config) -> dict[str, np.ndarray]:
  """Pure-dict params (from nnx.to_pure_dict) -> HF state dict of float32 numpy arrays."""
  p = {k: np.asarray(v, np.float32) for k, v in params["layers"].items()}
  D, HK = cfg.d_model, cfg.heads * cfg.head_dim
  out = {"model.embed_tokens.weight": np.asarray(params["embed"], np.float32),
         "model.norm.weight": np.asarray(params["final_norm"], np.float32),
         "lm_head.weight": np.asarray(params["lm_head"], np.float32).T}
  for i in range(cfg.layers):
    pre = f"model.layers.{i}."
    out[pre + "input_layernorm.weight"] = p["attn_norm"][i]
    out[pre + "post_attention_layernorm.weight"] = p["mlp_norm"][i]
    for ours, theirs in _ATTN.items():
      out[pre + theirs + ".weight"] = p[ours][i].reshape(D, HK).T
    out[pre + "self_attn.o_proj.weight"] = p["wo"][i].reshape(HK, D).T
    for ours, theirs in _MLP.items():
      out[pre + theirs + ".weight"] = p[ours][i].T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_hf(state: dict[str, np.ndarray], cfg: transformer.Config) -> dict:
  """HF state dict -> pure-dict params with stacked layers; the inverse of `to_hf`."""
  D, H, K = cfg.d_model, cfg.heads, cfg.head_dim
  layer = lambda i, name: np.asarray(state[f"model.layers.{i}.{name}.weight"], np.float32)
  stack = lambda fn: np.stack([fn(i) for i in range(cfg.layers)])
  layers = {"attn_norm": stack(lambda i: layer(i, "input_layernorm")),
            "mlp_norm": stack(lambda i: layer(i, "post_attention_layernorm")),
            "wo": stack(lambda i: layer(i, "self_attn.o_proj").T.reshape(H, K, D))}
  for ours, theirs in _ATTN.items():
    layers[ours] = stack(lambda i, t=theirs: layer(i, t).T.reshape(D, H, K))
  for ours, theirs in _MLP.items():
    layers[ours] = stack(lambda i, t=theirs: layer(i, t).T)
  return {"embed": np.asarray(state["model.embed_tokens.weight"], np.float32),
          "final_norm": np.asarray(state["model.norm.weight"], np.float32),
          "lm_head": np.asarray(state["lm_head.weight"], np.float32).T, "layers": layers}


class HFError(ValueError):
  """A Hugging Face directory that cannot be read as a LLaMA LVM; the message names the problem."""


def save_pretrained(params: dict, cfg: transformer.Config, out_dir: str, codes: int, max_positions: int = 4096,
                    step: Optional[int] = None) -> None:
  """A directory that transformers.LlamaForCausalLM.from_pretrained loads, sampling restricted to codes;
  `step`, the training step the weights come from, is kept in config.json for reports to name."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  save_file(to_hf(params, cfg), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
            "bos_token_id": None, "eos_token_id": None, **hf_config(cfg, max_positions),
            **({"lvm_jax_step": int(step)} if step is not None else {})}
  generation = {"do_sample": True, "pad_token_id": codes if codes < cfg.vocab_size else None,
                "suppress_tokens": list(range(codes, cfg.vocab_size)), "bos_token_id": None, "eos_token_id": None}
  for name, content in (("config.json", config), ("generation_config.json", generation)):
    with open(os.path.join(out_dir, name), "w") as f:
      json.dump(content, f, indent=1)


def exported_step(hf_dir: str) -> Optional[int]:
  """The training step a directory written by save_pretrained came from (None: not recorded)."""
  with open(os.path.join(hf_dir, "config.json")) as f:
    return json.load(f).get("lvm_jax_step")


def load_pretrained(hf_dir: str, dtype: str = "float32") -> tuple[transformer.Config, dict]:
  """(model config, pure-dict params) from a LlamaForCausalLM directory with safetensors weights."""
  from lvm_jax.convert import load_float32  # pylint: disable=g-import-not-at-top
  try:
    with open(os.path.join(hf_dir, "config.json")) as f:
      c = json.load(f)
  except OSError as e:
    raise HFError(f"{hf_dir}: no readable config.json ({e.strerror})") from None
  heads = c["num_attention_heads"]
  if c.get("num_key_value_heads", heads) != heads:
    raise HFError(f"{hf_dir}: grouped-query attention ({c['num_key_value_heads']} kv heads) is not an LVM layout")
  if c.get("head_dim", c["hidden_size"] // heads) * heads != c["hidden_size"]:
    raise HFError(f"{hf_dir}: head_dim x heads != hidden_size")
  cfg = transformer.Config(d_model=c["hidden_size"], ffn=c["intermediate_size"], layers=c["num_hidden_layers"],
                           heads=heads, vocab_size=c["vocab_size"], rope_theta=c.get("rope_theta", 1e4),
                           norm_eps=c.get("rms_norm_eps", 1e-6), dtype=dtype, remat="none")
  files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
  if not files:
    raise HFError(f"{hf_dir}: no .safetensors weights (pickled .bin files are not read; see this module's doc)")
  state = {}
  for f in files:
    state.update(load_float32(os.path.join(hf_dir, f)))  # bf16 or fp16 releases too
  try:
    return cfg, from_hf(state, cfg)
  except KeyError as e:
    raise HFError(f"{hf_dir}: missing tensor {e.args[0]}") from None


def cli_main() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from lvm_jax import cli, config as config_lib, load, models  # pylint: disable=g-import-not-at-top
  config = cli.define_config()  # default: the workdir's own config.json
  workdir = flags.DEFINE_string("workdir", None, "Training workdir whose newest checkpoint is exported.")
  out = flags.DEFINE_string("out", None, "Output directory for LlamaForCausalLM.from_pretrained.")
  codes = flags.DEFINE_integer("codes", 8192, "VQGAN codebook size: generation never leaves [0, codes).")

  def main(_):
    c = config.value or config_lib.load_from_workdir(workdir.value)
    if config_lib.model_module(c) is not transformer:
      raise config_lib.ConfigError(f"{workdir.value}: model_name={c.get('model_name')!r}, not an LVM workdir")
    model_cfg, params, step = load.load_params(c, workdir.value)
    save_pretrained(params, model_cfg, out.value, codes.value, c.seq_len, step)
    count = models.count_params(models.abstract(transformer, model_cfg))
    print(f"step {step} of {workdir.value} -> {out.value} (LlamaForCausalLM, {count:,} params)")

  cli.run(main, required=["workdir", "out"])


if __name__ == "__main__":
  cli_main()
