"""Sampling from the LVM: jitted prefill + decode over a KV cache, one compiled program per shape.

  tokens = sample.generate(model, prompt_BL, new_tokens=256, key=key, codes=8192, top_k=100)

The prompt is prefilled in one pass; new tokens come from a `lax.scan` (no Python per token),
each drawn from the logits restricted to the VQGAN's codebook ids (the LVM's extra vocabulary
ids never appear in an image), with temperature, top-k and top-p. `candidates` draws several
continuations of every prompt in one batch. `window` bounds the KV cache: a query then sees only
the last `window` positions, which lets a video run past the training length (a sliding context).
Under a mesh (jax.set_mesh + sharding.axis_rules) the batch and the cache are sharded like the
trainer's activations.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from lvm_jax.models import transformer


def filter_logits(logits_BV: jax.Array, codes: int, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """fp32 logits with ids >= codes, those outside the top k, and those past cumulative
  probability top_p (the most likely id always stays) set to -inf."""
  logits_BV = logits_BV.astype(jnp.float32)
  ids = jnp.arange(logits_BV.shape[-1])
  logits_BV = jnp.where(ids < codes, logits_BV, -jnp.inf)
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep an id while the mass of the ids strictly more likely than it is below top_p.
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    cutoff_B1 = jnp.min(jnp.where(mass_before_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV >= cutoff_B1, logits_BV, -jnp.inf)
  return logits_BV


def draw(key: jax.Array, logits_BV: jax.Array, temperature: float, codes: int, top_k: int, top_p: float) -> jax.Array:
  logits_BV = filter_logits(logits_BV, codes, top_k, top_p)
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits_BV / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "new_tokens", "codes", "temperature", "top_k", "top_p",
                                             "candidates", "window"))
def _generate(graphdef, params, prompt_BL, key, *, new_tokens, codes, temperature, top_k, top_p, candidates,
              window):
  model = nnx.merge(graphdef, params)
  P, L = prompt_BL.shape
  B = P * candidates
  S = window or (L + new_tokens)
  on_gpu = jax.default_backend() == "gpu"
  cache = model.empty_cache(P, S, joint=on_gpu)
  keep = min(L, S)  # prompt tokens older than the window are never seen again
  positions_PT = jnp.broadcast_to(jnp.arange(L - keep, L), (P, keep))
  # Weights sliced, cast and fused once here, not at every token (transformer.fuse_for_decoding);
  # one token on one GPU decodes faster with them transposed (transformer._vector_layer).
  dtype = jnp.dtype(model.cfg.dtype)
  vector = B == 1 and on_gpu and jax.sharding.get_abstract_mesh().size <= 1
  layers = [transformer.fuse_for_decoding(p, dtype, vector=vector) for p in model.split_layers()]
  head_GD = transformer.fuse_head_for_decoding(model.lm_head[...], model.final_norm[...], dtype) if vector else None
  for weight in (model.embed, model.lm_head):
    weight.set_value(weight[...].astype(dtype))
  logits_PTV, cache = model.decode(prompt_BL[:, L - keep:], positions_PT, cache, None if vector else layers)
  # The candidates of a prompt share its prefill: the cache and the last logits repeat, not the work.
  cache = jax.tree.map(lambda a: jnp.repeat(a, candidates, axis=0) if a.ndim else a, cache)
  logits_BV = jnp.repeat(logits_PTV[:, -1], candidates, axis=0)
  key, sub = jax.random.split(key)
  first_B = draw(sub, logits_BV, temperature, codes, top_k, top_p)

  # Each step decodes the last token and draws the next from its logits, so the logits never
  # cross the loop boundary: their last op (the final norm's 1/rms on the vector path) fuses into
  # the draw, and no step decodes a token that nothing reads.
  def step(carry, i):
    key, token_B, cache = carry
    logits_B1V, cache = model.decode(token_B[:, None], jnp.full((B, 1), L + i, jnp.int32), cache, layers, head_GD)
    key, sub = jax.random.split(key)
    token_B = draw(sub, logits_B1V[:, 0], temperature, codes, top_k, top_p)
    return (key, token_B, cache), token_B

  _, rest_NB = jax.lax.scan(step, (key, first_B, cache), jnp.arange(new_tokens - 1))
  return jnp.concatenate([first_B[None], rest_NB]).T.reshape(P, candidates, new_tokens)


def generate(model: transformer.Model, prompt_BL: jax.Array, new_tokens: int, key: jax.Array, *, codes: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, candidates: int = 1,
             window: Optional[int] = None) -> jax.Array:
  """int32 [B, candidates, new_tokens] continuations of equal-length prompts [B, L].

  temperature 0 is greedy. codes: ids at or above it are never drawn (the VQGAN's codebook size).
  """
  if codes > model.cfg.vocab_size:
    raise ValueError(f"codes={codes} exceeds the model's vocabulary of {model.cfg.vocab_size}")
  if (top_k < 0 or not 0.0 < top_p <= 1.0 or temperature < 0 or candidates < 1 or (window is not None and window < 1)
      or new_tokens < 1):
    raise ValueError(f"sampling: temperature={temperature} (>= 0), top_k={top_k} (>= 0), top_p={top_p} "
                     f"(0 < p <= 1), candidates={candidates} (>= 1), window={window} (>= 1), "
                     f"new_tokens={new_tokens} (>= 1)")
  graphdef, params = nnx.split(model)
  return _generate(graphdef, params, jnp.asarray(prompt_BL, jnp.int32), key, new_tokens=new_tokens, codes=codes,
                   temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), candidates=candidates,
                   window=window)
