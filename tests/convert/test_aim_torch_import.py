"""AIM weights in ml-aim's layout read back: the import inverts the export exactly (no torch needed)."""

import jax
import numpy as np
import pytest
from flax import nnx

from lvm_jax import convert
from lvm_jax.convert import aim_torch
from lvm_jax.models import aim, probe

CFG = aim.Config(width=64, depth=2, heads=4, patch=4, image_size=16, head_width=32, head_depth=1, head_mlp=64)


def test_import_inverts_export():
  model = aim.Model(CFG, rngs=nnx.Rngs(0))
  p = probe.AttentiveProbe(CFG.width, CFG.heads, 10, rngs=nnx.Rngs(1))
  p(jax.random.normal(jax.random.key(2), (4, 16, CFG.width)) + 2.0, train=True)  # non-trivial statistics
  trunk, head = nnx.to_pure_dict(nnx.state(model.trunk, nnx.Param)), nnx.to_pure_dict(nnx.state(p))
  state = {**aim_torch.to_ml_aim(trunk, head), **aim_torch.probe_buffers(head)}
  trunk_back, head_back = aim_torch.from_ml_aim(state)
  jax.tree.map(np.testing.assert_array_equal, trunk_back, jax.tree.map(np.asarray, trunk))
  jax.tree.map(np.testing.assert_array_equal, head_back, jax.tree.map(np.asarray, head))
  assert aim_torch.from_ml_aim(aim_torch.to_ml_aim(trunk))[1] is None  # a backbone-only file
  with pytest.raises(ValueError, match="not an ml-aim v1 state dict"):
    aim_torch.from_ml_aim({"model.embed_tokens.weight": np.zeros((2, 2), np.float32)})
  with pytest.raises(ValueError, match="unexpected preprocessor.pos_embed"):  # would be dropped silently
    aim_torch.from_ml_aim({**aim_torch.to_ml_aim(trunk), "preprocessor.pos_embed": np.zeros((1, 16, 64), np.float32)})


def test_safetensors_in_bfloat16_load_as_float32(tmp_path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  x = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
  try:
    save_file({"w": x.astype(ml_dtypes.bfloat16)}, str(tmp_path / "w.safetensors"))
  except Exception:  # pylint: disable=broad-except
    pytest.skip("this safetensors cannot write bfloat16 from numpy")
  got = convert.load_float32(str(tmp_path / "w.safetensors"))["w"]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, x)
