"""Hugging Face LlamaForCausalLM directories both ways: from_pretrained loads our export with the
same logits, generation stays in the codebook, import of a transformers-made model, exact round
trip, and a training checkpoint exported."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvm_jax import load, train
from lvm_jax.convert import hf_llama
from lvm_jax.models import transformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# head_dim 100 (the LVM 3B: d_model 3200, 32 heads) and a vocabulary that is no power of two.
CFG = transformer.Config(d_model=200, ffn=256, layers=2, heads=2, vocab_size=101, remat="none")


def random_params(cfg: transformer.Config, seed: int = 0) -> dict:
  return nnx.to_pure_dict(nnx.state(transformer.Model(cfg, rngs=nnx.Rngs(seed)), nnx.Param))


def logits(cfg: transformer.Config, params: dict, tokens: np.ndarray) -> np.ndarray:
  model = transformer.Model(cfg, rngs=nnx.Rngs(0))
  nnx.update(model, params)
  with jax.default_matmul_precision("highest"):
    return np.asarray(model(jnp.asarray(tokens)))


def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
  params = random_params(CFG)
  hf_llama.save_pretrained(params, CFG, str(tmp_path), codes=90, step=123)
  hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()  # the step's key does not bother it
  assert hf_llama.exported_step(str(tmp_path)) == 123
  tokens = np.random.default_rng(0).integers(0, 90, (2, 17))
  with torch.no_grad():
    ref = hf(torch.from_numpy(tokens)).logits.numpy()
  np.testing.assert_allclose(logits(CFG, params, tokens), ref, atol=1e-4, rtol=1e-4)
  # generation_config.json keeps sampling inside the codebook, whatever the logits prefer.
  gen = json.load(open(tmp_path / "generation_config.json"))
  assert gen["suppress_tokens"] == list(range(90, 101)) and gen["pad_token_id"] == 90
  with torch.no_grad():
    hf.lm_head.weight[90:] += 50.0  # ids past the codebook now win every argmax
    out = hf.generate(torch.from_numpy(tokens[:, :4]), max_new_tokens=6, do_sample=True, top_k=0)
  assert out.shape == (2, 10) and int(out[:, 4:].max()) < 90


def test_transformers_model_imports_exactly(tmp_path):
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama.hf_config(CFG))).eval()
  hf.save_pretrained(str(tmp_path), safe_serialization=True)
  cfg, params = hf_llama.load_pretrained(str(tmp_path))
  assert (cfg.d_model, cfg.heads, cfg.head_dim, cfg.vocab_size, cfg.layers) == (200, 2, 100, 101, 2)
  tokens = np.random.default_rng(1).integers(0, 101, (1, 13))
  with torch.no_grad():
    ref = hf(torch.from_numpy(tokens)).logits.numpy()
  np.testing.assert_allclose(logits(cfg, params, tokens), ref, atol=1e-4, rtol=1e-4)
  # Export of the import gives back the transformers tensors bit for bit.
  theirs = {k: v.numpy() for k, v in hf.state_dict().items()}
  for name, value in hf_llama.to_hf(params, cfg).items():
    np.testing.assert_array_equal(value, theirs[name])


def test_round_trip_is_exact(tmp_path):
  params = random_params(CFG, seed=3)
  hf_llama.save_pretrained(params, CFG, str(tmp_path), codes=101)
  cfg, back = hf_llama.load_pretrained(str(tmp_path))
  assert cfg == CFG
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.slow  # ~16 s: a training run first
def test_training_checkpoint_exports(tiny_config, tmp_path):
  tiny_config.steps, tiny_config.optim.warmup = 2, 1
  train.train(tiny_config, str(tmp_path / "run"))
  cfg, params, step = load.load_params(tiny_config, str(tmp_path / "run"))
  assert step == 2
  hf_llama.save_pretrained(params, cfg, str(tmp_path / "hf"), codes=32)
  hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  tokens = np.arange(12)[None] % 32
  with torch.no_grad():
    ref = hf(torch.from_numpy(tokens)).logits.numpy()
  np.testing.assert_allclose(logits(cfg, params, tokens), ref, atol=1e-4, rtol=1e-4)


def test_unreadable_directories_are_one_line(tmp_path):
  with pytest.raises(hf_llama.HFError, match="no readable config.json"):
    hf_llama.load_pretrained(str(tmp_path))
  hf_llama.save_pretrained(random_params(CFG), CFG, str(tmp_path), codes=90)
  os.rename(tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin")
  with pytest.raises(hf_llama.HFError, match="no .safetensors weights"):
    hf_llama.load_pretrained(str(tmp_path))
