"""The VQGAN as a tokenizer: uint8 images <-> int32 ids, in fixed jitted batches on a mesh.

  tok = tokenize.Tokenizer(vqgan_model, image_size=256, batch_size=64)
  ids = tok.encode(images_NHWC_uint8)   # [N, h*w]
  images = tok.decode(ids)

make_dataset.py, prompt.py and the monitor run the VQGAN through this; the network is
models/vqgan.py.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.layout import Format, Layout

from lvm_jax.models.vqgan import Model


class TokenizerError(ValueError):
  """Images or ids the tokenizer cannot take; the message names the mismatch."""


class Tokenizer:
  """uint8 images [N, S, S, 3] <-> int32 ids [N, h*w] (row-major), jitted, sharded over a mesh.

  Calls run on fixed batches of `batch_size` images split over the devices of the mesh (by
  default this process's devices: in a multi-process job each process tokenizes its own images);
  the last batch is padded, so any N reuses the one compiled program.
  """

  def __init__(self, model: Model, image_size: int, batch_size: int,
               mesh: Optional[jax.sharding.Mesh] = None):
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
    self.image_size, self.batch_size, self.codes = image_size, batch_size, model.cfg.codes
    if image_size % model.cfg.factor:
      raise TokenizerError(f"image_size={image_size} is not a multiple of the downsampling factor {model.cfg.factor}")
    self.grid = image_size // model.cfg.factor
    # This process's devices: every process tokenizes its own images, with no collectives.
    mesh = mesh or jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))
    if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
      raise TokenizerError("the tokenizer's mesh must hold only this process's devices (jax.local_devices())")
    if batch_size % mesh.size:
      raise TokenizerError(f"batch_size={batch_size} is not divisible by the mesh's {mesh.size} devices")
    graphdef, state = nnx.split(model)
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(mesh.axis_names))
    self.state, self._replicated, self._batch_sharding = jax.device_put(state, replicated), replicated, batch

    def encode(state: nnx.State, images_BHWC: jax.Array) -> jax.Array:
      ids = nnx.merge(graphdef, state).encode(images_BHWC.astype(jnp.float32) / 255.0)
      return ids.reshape(ids.shape[0], -1)

    def decode(state: nnx.State, ids_BL: jax.Array) -> jax.Array:
      images = nnx.merge(graphdef, state).decode(ids_BL.reshape(-1, self.grid, self.grid))
      return jnp.round(images * 255.0).astype(jnp.uint8)

    # name -> (function, its input, the modules whose conv kernels only it reads)
    self._programs = {
        "encode": (encode, jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8),
                   ("encoder", "quant_conv")),
        "decode": (decode, jax.ShapeDtypeStruct((batch_size, self.grid ** 2), jnp.int32), ("decoder", "post_quant_conv"))}
    self._compiled = {}

  def _program(self, name: str):
    """The compiled call, made at its first use. Its conv kernels take the layout the compiler
    picks (Layout.AUTO) and are moved into it once: on a GPU that is cuDNN's OHWI, where the
    default HWIO cost a transpose of every kernel at every call (XLA's H200 compile of 8 images:
    34 kernels and 0.47 GB of 14.7 an encode, 36 and 0.53 GB of 24.1 a decode). Each kernel is
    read by one program only (encoder or decoder), so the two never disagree on a layout."""
    if name not in self._compiled:
      fn, spec, owners = self._programs[name]
      auto = lambda path, a: (Format(Layout.AUTO, self._replicated)
                              if a.ndim == 4 and getattr(path[0], "key", None) in owners else self._replicated)
      shardings = jax.tree_util.tree_map_with_path(auto, self.state)
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.state)
      jitted = jax.jit(fn, in_shardings=(shardings, self._batch_sharding), out_shardings=self._batch_sharding)
      self._compiled[name] = compiled = jitted.lower(abstract, spec).compile()
      self.state = jax.tree.map(lambda a, want, f: jax.device_put(a, f) if isinstance(want, Format) else a,
                                self.state, shardings, compiled.input_formats[0][0])
    return self._compiled[name]

  def _batched(self, name: str, x: np.ndarray, empty: np.ndarray) -> np.ndarray:
    fn, outs = self._program(name), [empty]
    for start in range(0, len(x), self.batch_size):
      chunk = x[start:start + self.batch_size]
      pad = self.batch_size - len(chunk)
      padded = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)]) if pad else chunk
      outs.append(np.asarray(fn(self.state, jax.device_put(padded, self._batch_sharding)))[:len(chunk)])
    return np.concatenate(outs)

  def encode(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    want = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != want:
      raise TokenizerError(f"images have shape {images.shape}, expected [N, {', '.join(map(str, want))}]")
    if images.dtype != np.uint8:
      raise TokenizerError(f"images have dtype {images.dtype}, expected uint8 in [0, 255]")
    return self._batched("encode", images, np.zeros((0, self.grid * self.grid), np.int32))

  def decode(self, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] != self.grid * self.grid or not np.issubdtype(ids.dtype, np.integer):
      raise TokenizerError(f"ids have shape {ids.shape} and dtype {ids.dtype}, expected integers "
                           f"[N, {self.grid * self.grid}]")
    if ids.size and (ids.min() < 0 or ids.max() >= self.codes):
      raise TokenizerError(f"ids span [{ids.min()}, {ids.max()}], outside the codebook [0, {self.codes})")
    empty = np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
    return self._batched("decode", ids.astype(np.int32), empty)
