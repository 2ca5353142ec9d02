"""lvm_jax transformer params <-> Hugging Face LlamaForCausalLM state dicts (numpy, no torch).

The table is the one in models/transformer.py's docstring: renames, a transpose for every
matrix, a reshape for the per-head q/k/v/o layouts, and a split along the stacked layer axis.
Both layouts use rotate-half RoPE, so no permutation of q/k is needed.
"""

from typing import Any

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
