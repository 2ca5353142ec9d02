"""LPIPS perceptual distance (VGG16 variant, Zhang et al. 2018) in Flax NNX, for VQGAN training.

Dimension letters: B batch, H W size, C channels.

d(x, y) = sum over the relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 features of VGG16 of the
spatial mean of w_l . (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2, with images scaled by the LPIPS
ScalingLayer. Weights come from a local safetensors file in torchvision + lpips names
(`features.{i}.weight`, `lin{k}.model.1.weight`); `python -m lvm_jax.convert.lpips_weights` makes
one from files a user has. Nothing is downloaded.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# torchvision vgg16.features: conv indices, with 2x2 max-pools after the taps of blocks 1-4.
_VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_TAPS = (2, 4, 7, 10, 13)  # number of convs done at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32).reshape(1, 1, 1, 3)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32).reshape(1, 1, 1, 3)


class Model(nnx.Module):
  """images in [0, 1] (two batches [B, H, W, 3]) -> LPIPS distance per image [B]."""

  def __init__(self, rngs: nnx.Rngs, weights: Optional[dict[str, np.ndarray]] = None):
    widths = (3,) + _VGG_WIDTHS
    self.convs = nnx.List([nnx.Conv(widths[i], widths[i + 1], (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
                           for i in range(len(_VGG_CONVS))])
    self.lins = nnx.List([nnx.Conv(_VGG_WIDTHS[t - 1], 1, (1, 1), use_bias=False, rngs=rngs) for t in _TAPS])
    if weights is not None:
      load(self, weights)

  def __call__(self, x_BHWC: jax.Array, y_BHWC: jax.Array) -> jax.Array:
    fx, fy = self.features(x_BHWC), self.features(y_BHWC)
    total = 0.0
    for lin, a, b in zip(self.lins, fx, fy, strict=True):
      diff = jnp.square(_unit(a) - _unit(b))
      total = total + jnp.mean(lin(diff)[..., 0], axis=(1, 2))
    return total

  def features(self, x_BHWC: jax.Array) -> list[jax.Array]:
    x = ((x_BHWC.astype(jnp.float32) * 2.0 - 1.0) - _SHIFT) / _SCALE  # [0,1] -> LPIPS input scale
    taps = []
    for i, conv in enumerate(self.convs):
      x = jax.nn.relu(conv(x))
      if i + 1 in _TAPS:
        taps.append(x)
        if i + 1 != _TAPS[-1]:
          x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    return taps


def _unit(f_BHWC: jax.Array) -> jax.Array:
  return f_BHWC / (jnp.sqrt(jnp.sum(f_BHWC * f_BHWC, axis=-1, keepdims=True)) + 1e-10)


def weight_shapes() -> dict[str, tuple[int, ...]]:
  """The tensors a weights file must hold, in PyTorch layout."""
  shapes, cin = {}, 3
  for idx, cout in zip(_VGG_CONVS, _VGG_WIDTHS, strict=True):
    shapes[f"features.{idx}.weight"], shapes[f"features.{idx}.bias"] = (cout, cin, 3, 3), (cout,)
    cin = cout
  for k, t in enumerate(_TAPS):
    shapes[f"lin{k}.model.1.weight"] = (1, _VGG_WIDTHS[t - 1], 1, 1)
  return shapes


def load(model: Model, weights: dict[str, np.ndarray]) -> None:
  """Copies torchvision/lpips-named tensors (OIHW) into the model; a wrong file fails in one line."""
  for name, shape in weight_shapes().items():
    if name not in weights:
      raise ValueError(f"LPIPS weights: missing tensor {name}")
    if tuple(weights[name].shape) != shape:
      raise ValueError(f"LPIPS weights: {name} has shape {tuple(weights[name].shape)}, expected {shape}")
  # Whole values, not [...] = : the model may be an abstract one (from_file), with no array to write into.
  for i, idx in enumerate(_VGG_CONVS):
    model.convs[i].kernel.value = jnp.asarray(weights[f"features.{idx}.weight"]).transpose(2, 3, 1, 0)
    model.convs[i].bias.value = jnp.asarray(weights[f"features.{idx}.bias"])
  for k in range(len(_TAPS)):
    model.lins[k].kernel.value = jnp.asarray(weights[f"lin{k}.model.1.weight"]).transpose(2, 3, 1, 0)


def from_file(path: str) -> Model:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  weights = load_file(path)
  # Shapes only: the file holds every parameter, and a random VGG16 init, thrown away, would take
  # ~20 s to compile on a CPU.
  model = nnx.eval_shape(lambda: Model(nnx.Rngs(0)))
  load(model, weights)
  return model
