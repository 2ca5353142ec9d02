"""The tokenizer (models/tokenize.py): sharded fixed batches, padding, one compile, one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvm_jax.models import tokenize, vqgan
from tests.conftest import load_config

TINY = vqgan.Config(**load_config("vqgan_tiny").model)


def test_tokenizer_is_sharded_padded_and_compiled_once():
  model = vqgan.Model(TINY, rngs=nnx.Rngs(0))
  tok = tokenize.Tokenizer(model, image_size=32, batch_size=8)  # 8 fake devices, one image each
  images = np.random.default_rng(0).integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
  ids = tok.encode(images)  # 11 = a full batch and a padded one
  assert ids.shape == (11, 64) and ids.dtype == np.int32
  expected = model.encode(jnp.asarray(images, jnp.float32) / 255.0).reshape(11, 64)
  np.testing.assert_array_equal(ids, np.asarray(expected))
  np.testing.assert_array_equal(tok.encode(images[:3]), ids[:3])
  out = tok.decode(ids)
  assert out.shape == (11, 32, 32, 3) and out.dtype == np.uint8
  ref = np.round(np.asarray(model.decode(jnp.asarray(ids.reshape(11, 8, 8)))) * 255)
  assert np.abs(out.astype(int) - ref).max() <= 1
  assert tok.encode(images[:0]).shape == (0, 64) and tok.decode(ids[:0]).shape == (0, 32, 32, 3)
  programs = dict(tok._compiled)
  tok.encode(images[:5]), tok.decode(ids[:2])
  assert set(programs) == {"encode", "decode"} and tok._compiled == programs  # each compiled once
  for name, program in programs.items():  # the weights sit in the layouts the programs were compiled for
    wants = jax.tree.leaves(program.input_formats[0][0])
    chosen = [(leaf, want) for leaf, want in zip(jax.tree.leaves(tok.state), wants) if want.layout is not None]
    assert chosen and all(leaf.format.layout == want.layout for leaf, want in chosen), name
  with pytest.raises(tokenize.TokenizerError, match=r"shape \(2, 16, 16, 3\), expected \[N, 32, 32, 3\]"):
    tok.encode(images[:2, :16, :16])
  with pytest.raises(tokenize.TokenizerError, match="dtype float32, expected uint8"):
    tok.encode(images.astype(np.float32))
  with pytest.raises(tokenize.TokenizerError, match=r"outside the codebook \[0, 256\)"):
    tok.decode(np.full((1, 64), 256))
  with pytest.raises(tokenize.TokenizerError, match="not divisible by the mesh's 8 devices"):
    tokenize.Tokenizer(model, image_size=32, batch_size=6)
