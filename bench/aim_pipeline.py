"""Images/s of AIM's input pipeline (read JPEG, decode, random resized crop to 224, flip), local
and gs://, by decode threads.

  python bench/aim_pipeline.py [--images 256 --batch 32 --batches 16]

Writes ImageNet-like JPEGs (about 500 x 375, quality 90, cut from scikit-image's pictures) to a
local folder and to a fake-gcs-server bucket on 127.0.0.1 (tests/gcs.py), then times batches of
data/aim_images.py with 1 thread and with more. Prints images/s, the ratio of threads to one
thread, and how many such cores one v5p host (4 chips) would need to feed AIM-600M at 40% MFU.
"""

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import tensorstore as ts  # noqa: E402

from lvm_jax import config as config_lib  # noqa: E402
from lvm_jax.data import aim_images, images, store  # noqa: E402
from lvm_jax.models import aim  # noqa: E402
from tests import gcs  # noqa: E402

V5P_BF16_FLOPS, CHIPS_PER_HOST, MFU = 459e12, 4, 0.4


def write(root: str, count: int, seed: int = 0) -> None:
  import skimage.data  # pylint: disable=g-import-not-at-top
  pics = [np.asarray(PIL.Image.fromarray(getattr(skimage.data, n)()).convert("RGB")) for n in images.TRAIN]
  kv = ts.KvStore.open(store.kvstore(root)).result()
  rng = np.random.default_rng(seed)
  for i in range(count):
    pic = pics[i % len(pics)]
    w, h = (500, 375) if rng.random() < 0.7 else (375, 500)
    y, x = rng.integers(0, pic.shape[0] // 3), rng.integers(0, pic.shape[1] // 3)
    img = PIL.Image.fromarray(pic[y:, x:]).resize((w, h), PIL.Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    kv.write(f"n{i % 10:02d}/{i:05d}.jpg", buf.getvalue()).result()


def images_per_second(root: str, threads: int, batch: int, batches: int) -> float:
  c = config_lib.aim_config(width=1024, depth=24, heads=8)
  c.data.source, c.data.threads, c.global_batch = dict(kind="image_folder", root=root), threads, batch
  it = aim_images.make_iterator(c, np.arange(batch))
  next(it)  # listing, thread start-up
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - t0
  # Cancel the prefetched reads and let the few in flight finish: left running, they would slow
  # the next measurement and, once the GCS server is stopped, retry for minutes while the
  # interpreter's exit waits for their threads.
  it.close()
  time.sleep(1.0)
  return batch * batches / seconds


def host_demand() -> float:
  """Images/s one v5p host consumes pretraining AIM-600M (trunk + head FLOPs) at MFU."""
  c = config_lib.load_file(str(Path(__file__).resolve().parents[1] / "configs/aim_600m.py"))
  per_image = aim.train_flops_per_image(aim.Config(**c.model))
  return CHIPS_PER_HOST * V5P_BF16_FLOPS * MFU / per_image


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=256)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--batches", type=int, default=16)
  args = p.parse_args()
  cores = os.cpu_count() or 1
  demand = host_demand()
  print(f"AIM input at 224 px from {args.images} JPEGs of ~500x375, batch {args.batch}, {cores} CPU cores; "
        f"one v5p host pretraining AIM-600M at {MFU:.0%} MFU eats {demand:.0f} images/s")
  with tempfile.TemporaryDirectory() as tmp, gcs.local_and_emulated(Path(tmp), "jpegs") as roots:
    os.makedirs(roots["local"])
    for where, root in roots.items():
      write(root, args.images)
      one = images_per_second(root, 1, args.batch, args.batches)
      for threads in (1, cores, 4 * cores):
        ips = one if threads == 1 else images_per_second(root, threads, args.batch, args.batches)
        per_core = ips / min(threads, cores)
        print(f"{where:9s} threads {threads:3d}: {ips:7.1f} images/s ({ips / one:4.2f}x one thread, "
              f"{per_core:6.1f}/core busy: {demand / per_core:4.1f} such cores feed a v5p host)")

if __name__ == "__main__":
  main()
