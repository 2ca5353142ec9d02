"""Numerical contracts of the LVM transformer: sizes, causality, packing, remat, HF parity."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvm_jax import models
from lvm_jax.models import transformer
from tests.conftest import load_config

# Parameter counts of the LVM release's sizes (shared/reference/lvm.md).
EXPECTED = {"lvm_100m": 117e6, "lvm_300m": 291e6, "lvm_600m": 648e6, "lvm_1b": 1.15e9,
            "lvm_3b": 3.27e9, "lvm_7b": 6.54e9}

SMALL = transformer.Config(d_model=64, ffn=96, layers=3, heads=4, vocab_size=97, remat="none")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_param_counts_match_the_release(name):
  cfg = transformer.Config(**load_config(name).model)
  count = models.count_params(models.abstract(transformer, cfg))
  assert abs(count - EXPECTED[name]) / EXPECTED[name] < 0.005, (name, count)


def _model(cfg=SMALL, seed=0):
  return transformer.Model(cfg, rngs=nnx.Rngs(seed))


def _tokens(shape, vocab=SMALL.vocab_size, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def test_future_tokens_never_change_past_logits():
  """Causality through Model.__call__, long enough (600 > the 256-query chunk) for the chunked
  attention path: changing tokens after t leaves logits up to t bit-identical."""
  model = _model(dataclasses.replace(SMALL, layers=2))
  tokens = _tokens((1, 600))
  base = np.asarray(model(tokens))
  for t in (0, 255, 256, 400):
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 1) % SMALL.vocab_size)
    out = np.asarray(model(changed))
    np.testing.assert_array_equal(out[:, :t + 1], base[:, :t + 1])
    assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-4


def test_packed_sentences_equal_separate_runs():
  """Two sentences packed in one row give the logits of each sentence run alone."""
  model = _model()
  a, b = _tokens((1, 7), seed=2), _tokens((1, 9), seed=3)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[1] * 7 + [2] * 9])
  pos = jnp.array([list(range(7)) + list(range(9))])
  out = model(packed, seg, pos)
  np.testing.assert_allclose(out[:, :7], model(a), atol=1e-5)
  np.testing.assert_allclose(out[:, 7:], model(b), atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_recompute_without_changing_numbers(policy):
  tokens = _tokens((2, 16))
  losses, grads = {}, {}
  for p in ("none", policy):
    g, params = nnx.split(_model(dataclasses.replace(SMALL, remat=p)))
    loss = lambda prm, g=g: nnx.merge(g, prm)(tokens).astype(jnp.float32).var()
    # The flag really flips: only the remat variants put a checkpoint (remat) in the graph.
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (p != "none")
    losses[p], grads[p] = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(losses["none"], losses[policy], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[policy]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("policy", ["none", "full"])
def test_unrolled_layers_equal_the_scan(policy):
  """scan_layers=False runs the same layers, one copy each: same loss and gradients."""
  tokens = _tokens((2, 16))
  out = {}
  for scan in (True, False):
    g, params = nnx.split(_model(dataclasses.replace(SMALL, remat=policy, scan_layers=scan)))
    loss = lambda prm, g=g: nnx.merge(g, prm)(tokens).astype(jnp.float32).var()
    assert (" scan[" in str(jax.make_jaxpr(loss)(params))) == scan  # the flag really flips
    out[scan] = jax.jit(jax.value_and_grad(loss))(params)
  for a, b in zip(jax.tree.leaves(out[True]), jax.tree.leaves(out[False]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_tracks_float32():
  tokens = _tokens((2, 16))
  f32 = _model()(tokens)
  bf16 = _model(dataclasses.replace(SMALL, dtype="bfloat16"))(tokens)
  assert bf16.dtype == jnp.float32  # logits leave the bf16 network in fp32 for the loss
  err = np.abs(np.asarray(bf16, np.float32) - np.asarray(f32)).max()
  assert err < 0.05 * np.abs(np.asarray(f32)).max()


def test_params_are_float32_with_logical_axes():
  state = nnx.state(_model(), nnx.Param)
  for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    assert var[...].dtype == jnp.float32
    assert len(var.get_metadata()["axes"]) == var[...].ndim


def test_matches_hf_llama_in_float32():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from lvm_jax.convert import hf_llama  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(SMALL, layers=2)
  model = _model(cfg)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama.hf_config(cfg)))
  state = {k: torch.from_numpy(v.copy()) for k, v in hf_llama.to_hf(params, cfg).items()}
  missing, unexpected = hf.load_state_dict(state, strict=False)
  assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
  tokens = np.asarray(_tokens((2, 20)))
  with torch.no_grad():
    ref = hf.float().eval()(torch.from_numpy(tokens).long()).logits.numpy()
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(model(jnp.asarray(tokens)))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
  # And back: the inverse table restores every array exactly.
  back = hf_llama.from_hf(hf_llama.to_hf(params, cfg), cfg)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_flash_kernel_gives_the_xla_model():
  """The whole decoder with the Pallas kernel (interpret mode) against the XLA attention: logits
  and gradients of a packed row, remat and scan over layers included."""
  tokens = _tokens((2, 40), seed=5)
  seg = jnp.array([[1] * 15 + [2] * 25, [1] * 33 + [0] * 7])
  pos = jnp.array([list(range(15)) + list(range(25)), list(range(33)) + list(range(7))])
  out = {}
  for impl in ("xla", "flash:cpu"):
    g, params = nnx.split(_model(dataclasses.replace(SMALL, remat="full", attention=impl)))
    loss = lambda prm, g=g: jnp.mean(jnp.square(nnx.merge(g, prm)(tokens, seg, pos).astype(jnp.float32)))
    out[impl] = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(out["xla"][0], out["flash:cpu"][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out["xla"][1]), jax.tree.leaves(out["flash:cpu"][1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_loss_counts_only_targets_within_a_sentence():
  """Padding and the first token of each sentence are never targets; z-loss adds z * log(Z)^2."""
  cfg = transformer.Config(d_model=32, ffn=64, layers=1, heads=2, vocab_size=50)
  graphdef, params = nnx.split(transformer.Model(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50, (1, 10)).astype(np.int32)
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0, 0]])
  pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0, 0, 0]])
  mask = np.array([[1, 1, 0, 1, 1, 1, 1, 0, 0, 0]])  # token 2 is a prompt: not a target
  batch = lambda t: {"tokens": jnp.asarray(t), "segment_ids": jnp.asarray(seg),
                     "positions": jnp.asarray(pos), "loss_mask": jnp.asarray(mask)}
  z = 0.01
  total, sums = transformer.loss(nnx.merge(graphdef, params), batch(tokens), z_loss=z)
  nll, weight = sums["loss"], sums["targets"]
  logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos)),
                      np.float64)[0]
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  targets = [1, 3, 5, 6]  # positions predicted from the previous token of the same sentence
  expected_nll = sum(log_z[t - 1] - logits[t - 1, tokens[0, t]] for t in targets)
  assert float(weight) == len(targets) and int(sums["input_errors"]) == 0
  np.testing.assert_allclose(float(nll), expected_nll, rtol=1e-5)
  np.testing.assert_allclose(float(total), expected_nll + z * sum(log_z[t - 1] ** 2 for t in targets),
                             rtol=1e-5)
  garbage = tokens.copy()
  garbage[0, 7:] = 49  # padding content must not matter
  np.testing.assert_allclose(float(transformer.loss(nnx.merge(graphdef, params), batch(garbage))[1]["loss"]),
                             float(nll), rtol=1e-6)


def test_train_flops_are_six_per_matmul_param_plus_causal_attention():
  c = load_config("lvm_7b")
  cfg = transformer.Config(**c.model)
  matmul_params = models.count_params(models.abstract(transformer, cfg)) - cfg.vocab_size * cfg.d_model - cfg.d_model * (2 * cfg.layers + 1)
  expected = 6 * matmul_params + 6 * cfg.layers * c.seq_len * cfg.d_model
  assert transformer.train_flops_per_token(cfg, c.seq_len) == expected
  assert transformer.flops_per_step(c) == expected * c.seq_len * c.global_batch
