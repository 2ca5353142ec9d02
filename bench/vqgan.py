"""VQGAN encode/decode throughput: lvm_jax vs diffusers VQModel (PyTorch, CPU), one run.

  python bench/vqgan.py [--size 256 --batch 8]

Both sides run the amused f16-8192 network (configs/vqgan_f16_8192.py) with the same random
weights (converted through lvm_jax.convert.vqgan_torch), fp32, on a batch of uint8 images:
encode = images -> token ids, decode = ids -> images. Prints images/s and ratios.
Targets (issue 3): >= 1.2x for both.
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from timing import median_seconds  # noqa: E402
from flax import nnx  # noqa: E402

from lvm_jax import models  # noqa: E402
from lvm_jax.convert import vqgan_torch  # noqa: E402
from lvm_jax.models import tokenize, vqgan  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args()
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  cfg = vqgan.Config(dtype="float32")
  theirs = diffusers.VQModel(**vqgan_torch.diffusers_kwargs(cfg)).eval()
  ours = vqgan.Model(cfg, rngs=nnx.Rngs(0))
  nnx.update(ours, vqgan_torch.from_diffusers({k: v.numpy() for k, v in theirs.state_dict().items()}, cfg))
  tok = tokenize.Tokenizer(ours, args.size, args.batch, jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))

  images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
  grid = args.size // cfg.factor
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  ids = tok.encode(images)

  def torch_encode():
    with torch.no_grad():
      return theirs.quantize(theirs.encode(x).latents)[2][2]

  def torch_decode():
    with torch.no_grad():
      out = theirs.decode(torch.from_numpy(ids).long().reshape(-1), force_not_quantize=True,
                          shape=(args.batch, grid, grid, cfg.z_channels)).sample
      return (out.clamp(0, 1) * 255).round().to(torch.uint8)

  rows = [("encode", lambda: tok.encode(images), torch_encode),
          ("decode", lambda: tok.decode(ids), torch_decode)]
  print(f"amused f16-8192 VQGAN ({models.count_params(models.abstract(vqgan, cfg)) / 1e6:.1f}M params), {args.size}x{args.size}, "
        f"batch {args.batch}, fp32, {os.cpu_count()} CPU cores, jax {jax.__version__}, torch {torch.__version__}")
  for name, ours_fn, theirs_fn in rows:
    t_ours, t_theirs = median_seconds(ours_fn, args.reps), median_seconds(theirs_fn, args.reps)
    print(f"{name}: lvm_jax {args.batch / t_ours:6.2f} img/s, diffusers {args.batch / t_theirs:6.2f} img/s, "
          f"ratio {t_theirs / t_ours:.2f}x (target >= 1.2x)")


if __name__ == "__main__":
  main()
