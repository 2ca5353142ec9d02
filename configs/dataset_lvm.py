"""An LVM-style token store from your own data, one dataset per sentence type of the release.

  python -m lvm_jax.make_dataset --config configs/dataset_lvm.py \\
      --config.store=gs://BUCKET/lvm_store --config.vqgan.weights=/path/amused_vqgan.safetensors

Edit the `datasets` roots to your folders (local paths). 256x256 images, 256 tokens each, with the
release's amused f16-8192 tokenizer (weights converted by lvm_jax.convert.vqgan_torch); on a TPU
VM run it on every host (launch/tpu_pod.sh): units are dealt to processes, each encodes on its own
chips and writes its own shards, and a rerun skips finished shards. Expect the final report to
list every file that was skipped and why; the store then trains with
--config.data.mixture.main.path=gs://BUCKET/lvm_store.
"""

import os

import ml_collections

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.store = ""  # local path or gs://bucket/path
  c.image_size = 256
  c.resize = "squash"  # the release's; or center_crop
  c.batch_size = 256  # images per tokenizer call over this process's devices
  c.seed = 0
  c.items_per_shard = 4096  # source items per shard: a few hundred MB of tokens at most
  c.vqgan = dict(config=os.path.join(HERE, "vqgan_f16_8192.py"), workdir="", weights="", layout="diffusers")
  c.datasets = [
      # 16-frame clips at stride 8 from video files (tokenize_video_muse.py).
      dict(name="videos", source=dict(kind="video_files", root="/data/videos"),
           sentence=dict(kind="video_clip", n=16, strides=(8,))),
      # Frame folders, one folder per sequence, random stride 1..4 (tokenize_seq_images_muse.py).
      dict(name="sequences", source=dict(kind="frame_folders", root="/data/frames"),
           sentence=dict(kind="video_clip", n=16, strides=(1, 2, 3, 4))),
      # Image -> annotation pairs, 8 per sentence: /data/depth/{image,depth}/<stem>.png.
      dict(name="depth", source=dict(kind="aligned_folders", root="/data/depth", modalities=("image", "depth")),
           sentence=dict(kind="kshot_pairs", shots=8)),
      # Aligned modalities in a shuffled order, 3 shots (tokenize_multi_datasets_muse.py).
      dict(name="multi", source=dict(kind="aligned_folders", root="/data/multi",
                                     modalities=("image", "depth", "normal", "edge", "seg")),
           sentence=dict(kind="multi_annotation", shots=3)),
      dict(name="colorization", source=dict(kind="image_folder", root="/data/images"),
           sentence=dict(kind="colorization", shots=8)),
      dict(name="inpainting", source=dict(kind="image_folder", root="/data/images"),
           sentence=dict(kind="inpainting", shots=8)),
      # 4 classes x 4 images from class folders (ImageNet layout).
      dict(name="categories", source=dict(kind="image_folder", root="/data/imagenet/train", labels_from_dirs=True),
           sentence=dict(kind="same_category", categories=4, per_category=4)),
  ]
  return c
