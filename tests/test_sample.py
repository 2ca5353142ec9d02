"""Sampler contracts: the KV cache reproduces the full forward pass, the sliding window equals a
model with banded attention, greedy decoding equals an argmax loop, the filters keep what
they should, and generation is one compiled program."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvm_jax import sample, sharding
from lvm_jax.config import DEFAULT_RULES
from lvm_jax.kernels import attention
from lvm_jax.models import transformer

CFG = transformer.Config(d_model=64, ffn=96, layers=2, heads=4, vocab_size=50, remat="none")


def model(seed: int = 0) -> transformer.Model:
  return transformer.Model(CFG, rngs=nnx.Rngs(seed))


def jitted_decode(m: transformer.Model):
  """m.decode compiled (eager decoding op by op is slow); one program per shape."""
  graphdef, state = nnx.split(m)
  run = jax.jit(lambda state, x, pos, cache: nnx.merge(graphdef, state).decode(x, pos, cache))
  return lambda x, pos, cache: run(state, x, pos, cache)


def tokens(shape, seed=0, high=40):
  return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape), jnp.int32)


def test_cached_decoding_equals_the_full_forward_pass():
  m, x = model(), tokens((2, 12))
  full = m(x)
  cache = m.empty_cache(2, 16)
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  decode = jitted_decode(m)
  prefill, cache = decode(x[:, :7], pos[:, :7], cache)
  steps = [prefill]
  for t in range(7, 12):  # one token at a time after the prefill
    logits, cache = decode(x[:, t:t + 1], pos[:, t:t + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full), atol=2e-5)


def test_fused_decoding_weights_give_the_same_logits():
  """generate decodes with q/k/v and gate/up fused (one matmul each): the same numbers."""
  m, x = model(), tokens((2, 9))
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  fused = [transformer.fuse_for_decoding(p, jnp.float32) for p in m.split_layers()]
  assert {"wqkv", "w_gate_up"} <= set(fused[0]) and not {"wq", "wk", "wv", "w_gate", "w_up"} & set(fused[0])
  plain, _ = m.decode(x, pos, m.empty_cache(2, 12))
  got, _ = m.decode(x, pos, m.empty_cache(2, 12), fused)
  np.testing.assert_allclose(np.asarray(got), np.asarray(plain), atol=1e-5)
  assert float(jnp.max(jnp.abs(plain))) > 0.1  # logits that mean something


def banded_forward(m: transformer.Model, x_BL: jax.Array, window: int) -> jax.Array:
  """The full model with each query seeing only the last `window` positions (itself included):
  what a sliding KV cache computes, at every layer."""
  L = x_BL.shape[1]
  i, j = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
  mask = ((j <= i) & (j > i - window))[None, None]
  sin, cos = transformer.rope_tables(jnp.arange(L)[None], CFG.head_dim, CFG.rope_theta)
  attend = lambda q, k, v: (attention.xla_attention(q, k, v, mask), None)
  x, _ = jax.lax.scan(lambda x, p: transformer.decoder_layer(x, p, sin, cos, attend, CFG), m._embed(x_BL),
                      m._stacked())
  return m._logits(x)


def test_sliding_window_equals_a_banded_attention_model():
  m, x = model(1), tokens((1, 14), seed=1)
  cache, decode = m.empty_cache(1, 5), jitted_decode(m)
  got = []
  for t in range(14):
    logits, cache = decode(x[:, t:t + 1], jnp.array([[t]]), cache)
    got.append(logits[0, 0])
  want = banded_forward(m, x, 5)[0]
  np.testing.assert_allclose(np.asarray(jnp.stack(got)), np.asarray(want), atol=2e-5)
  # The band matters: past the window, the unbanded model differs.
  assert not np.allclose(np.asarray(got[13]), np.asarray(m(x)[0, 13]), atol=1e-3)


def test_a_joint_cache_decodes_like_a_pair_of_arrays():
  """A GPU's layout (each layer's k and v in one array, written once a token) and the pair of
  arrays: the same logits and the same cache, through a prefill and a window that wraps."""
  m, x = model(1), tokens((2, 14), seed=1)
  pos, decode = jnp.broadcast_to(jnp.arange(14), (2, 14)), jitted_decode(m)
  logits, caches = {}, {}
  for joint in (False, True):
    cache = m.empty_cache(2, 5, joint=joint)
    steps, cache = decode(x[:, :4], pos[:, :4], cache)
    steps = [steps]
    for t in range(4, 14):
      step, cache = decode(x[:, t:t + 1], pos[:, t:t + 1], cache)
      steps.append(step)
    logits[joint], caches[joint] = jnp.concatenate(steps, axis=1), cache
  np.testing.assert_allclose(np.asarray(logits[True]), np.asarray(logits[False]), atol=1e-6)
  for (k, v), kv in zip(caches[False]["kv"], caches[True]["kv"]):
    assert kv.shape == (2, CFG.heads, 2, 5, CFG.head_dim) and k.shape == (2, CFG.heads, 5, CFG.head_dim)
    np.testing.assert_array_equal(np.asarray(kv[:, :, 0]), np.asarray(k))
    np.testing.assert_array_equal(np.asarray(kv[:, :, 1]), np.asarray(v))
  assert float(jnp.abs(caches[True]["kv"][1]).min(axis=(0, 1, 2, 4)).min()) > 0  # every slot written


def test_the_gpu_sampler_generates_what_the_cpu_sampler_does(monkeypatch):
  """On a GPU, generate decodes on a joint cache, and at batch 1 on one device on the one-token
  layers: forced here on the CPU, the same greedy tokens as the CPU's layers and cache, at batch
  1 and on a batch sharded over a mesh of 8 devices."""
  m, mesh = model(6), sharding.make_mesh(dict(ici=dict(data=2, fsdp=2, tensor=2), dcn=dict(data=1, fsdp=1, tensor=1)))
  run = lambda p: np.asarray(sample.generate(m, p, 9, jax.random.key(0), codes=40, temperature=0.0))

  def sharded(p):
    with jax.set_mesh(mesh), sharding.axis_rules(DEFAULT_RULES):
      return run(p)
  prompts = (tokens((1, 7), seed=6), tokens((4, 7), seed=7))
  want = [run(prompts[0]), sharded(prompts[1])]
  sample._generate.clear_cache()  # the program cache does not key on the backend
  monkeypatch.setattr(sample.jax, "default_backend", lambda: "gpu")
  jaxpr = str(jax.make_jaxpr(lambda p: sample.generate(m, p, 9, jax.random.key(0), codes=40, temperature=0.0))(
      prompts[0]))
  assert "optimization_barrier" in jaxpr  # the joint cache's write
  got = [run(prompts[0]), sharded(prompts[1])]
  sample._generate.clear_cache()
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_greedy_generation_equals_an_argmax_loop_over_codebook_ids():
  m, prompt = model(2), tokens((2, 6), seed=2)
  out = sample.generate(m, prompt, new_tokens=5, key=jax.random.key(0), codes=30, temperature=0.0)
  assert out.shape == (2, 1, 5) and out.dtype == jnp.int32
  seq = prompt
  graphdef, state = nnx.split(m)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  for _ in range(5):  # the full model, every token from scratch
    logits = forward(state, seq)[:, -1].at[:, 30:].set(-jnp.inf)
    seq = jnp.concatenate([seq, jnp.argmax(logits, -1)[:, None].astype(jnp.int32)], axis=1)
  np.testing.assert_array_equal(np.asarray(out[:, 0]), np.asarray(seq[:, 6:]))


def test_filters_keep_what_they_should():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05, 0.9]]))
  kept = lambda **kw: np.isfinite(np.asarray(sample.filter_logits(logits, codes=5, **kw)))[0].tolist()
  assert kept() == [True] * 5 + [False]  # id 5 is not a codebook id, however likely
  assert kept(top_k=2) == [True, True, False, False, False, False]
  # Renormalised over the codes: 0.5, 0.2, 0.15, 0.1, 0.05 -> top_p 0.6 needs the first two.
  assert kept(top_p=0.6) == [True, True, False, False, False, False]
  assert kept(top_p=0.01) == [True, False, False, False, False, False]


def test_sampling_is_seeded_in_codes_and_compiled_once():
  m, prompt = model(3), tokens((2, 4), seed=3)
  run = lambda key, **kw: np.asarray(sample.generate(m, prompt, 8, jax.random.key(key), codes=7, **kw))
  a, b, c = run(0, candidates=3), run(0, candidates=3), run(1, candidates=3)
  assert a.shape == (2, 3, 8) and a.max() < 7 and a.min() >= 0
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) and not np.array_equal(a[:, 0], a[:, 1])  # keys and candidates differ
  before = sample._generate._cache_size()
  run(2, candidates=3)
  assert sample._generate._cache_size() == before  # a new key reuses the compiled program
  jaxpr = str(jax.make_jaxpr(lambda p: sample.generate(m, p, 8, jax.random.key(0), codes=7))(prompt))
  assert "scan" in jaxpr


def test_sharded_generation_matches_one_device():
  mesh = sharding.make_mesh(dict(ici=dict(data=2, fsdp=2, tensor=2), dcn=dict(data=1, fsdp=1, tensor=1)))
  m, prompt = model(4), tokens((4, 5), seed=4)
  one = sample.generate(m, prompt, 6, jax.random.key(0), codes=40, temperature=0.0)
  with jax.set_mesh(mesh), sharding.axis_rules(DEFAULT_RULES):
    many = sample.generate(m, prompt, 6, jax.random.key(0), codes=40, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(one), np.asarray(many))


def test_candidates_share_their_prompts_prefill():
  """A prompt's candidates continue one prefill (its cache repeated): greedily they are the same
  tokens as the prompt repeated, on one device and under a mesh whose batch axis is larger than
  the number of prompts."""
  m, prompt = model(5), tokens((1, 5), seed=5)
  repeated = np.asarray(sample.generate(m, np.repeat(prompt, 4, axis=0), 6, jax.random.key(0), codes=40,
                                        temperature=0.0))[:, 0]
  shared = np.asarray(sample.generate(m, prompt, 6, jax.random.key(0), codes=40, temperature=0.0, candidates=4))[0]
  np.testing.assert_array_equal(shared, repeated)
  mesh = sharding.make_mesh(dict(ici=dict(data=2, fsdp=2, tensor=2), dcn=dict(data=1, fsdp=1, tensor=1)))
  with jax.set_mesh(mesh), sharding.axis_rules(DEFAULT_RULES):
    many = sample.generate(m, prompt, 6, jax.random.key(0), codes=40, temperature=0.0, candidates=4)
  np.testing.assert_array_equal(np.asarray(many)[0], repeated)


def test_bad_sampling_arguments_are_one_line():
  m, prompt = model(), tokens((1, 3))
  with pytest.raises(ValueError, match="codes=51 exceeds the model's vocabulary of 50"):
    sample.generate(m, prompt, 2, jax.random.key(0), codes=51)
  with pytest.raises(ValueError, match="top_p=0.0"):
    sample.generate(m, prompt, 2, jax.random.key(0), codes=5, top_p=0.0)
  with pytest.raises(ValueError, match="new_tokens=0"):
    sample.generate(m, prompt, 0, jax.random.key(0), codes=5)


def model_with_norm_scales(cfg: transformer.Config = CFG) -> transformer.Model:
  """Norm scales away from their initial ones, so that folding them into weights shows."""
  m = transformer.Model(cfg, rngs=nnx.Rngs(0))
  for i, w in enumerate((m.layers.attn_norm, m.layers.mlp_norm, m.final_norm)):
    w.set_value(w[...] * (1 + 0.3 * jax.random.normal(jax.random.key(i), w.shape)))
  return m


def decode_steps(m: transformer.Model, x_1L: jax.Array, prefill: int, dtype, vector: bool) -> jax.Array:
  """Logits of tokens prefill.. of x, one token a step after a prefill: on the plain layers, or
  (vector) on fuse_for_decoding's one-token weights in `dtype` (transformer._vector_layer)."""
  pos = jnp.arange(x_1L.shape[1])[None]
  layers = None
  if vector:
    layers = [transformer.fuse_for_decoding(p, jnp.dtype(dtype), vector=True) for p in m.split_layers()]
  head = transformer.fuse_head_for_decoding(m.lm_head[...], m.final_norm[...], jnp.dtype(dtype)) if vector else None
  _, cache = m.decode(x_1L[:, :prefill], pos[:, :prefill], m.empty_cache(1, x_1L.shape[1] + 4))
  steps = []
  for t in range(prefill, x_1L.shape[1]):
    logits, cache = m.decode(x_1L[:, t:t + 1], pos[:, t:t + 1], cache, layers, head)
    steps.append(logits)
  return jnp.concatenate(steps, axis=1)


