"""Image and video sources for tokenization: decode -> RGB -> resize to the tokenizer size -> uint8.

Every source lists its items cheaply (`keys`, sorted and deterministic), loads one as uint8
[T, size, size, 3] (`load`) and gives a class id for same-category sentences (`label`, -1 if none).
An unusable input raises `BadInput` with a one-line reason; the tokenization job skips and reports
it, so one bad file never stops a job over millions. The default resize, `squash`, is the LVM
release's: PIL bicubic to size x size ignoring the aspect ratio (`.convert('RGB').resize((256, 256))`).
"""

import inspect
import io
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps

from lvm_jax.data import files, images

MODES = ("squash", "center_crop", "short_side")
# short_side keeps the aspect ratio up to this: a panorama's longer side is cropped to 4x the
# shorter, so a 40000 x 500 banner becomes 1792 x 448 at 448, not 35840 x 448.
MAX_ASPECT = 4
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
# Below 8 px a file holds no scene: such files are icons, tracking pixels and spacers, and
# upsampling one to 256 px gives a blur of a few colours that would only teach the model blurs.
MIN_SIDE = 8
# 64 Mpx (8192^2) is beyond any photo worth tokenizing and decodes to 200 MB, so a few decode
# workers fit in host memory. It is below PIL's warning threshold (~89 Mpx), so all that PIL warns
# about is rejected here; PIL.Image.MAX_IMAGE_PIXELS, global state of other code, stays untouched.
MAX_PIXELS = 2**26


class BadInput(ValueError):
  """An input that is skipped; str(e) is the one-line reason."""


class Unreadable(BadInput):
  """A file that could not be read at all: gone, no permission, a dangling link."""


def _unreadable(e: OSError) -> Unreadable:
  gone = "not found (deleted since listing, or a dangling link)"
  return Unreadable(f"unreadable file: {gone if isinstance(e, FileNotFoundError) else e.strerror or e}")


class _EofTracker(io.BytesIO):
  """Notes a read past the end, the sign of a truncated file. PIL raises on truncation only while
  ImageFile.LOAD_TRUNCATED_IMAGES is False, a global that any code in the process may set."""
  hit_eof = False

  def read(self, n: int | None = -1) -> bytes:
    out = super().read(n)
    self.hit_eof |= n != 0 and not out
    return out


def open_image(data: bytes) -> PIL.Image.Image:
  """Decoded pixels of the first frame, EXIF orientation applied; BadInput if unusable."""
  if not data:
    raise BadInput("not an image: empty file")
  fp = _EofTracker(data)
  try:
    img = PIL.Image.open(fp)
  except PIL.UnidentifiedImageError:
    raise BadInput(f"not an image: unknown format or corrupt header (starts {data[:8]!r})") from None
  except PIL.Image.DecompressionBombError as e:
    raise BadInput(f"too large (decompression bomb): {e}") from None
  except Exception as e:  # corrupt headers make PIL raise almost anything  # pylint: disable=broad-except
    raise BadInput(f"corrupt image header: {type(e).__name__}: {e}") from None
  w, h = img.size
  if w * h > MAX_PIXELS:
    raise BadInput(f"too large: {w}x{h} px (max {MAX_PIXELS} pixels)")
  _check_side(w, h)
  try:
    img.load()
  except Exception as e:  # pylint: disable=broad-except
    if not fp.hit_eof:
      raise BadInput(f"corrupt image ({img.format}, {w}x{h}): {type(e).__name__}: {e}") from None
  if fp.hit_eof:
    raise BadInput(f"truncated image ({img.format}, {w}x{h}, {len(data)} bytes)")
  try:
    return PIL.ImageOps.exif_transpose(img)
  except Exception as e:  # pylint: disable=broad-except
    raise BadInput(f"corrupt EXIF: {type(e).__name__}: {e}") from None


def _to_8bit_grey(img: PIL.Image.Image) -> PIL.Image.Image:
  """Grey images with more than 8 bits, scaled: PIL's convert('L') would clip them at 255."""
  a = np.asarray(img, np.float64)
  lo, hi = float(a.min()), float(a.max())
  if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
    a = a / 257  # 16-bit data (mode I is what older decoders give 16-bit PNG/TIFF)
  elif img.mode == "F" and lo >= 0 and hi <= 1:
    a = a * 255
  else:  # no known range: stretch, which keeps the ordering that clipping would destroy
    a = (a - lo) * (255 / max(hi - lo, 1e-12))
  return PIL.Image.fromarray(np.round(a).astype(np.uint8), "L")


