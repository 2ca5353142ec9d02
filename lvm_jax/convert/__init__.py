"""Weights between lvm_jax and PyTorch layouts (HF Llama, diffusers/open-muse VQGAN, ml-aim, LPIPS)."""

import numpy as np


def load_float32(path: str) -> dict[str, np.ndarray]:
  """Float32 arrays of a safetensors file, bfloat16 included (which safetensors.numpy cannot read:
  released checkpoints often are bf16 or fp16)."""
  from safetensors.flax import load_file  # pylint: disable=g-import-not-at-top
  return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