def test_vector_decoding_weights_give_the_same_logits():
  """One token on one GPU decodes on [out, in] weights (transformer._vector_layer), with the
  norms folded into the products and the residual adds inside them: the same logits as the
  plain layer, token after token; more than one token is refused."""
  m, x = model_with_norm_scales(), tokens((1, 9))
  vec = [transformer.fuse_for_decoding(p, jnp.float32, vector=True) for p in m.split_layers()]
  assert "wqkv_GD" in vec[0] and not {"wq", "wo", "w_down", "attn_norm"} & set(vec[0])
  want, got = (decode_steps(m, x, 6, jnp.float32, v) for v in (False, True))
  assert got.dtype == want.dtype == jnp.float32 and got.shape == want.shape == (1, 3, CFG.vocab_size)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  assert float(jnp.max(jnp.abs(want))) > 0.1
  with pytest.raises(ValueError, match="one token of one sequence"):
    m.decode(x[:, :2], jnp.arange(2)[None], m.empty_cache(1, 12), vec)


def test_vector_decoding_in_bf16_is_as_close_to_fp32_as_the_plain_layer():
  """bf16 weights and activations: folding the norms into the products and summing residuals
  inside them keeps the logits at least as close to the fp32 model's as the plain layer's."""
  m, x = model_with_norm_scales(dataclasses.replace(CFG, dtype="bfloat16")), tokens((1, 14))
  m32 = model_with_norm_scales()
  want = np.asarray(decode_steps(m32, x, 8, jnp.float32, False))
  err = {v: np.abs(np.asarray(decode_steps(m, x, 8, jnp.bfloat16, v)) - want).max() for v in (False, True)}
  assert 0 < err[True] <= 1.25 * err[False], err