def to_rgb_uint8(img: PIL.Image.Image) -> PIL.Image.Image:
  """Any PIL mode as 8-bit RGB: deep grey scaled, transparency over white, grey to 3 channels."""
  if img.mode in ("I", "F") or img.mode.startswith("I;16"):
    img = _to_8bit_grey(img)
  if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
    # Over white, not black: logos, clip art and product shots are drawn to be seen on a light
    # page, and their transparent pixels often store black, which would hide dark line art.
    rgba = img.convert("RGBA")
    img = PIL.Image.alpha_composite(PIL.Image.new("RGBA", img.size, (255,) * 4), rgba)
  try:
    return img.convert("RGB")  # also CMYK, palette, YCbCr; L and 1 give 3 equal channels
  except ValueError:
    raise BadInput(f"unsupported colour mode {img.mode}") from None


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"resize mode {mode!r}: expected one of {'|'.join(MODES)}")


def resize(image_HW3: np.ndarray | PIL.Image.Image, size: int, mode: str) -> np.ndarray:
  """uint8 [size, size, 3], bicubic like the LVM release; center_crop keeps the central square;
  short_side gives [H, W, 3], min(H, W) <= size (never enlarged), aspect kept up to MAX_ASPECT,
  for augmentations that crop from the whole picture. BadInput if a side is below MIN_SIDE."""
  _check_mode(mode)
  img = image_HW3
  if isinstance(img, np.ndarray):
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
      raise ValueError(f"resize expects uint8 [H, W, 3], got {img.dtype} {list(img.shape)}")
    img = PIL.Image.fromarray(img, "RGB")
  img = to_rgb_uint8(img)
  (w, h), side = img.size, min(img.size)
  _check_side(w, h)
  # One resample from a central box (PIL's box) is the same as resizing and then cropping,
  # without rounding the intermediate size.
  out_w, out_h, box = size, size, None
  if mode == "center_crop":
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
  elif mode == "short_side":  # down to size, never up: crops then resample the original pixels once
    bw, bh = min(w, MAX_ASPECT * side), min(h, MAX_ASPECT * side)
    x0, y0 = (w - bw) // 2, (h - bh) // 2  # whole pixels: an unscaled crop stays sharp
    box = (x0, y0, x0 + bw, y0 + bh)
    scale = min(1.0, size / side)
    out_w, out_h = round(bw * scale), round(bh * scale)
    if (out_w, out_h) == (w, h):
      return np.asarray(img)
  return np.asarray(img.resize((out_w, out_h), PIL.Image.Resampling.BICUBIC, box=box))


def decode_image(data: bytes, size: int, mode: str = "squash") -> np.ndarray:
  """Encoded image file -> uint8 [size, size, 3] (short_side: [H, W, 3]); raises BadInput."""
  _check_mode(mode)
  return resize(open_image(data), size, mode)


def _check_side(w: int, h: int) -> None:
  if min(w, h) < MIN_SIDE:
    raise BadInput(f"too small: {w}x{h} px (min side {MIN_SIDE})")


def _stack(images_HW3: Sequence[np.ndarray]) -> np.ndarray:
  """[T, H, W, 3]; BadInput if sizes differ, which mode short_side allows within one item."""
  if len(sizes := {im.shape for im in images_HW3}) > 1:
    raise BadInput(f"images of different sizes in one item: {sorted(s[:2] for s in sizes)}")
  return np.stack(images_HW3)


def _clip(frames: list[np.ndarray]) -> np.ndarray:
  if len(frames) < 2:
    raise BadInput(f"{len(frames)} frame(s): a video needs at least 2")
  return _stack(frames)


def _array_image(a: np.ndarray) -> PIL.Image.Image:
  """[H, W] or [H, W, 1|3|4], uint8, uint16 or float in [0, 1], as a PIL image."""
  if a.dtype.kind == "f":
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
      raise BadInput(f"float pixels outside [0, 1]: [{np.nanmin(a):.3g}, {np.nanmax(a):.3g}]")
    a = np.round(a * 255)
  elif a.dtype == np.uint16:
    a = np.round(a / 257.0)
  a = np.ascontiguousarray(a, np.uint8)
  a = a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a
  return PIL.Image.fromarray(a, "L" if a.ndim == 2 else {3: "RGB", 4: "RGBA"}[a.shape[-1]])


def _natural_key(name: str) -> tuple:
  """frame2 before frame10; the raw name breaks ties (frame01 vs frame1) so order is total."""
  parts = re.split(r"(\d+)", name)
  return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


