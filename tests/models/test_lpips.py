"""LPIPS against a small PyTorch transcription of the same network (random weights of the real shapes)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvm_jax.models import lpips

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _random_weights(seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in lpips.weight_shapes().items():
    fan_in = int(np.prod(shape[1:]))
    scale = 0.05 if name.startswith("lin") else np.sqrt(2.0 / fan_in)
    w = rng.normal(size=shape) * scale
    out[name] = np.abs(w).astype(np.float32) if name.startswith("lin") else w.astype(np.float32)
  return out


def _torch_lpips(w, x, y):
  """The lpips package's VGG LPIPS, spelled out with torch.nn.functional (NCHW)."""
  shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
  scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

  def feats(img):
    h = ((img * 2 - 1) - shift) / scale
    taps = []
    for i in range(31):
      if f"features.{i}.weight" in w:
        h = F.relu(F.conv2d(h, torch.from_numpy(w[f"features.{i}.weight"]), torch.from_numpy(w[f"features.{i}.bias"]), padding=1))
        if i in (2, 7, 14, 21, 28):
          taps.append(h)
      elif i in (4, 9, 16, 23):
        h = F.max_pool2d(h, 2, 2)
    return taps

  total = 0
  for k, (a, b) in enumerate(zip(feats(x), feats(y))):
    a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    total = total + F.conv2d((a - b) ** 2, torch.from_numpy(w[f"lin{k}.model.1.weight"])).mean((2, 3))[:, 0]
  return total


def test_matches_the_torch_formula_and_is_a_distance():
  w = _random_weights()
  model = lpips.Model(nnx.Rngs(0), weights=w)
  rng = np.random.default_rng(1)
  x, y = (rng.random((2, 48, 48, 3), dtype=np.float32) for _ in range(2))
  ours = np.asarray(model(jnp.asarray(x), jnp.asarray(y)))
  with torch.no_grad():
    ref = _torch_lpips(w, *(torch.from_numpy(a).permute(0, 3, 1, 2) for a in (x, y))).numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-4)
  assert np.all(ours > 0)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(x), jnp.asarray(x))), 0.0, atol=1e-7)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(y), jnp.asarray(x))), ours, rtol=1e-5)


def test_wrong_weights_file_is_one_line():
  w = _random_weights()
  w["features.5.weight"] = w["features.5.weight"][:, :32]
  with pytest.raises(ValueError, match=r"features.5.weight has shape \(128, 32, 3, 3\), expected \(128, 64, 3, 3\)"):
    lpips.Model(nnx.Rngs(0), weights=w)
  del w["lin4.model.1.weight"]
  w["features.5.weight"] = _random_weights()["features.5.weight"]
  with pytest.raises(ValueError, match="missing tensor lin4.model.1.weight"):
    lpips.Model(nnx.Rngs(0), weights=w)