class Source:
  """Lists items (`keys`), loads one as uint8 [T, size, size, 3] (`load`; [T, H, W, 3] with
  min(H, W) <= size in mode short_side), labels it (`label`)."""
  name: str

  def __init__(self, size: int, mode: str, root: str = ""):
    _check_mode(mode)
    if size < MIN_SIDE:
      raise ValueError(f"size={size}: must be at least {MIN_SIDE}")
    self.size, self.mode, self.root = size, mode, root
    self.name = os.path.basename(os.path.normpath(root)) if root else type(self).__name__
    self._keys: list[str] | None = None

  def keys(self) -> list[str]:
    if self._keys is None:  # listing a million-file tree takes seconds: do it once
      self._keys = self._list()
    return self._keys

  def _list(self) -> list[str]:  # the keys, sorted
    raise NotImplementedError

  def load(self, key: str) -> np.ndarray:
    raise NotImplementedError

  def label(self, key: str) -> int:
    return -1

  def class_names(self) -> list[str] | None:
    """Names of the label ids, where the source has them."""
    return None

  def _read(self, path: str) -> bytes:
    try:
      return files.read(self.root, path)
    except OSError as e:  # e.g. gone, no permission, a folder named like an image
      raise _unreadable(e) from None

  def _image(self, path: str) -> np.ndarray:
    return decode_image(self._read(path), self.size, self.mode)

  def _arrays(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
    return _stack([resize(_array_image(a), self.size, self.mode) for a in arrays])


class ImageFolder(Source):
  """Every image file under root (a directory or gs://bucket/prefix), recursively, T=1.
  labels_from_dirs: the index of the first-level directory among those holding images, sorted
  (torchvision's numbering when no class folder is empty); -1 for files directly in root."""

  def __init__(self, root: str, size: int, mode: str = "squash", labels_from_dirs: bool = False):
    super().__init__(size, mode, root)
    self.labels_from_dirs = labels_from_dirs
    self._classes: dict[str, int] = {}

  def _list(self) -> list[str]:
    keys = files.list_files(self.root, IMAGE_EXTS)
    if self.labels_from_dirs:
      self._classes = {d: i for i, d in enumerate(sorted({k.split("/")[0] for k in keys if "/" in k}))}
    return keys

  def load(self, key: str) -> np.ndarray:
    return self._image(key)[None]

  def label(self, key: str) -> int:
    self.keys()
    return self._classes.get(key.split("/")[0], -1) if "/" in key else -1

  def class_names(self) -> list[str] | None:
    self.keys()
    return list(self._classes) or None


class _Clips(Source):
  """Videos: every `every`-th frame is kept, at most max_frames of them."""

  def __init__(self, root: str, size: int, mode: str = "squash", max_frames: int | None = None,
               every: int = 1):
    super().__init__(size, mode, root)
    if every < 1 or (max_frames is not None and max_frames < 2):
      raise ValueError(f"every={every} must be >= 1, max_frames={max_frames} None or >= 2")
    self.max_frames, self.every = max_frames, every


class FrameFolders(_Clips):
  """Each directory under root (root itself is '.') that directly holds image files is a video,
  frames in natural order. One unreadable frame skips the video, naming the frame: dropping just
  the frame would leave a jump in time that the model learns as motion."""

  def _list(self) -> list[str]:
    self._frames: dict[str, list[str]] = {}
    for f in files.list_files(self.root, IMAGE_EXTS):
      self._frames.setdefault(f.rpartition("/")[0] or ".", []).append(f)
    return sorted(self._frames)

  def load(self, key: str) -> np.ndarray:
    self.keys()
    frames = []
    for f in sorted(self._frames[key], key=_natural_key)[::self.every][:self.max_frames]:
      try:
        frames.append(self._image(f))
      except BadInput as e:
        raise type(e)(f"frame {f.rpartition('/')[2]}: {e}") from None
    return _clip(frames)


class VideoFiles(_Clips):
  """Video files under root, decoded with PyAV and turned as the container's display matrix says
  (phones store portrait video sideways). Any decode error skips the video."""

  def _list(self) -> list[str]:
    return files.list_files(self.root, VIDEO_EXTS)

  def load(self, key: str) -> np.ndarray:
    import av  # pylint: disable=g-import-not-at-top
    try:
      container = av.open(files.open_binary(self.root, key))
    except av.error.FFmpegError as e:
      raise BadInput(f"not a video: {e}") from None
    except OSError as e:
      raise _unreadable(e) from None
    frames = []
    with container:
      if not container.streams.video:
        raise BadInput("no video stream")
      try:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
          if i % self.every == 0:
            img = frame.to_image().rotate(frame.rotation, expand=True)  # both counter-clockwise
            frames.append(resize(img, self.size, self.mode))
          if len(frames) == self.max_frames:
            break
      except av.error.FFmpegError as e:
        raise BadInput(f"corrupt video at frame {len(frames) * self.every}: {e}") from None
    return _clip(frames)


class AlignedFolders(Source):
  """root/<modality>/<stem>.<ext>, stems possibly in subdirectories. A key is a stem present in
  every modality (others are not listed), loaded as one image per modality in the given order:
  k-shot pairs, multi-annotation sentences."""

  def __init__(self, root: str, modalities: Sequence[str], size: int, mode: str = "squash"):
    super().__init__(size, mode, root)
    self.modalities = tuple(modalities)
    if not self.modalities:
      raise ValueError(f"aligned folders {root}: no modality given")
    self.keys()  # a missing modality folder is a config error: say so now

  def _list(self) -> list[str]:
    self._files: dict[str, dict[str, list[str]]] = {m: {} for m in self.modalities}
    for m, by_stem in self._files.items():
      if not (paths := files.list_files(files.join(self.root, m), IMAGE_EXTS)):
        raise ValueError(f"aligned folders {self.root}: no images in modality folder {m!r}")
      for f in paths:
        by_stem.setdefault(os.path.splitext(f)[0], []).append(f"{m}/{f}")
    return sorted(set.intersection(*(set(by_stem) for by_stem in self._files.values())))

  def load(self, key: str) -> np.ndarray:
    self.keys()
    out = []
    for m in self.modalities:
      files = self._files[m][key]
      if len(files) > 1:  # which file to pair would be a guess: let the user decide
        raise BadInput(f"{len(files)} files for one stem: {', '.join(files)}")
      try:
        out.append(self._image(files[0]))
      except BadInput as e:
        raise type(e)(f"{files[0]}: {e}") from None
    return _stack(out)


def _load_arrays(path: str, array_key: str | None, labels: Any) -> tuple[np.ndarray, Any]:
  """A .npy (memory-mapped: never read whole) or .npz array, and labels named in the .npz."""
  array = np.load(path, mmap_mode="r")  # allow_pickle stays False: no code runs from a file
  if isinstance(array, np.lib.npyio.NpzFile):
    if array_key is None and len(array.files) != 1:
      raise ValueError(f"{path} holds arrays {', '.join(array.files)}: set array_key")
    return array[array_key or array.files[0]], array[labels] if isinstance(labels, str) else labels
  if isinstance(labels, str):
    raise ValueError(f"labels={labels!r} names an array, but {path} is not an .npz")
  return array, labels


class NumpyArrays(Source):
  """A .npy/.npz file or an array: images [N,H,W(,1|3|4)] or videos [N,T,H,W,1|3|4], uint8, uint16
  or float in [0, 1]. Keys are str(index) in index order ("10" after "9"). A .npz with several
  arrays needs array_key; labels are ints or the name of an array in the .npz."""

  def __init__(self, path_or_array: str | os.PathLike | np.ndarray, size: int, mode: str = "squash",
               array_key: str | None = None, labels: np.ndarray | Sequence[int] | str | None = None):
    is_path = isinstance(path_or_array, (str, os.PathLike))
    super().__init__(size, mode, os.fspath(path_or_array) if is_path else "")
    array = path_or_array
    if is_path:
      self.name = os.path.splitext(self.name)[0]
      array, labels = _load_arrays(self.root, array_key, labels)
    self._array = np.asarray(array)
    shape, dtype = self._array.shape, self._array.dtype
    if not (len(shape) == 3 or (len(shape) in (4, 5) and shape[-1] in (1, 3, 4))):
      raise ValueError(f"array shape {list(shape)}: expected [N,H,W], [N,H,W,C] or [N,T,H,W,C], C in 1|3|4")
    if dtype not in (np.uint8, np.uint16) and dtype.kind != "f":
      raise ValueError(f"array dtype {dtype}: expected uint8, uint16 or float in [0, 1]")
    self._labels = None if labels is None else np.asarray(labels, np.int64)
    if self._labels is not None and self._labels.shape != shape[:1]:
      raise ValueError(f"labels shape {list(self._labels.shape)}: expected [{shape[0]}]")

  def _list(self) -> list[str]:
    return [str(i) for i in range(len(self._array))]

  def load(self, key: str) -> np.ndarray:
    item = np.asarray(self._array[int(key)])
    return _clip(list(self._arrays(item))) if item.ndim == 4 else self._arrays([item])

  def label(self, key: str) -> int:
    return -1 if self._labels is None else int(self._labels[int(key)])


class TfdsSource(Source):
  """A prepared TFDS dataset (`tfds build` it first) read from its array_record files: no
  TensorFlow, no download. Keys are str(index) in index order. Image features are decoded here,
  with the checks files get; arrays and Sequences of images give T frames. Label -1 when the
  dataset has no feature `label_key`."""

  def __init__(self, name: str, split: str, size: int, mode: str = "squash", data_dir: str | None = None,
               image_key: str = "image", label_key: str | None = "label"):
    super().__init__(size, mode)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name, builder = f"{name}/{split}", tfds.builder(name, data_dir=data_dir)
    features = builder.info.features
    if image_key not in features:
      raise ValueError(f"tfds {name}: no feature image_key={image_key!r}; has {', '.join(features)}")
    # SkipDecoding hands over the encoded bytes; TFDS cannot skip decoding inside a Sequence.
    skip = type(features[image_key]) is tfds.features.Image
    decoders = {image_key: tfds.decode.SkipDecoding()} if skip else None
    self._data = builder.as_data_source(split=split, decoders=decoders)
    self._image_key, self._label_key = image_key, label_key if label_key in features else None

  def _list(self) -> list[str]:
    return [str(i) for i in range(len(self._data))]

  def load(self, key: str) -> np.ndarray:
    value = self._data[int(key)][self._image_key]  # bytes, an array, or a list of either
    value = value if isinstance(value, (list, tuple)) or np.ndim(value) == 4 else [value]
    if len(value) == 0:
      raise BadInput("no image: empty sequence")
    return _stack([decode_image(v, self.size, self.mode) if isinstance(v, bytes)
                   else self._arrays([np.asarray(v)])[0] for v in value])

  def label(self, key: str) -> int:
    return -1 if self._label_key is None else int(self._data[int(key)][self._label_key])


class BuiltinImages(Source):
  """Pictures that ship inside scikit-image (no downloads), T=1; keys are their names."""

  def __init__(self, size: int, mode: str = "squash", names: Sequence[str] = images.TRAIN + images.HELD_OUT):
    super().__init__(size, mode)
    import skimage.data  # pylint: disable=g-import-not-at-top
    self.names = tuple(names)
    if unknown := [n for n in self.names if n not in skimage.data.__all__]:
      raise ValueError(f"builtin images {unknown}: not in skimage.data")

  def _list(self) -> list[str]:
    return sorted(set(self.names))

  def load(self, key: str) -> np.ndarray:
    import skimage.data  # pylint: disable=g-import-not-at-top
    return self._arrays([np.asarray(getattr(skimage.data, key)())])


def digits(size: int, mode: str = "squash", split: str = "train", clutter: bool = False) -> NumpyArrays:
  """scikit-learn's 8x8 digits upsampled (bilinear), white on black, labeled: the demo's split
  (data/demo.py; `held_out` is what evaluations test on); clutter: each at a random place, scale
  and colour on a crop of a picture (data/clutter.py)."""
  from lvm_jax.data import clutter as clutter_lib, demo  # pylint: disable=g-import-not-at-top
  pictures, labels = clutter_lib.cluttered_digits(split, size)[:2] if clutter else demo.digit_images(split, size)
  source = NumpyArrays(pictures, size, mode, labels=labels)
  source.name = f"{'cluttered_' if clutter else ''}digits/{split}"
  return source


SOURCES: dict[str, Callable[..., Source]] = {
    "image_folder": ImageFolder, "frame_folders": FrameFolders, "video_files": VideoFiles,
    "aligned_folders": AlignedFolders, "numpy_arrays": NumpyArrays, "tfds_source": TfdsSource,
    "builtin_images": BuiltinImages, "digits": digits}


def open_source(spec: Mapping[str, Any]) -> Source:
  """A source from a plain dict: {"kind": "image_folder", "root": ..., "size": 256, ...}."""
  spec = dict(spec)
  kind = spec.pop("kind", None)
  if kind not in SOURCES:
    raise ValueError(f"source kind={kind!r}: expected one of {'|'.join(SOURCES)}")
  params = inspect.signature(SOURCES[kind]).parameters
  required = [p for p, v in params.items() if v.default is inspect.Parameter.empty]
  if unknown := [k for k in spec if k not in params]:
    raise ValueError(f"source {kind}: unknown key {unknown[0]!r}; allowed: {', '.join(params)}")
  if missing := [k for k in required if k not in spec]:
    raise ValueError(f"source {kind}: missing key {missing[0]!r}; required: {', '.join(required)}")
  return SOURCES[kind](**spec)
