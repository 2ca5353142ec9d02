"""Decoding, conversions, skip reasons and every source, on real files written into tmp_path."""

import io
import struct
import warnings
import zlib

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest

from lvm_jax.data import sources

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(img: PIL.Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def halves(w: int, h: int, left: tuple, right: tuple, mode: str = "RGB") -> PIL.Image.Image:
  img = PIL.Image.new(mode, (w, h), right)
  img.paste(left, (0, 0, w // 2, h))
  return img


def bad(data: bytes, size: int = 16) -> str:
  """The reason decode_image gives for data; it must be one line."""
  with pytest.raises(sources.BadInput) as e:
    sources.decode_image(data, size)
  assert "\n" not in str(e.value)
  return str(e.value)


def close(pixel: np.ndarray, rgb: tuple, tol: int = 6) -> bool:
  return bool(np.abs(pixel.astype(int) - rgb).max() <= tol)


# ---------------------------------------------------------------- conversions


def test_cmyk_becomes_rgb():
  cyan = PIL.Image.new("CMYK", (16, 16), (255, 0, 0, 0))
  for fmt in ("JPEG", "TIFF"):
    out = sources.decode_image(encode(cyan, fmt, **({"quality": 95} if fmt == "JPEG" else {})), 8)
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    assert close(out[4, 4], (0, 255, 255), 3), (fmt, out[4, 4])


@pytest.mark.parametrize("dtype,fmt", [(np.uint16, "PNG"), (np.int32, "TIFF")])
def test_16bit_grey_scaled_not_clipped(dtype, fmt):
  ramp = np.tile(np.linspace(0, 65535, 64).round().astype(dtype), (16, 1))
  img = PIL.Image.open(io.BytesIO(encode(PIL.Image.fromarray(ramp), fmt)))
  assert img.mode == ("I;16" if dtype == np.uint16 else "I")
  out = sources.decode_image(encode(PIL.Image.fromarray(ramp), fmt), 64).astype(int)
  row = out[8, :, 0]
  assert row[0] == 0 and row[-1] == 255  # clipping would give 255 almost everywhere
  assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 50
  assert abs(row[32] - ramp[0, 32] / 257) <= 3
  assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])


def test_wide_int_grey_stretched_keeping_order():
  ramp = np.tile(np.linspace(-70000, 70000, 32).astype(np.int32), (16, 1))
  out = sources.decode_image(encode(PIL.Image.fromarray(ramp), "TIFF"), 32)[8, :, 0].astype(int)
  assert out[0] == 0 and out[-1] == 255 and np.all(np.diff(out) > 0)


def _transparent_left(kind: str) -> bytes:
  if kind == "RGBA":  # transparent pixels store black, as most encoders leave them
    return encode(halves(16, 16, (0, 0, 0, 0), (255, 0, 0, 255), "RGBA"), "PNG")
  if kind == "LA":
    return encode(halves(16, 16, (0, 0), (60, 255), "LA"), "PNG")
  pal = PIL.Image.new("P", (16, 16), 1)
  pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
  pal.paste(0, (0, 0, 8, 16))
  return encode(pal, kind, transparency=0)


@pytest.mark.parametrize("kind", ["RGBA", "LA", "PNG", "GIF"])
def test_transparency_composited_over_white(kind):
  out = sources.decode_image(_transparent_left(kind), 16)
  assert close(out[8, 1], WHITE, 0)
  assert close(out[8, 14], (60, 60, 60) if kind == "LA" else RED, 0)


@pytest.mark.parametrize("mode,value,expect", [("L", 77, 77), ("1", 1, 255)])
def test_grey_gives_three_equal_channels(mode, value, expect):
  out = sources.decode_image(encode(PIL.Image.new(mode, (16, 16), value), "PNG"), 8)
  assert np.all(out == expect)


def test_palette_to_rgb():
  pal = PIL.Image.new("P", (16, 16), 1)
  pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
  pal.paste(0, (0, 0, 8, 16))
  out = sources.decode_image(encode(pal, "PNG"), 16)
  assert close(out[8, 1], RED, 0) and close(out[8, 14], BLUE, 0)


def test_exif_orientation_applied():
  exif = PIL.Image.Exif()
  exif[0x0112] = 6  # stored sideways: display after rotating 90 degrees clockwise
  data = encode(halves(64, 32, RED, BLUE), "JPEG", exif=exif, quality=95)
  out = sources.decode_image(data, 16)  # displayed 32 wide, 64 high: red on top, blue below
  assert close(out[1, 8], RED, 30) and close(out[14, 8], BLUE, 30)


# ---------------------------------------------------------------- resizing


def thirds(w: int, h: int) -> PIL.Image.Image:
  img = PIL.Image.new("RGB", (w, h), GREEN)
  if w > h:
    img.paste(RED, (0, 0, w // 3, h))
    img.paste(BLUE, (2 * w // 3, 0, w, h))
  else:
    img.paste(RED, (0, 0, w, h // 3))
    img.paste(BLUE, (0, 2 * h // 3, w, h))
  return img


@pytest.mark.parametrize("w,h", [(96, 32), (32, 96)])
def test_center_crop_keeps_the_centre_and_squash_keeps_everything(w, h):
  crop = sources.resize(thirds(w, h), 16, "center_crop")
  assert crop.shape == (16, 16, 3) and crop.dtype == np.uint8
  assert np.all(crop[2:-2, 2:-2] == GREEN)  # bicubic reaches 2 px past the crop into the red/blue
  assert np.all(crop[..., 1] > 200)
  squash = sources.resize(np.asarray(thirds(w, h)), 16, "squash")
  assert close(squash[0, 0], RED, 0) and close(squash[-1, -1], BLUE, 0) and close(squash[8, 8], GREEN, 0)


def test_squash_matches_the_lvm_release():
  img = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))
  release = np.asarray(img.convert("RGB").resize((32, 32)))  # tokenize_examples' preprocessing
  assert np.array_equal(sources.decode_image(encode(img, "PNG"), 32), release)


def test_resize_rejects_bad_mode_and_bad_arrays():
  with pytest.raises(ValueError, match="squash|center_crop") as e:
    sources.resize(np.zeros((16, 16, 3), np.uint8), 8, "stretch")
  assert not isinstance(e.value, sources.BadInput)
  with pytest.raises(ValueError, match="uint8"):
    sources.resize(np.zeros((16, 16), np.float32), 8, "squash")
  with pytest.raises(ValueError, match="squash|center_crop"):
    sources.decode_image(b"", 8, "crop")  # a config error, reported before any decoding


# ---------------------------------------------------------------- skip reasons


def _all_formats() -> dict[str, bytes]:
  rng = np.random.default_rng(1)
  img = PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
  out = {fmt: encode(img, fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")}
  out["JPEG progressive"] = encode(img, "JPEG", progressive=True)
  out["PNG grey 16-bit"] = encode(PIL.Image.fromarray(rng.integers(0, 65535, (64, 64), dtype=np.uint16)), "PNG")
  out["GIF transparent"] = _transparent_left("GIF")
  return out


@pytest.mark.parametrize("load_truncated", [False, True])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF"])
def test_truncated_image(fmt, load_truncated, monkeypatch):
  # Other code in the process may set LOAD_TRUNCATED_IMAGES; PIL then fills the gap silently.
  monkeypatch.setattr(PIL.ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
  data = _all_formats()[fmt]
  assert bad(data[:len(data) * 2 // 3]).startswith("truncated image")


def test_complete_files_are_not_called_truncated(monkeypatch):
  monkeypatch.setattr(PIL.ImageFile, "LOAD_TRUNCATED_IMAGES", True)
  for fmt, data in _all_formats().items():
    assert sources.decode_image(data, 16).shape == (16, 16, 3), fmt


@pytest.mark.parametrize("w,h", [(1, 1), (7, 100), (100, 3)])
def test_tiny_image(w, h):
  assert bad(encode(PIL.Image.new("RGB", (w, h)), "PNG")) == f"too small: {w}x{h} px (min side 8)"
  assert sources.decode_image(encode(PIL.Image.new("RGB", (8, 8)), "PNG"), 16).shape == (16, 16, 3)


def png_header(w: int, h: int) -> bytes:
  """A PNG that claims w x h pixels: PIL reads only the header before its size checks."""
  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_decompression_bomb():
  limit = PIL.Image.MAX_IMAGE_PIXELS
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
    assert bad(png_header(10_000, 10_000)).startswith("too large: 10000x10000 px")  # PIL only warns
  assert bad(png_header(20_000, 20_000)).startswith("too large (decompression bomb)")  # PIL raises
  assert bad(png_header(9_000, 8_000)).startswith("too large")  # below PIL's limits, above ours
  assert PIL.Image.MAX_IMAGE_PIXELS == limit


def test_not_an_image():
  assert bad(b"") == "not an image: empty file"
  assert bad(b"hello, this is text\n").startswith("not an image: unknown format")
  png = bytearray(encode(PIL.Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), np.uint8)), "PNG"))
  png[len(png) // 2:len(png) // 2 + 64] = b"\xff" * 64  # damaged compressed data, not truncated
  assert bad(bytes(png)).startswith("corrupt image (PNG, 64x64)")


# ---------------------------------------------------------------- sources


def save(path, img: PIL.Image.Image, fmt: str | None = None) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  img.save(path, fmt)


def grey(v: int, w: int = 24, h: int = 16) -> PIL.Image.Image:
  return PIL.Image.new("RGB", (w, h), (v, v, v))


def test_short_side_keeps_the_aspect_ratio_up_to_the_cap():
  wide = sources.decode_image(encode(halves(80, 40, RED, BLUE), "PNG"), 16, "short_side")
  assert wide.shape == (16, 32, 3) and close(wide[8, 4], RED) and close(wide[8, 28], BLUE)
  tall = sources.resize(np.zeros((400, 20, 3), np.uint8), 16, "short_side")
  assert tall.shape == (16 * sources.MAX_ASPECT, 16, 3)  # the central 80 x 20 of a 400 x 20 strip
  small = np.random.default_rng(0).integers(0, 256, (10, 45, 3), dtype=np.uint8)
  np.testing.assert_array_equal(sources.resize(small[:, :12], 16, "short_side"), small[:, :12])  # never enlarged
  np.testing.assert_array_equal(sources.resize(small, 16, "short_side"), small[:, 2:42])  # cut on whole pixels


def _upload(local, gs_root: str) -> None:
  """Copies a directory tree to gs_root object by object (the emulator has no folders)."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  from lvm_jax.data import store  # pylint: disable=g-import-not-at-top
  kv = ts.KvStore.open(store.kvstore(gs_root)).result()
  for f in local.rglob("*"):
    if f.is_file():
      kv.write(f.relative_to(local).as_posix(), f.read_bytes()).result()


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_image_folder(tmp_path, where, request, monkeypatch):
  save(tmp_path / "b" / "x.PNG", grey(10))
  save(tmp_path / "a" / "deep" / "y.jpeg", grey(20))
  save(tmp_path / "a" / "z.tiff", grey(30))
  save(tmp_path / "top.webp", grey(40))
  (tmp_path / "a" / "notes.txt").write_text("not an image")
  (tmp_path / "a" / "._z.jpg").write_bytes(b"AppleDouble")  # hidden: macOS resource fork
  (tmp_path / ".cache" / "c.png").parent.mkdir()
  save(tmp_path / ".cache" / "c.png", grey(50))  # hidden folder
  (tmp_path / "b" / "broken.jpg").write_text("not a jpeg")
  root = str(tmp_path)
  if where == "gcs":  # the same tree in a bucket, read through the same code
    for k, v in request.getfixturevalue("gcs_emulator").items():
      monkeypatch.setenv(k, v)
    root = f"gs://lvm-test/image_folder/{tmp_path.name}"
    _upload(tmp_path, root)
  src = sources.ImageFolder(root, 16, "center_crop", labels_from_dirs=True)
  keys = src.keys()
  assert keys == ["a/deep/y.jpeg", "a/z.tiff", "b/broken.jpg", "b/x.PNG", "top.webp"]
  assert keys == sources.ImageFolder(root, 16).keys()
  assert [src.label(k) for k in keys] == [0, 0, 1, 1, -1]
  out = src.load("a/z.tiff")
  assert out.shape == (1, 16, 16, 3) and out.dtype == np.uint8 and np.all(out == 30)
  assert "not an image" in str(pytest.raises(sources.BadInput, src.load, "b/broken.jpg").value)
  assert str(pytest.raises(sources.BadInput, src.load, "a/gone.png").value).startswith("unreadable file: not found")
  assert sources.ImageFolder(root, 16).label("a/z.tiff") == -1


def test_a_missing_folder_is_a_config_error(tmp_path, gcs_emulator, monkeypatch):
  with pytest.raises(ValueError, match="no such directory"):
    sources.ImageFolder(str(tmp_path / "nope"), 16).keys()
  with pytest.raises(ValueError, match="root is empty"):
    sources.ImageFolder("", 16).keys()
  for k, v in gcs_emulator.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(ValueError, match="no objects under this prefix"):  # a typo in a bucket path
    sources.ImageFolder("gs://lvm-test/no/such/prefix", 16).keys()


def test_frame_folders(tmp_path):
  for i in range(1, 12):  # natural order: frame2 before frame10
    save(tmp_path / "clip" / f"frame{i}.png", grey(i * 20))
  save(tmp_path / "one" / "frame1.png", grey(5))
  save(tmp_path / "sub" / "broken" / "f1.png", grey(5))
  (tmp_path / "sub" / "broken" / "f2.png").write_bytes(b"\x89PNG junk")
  src = sources.FrameFolders(str(tmp_path), 16)
  assert src.keys() == ["clip", "one", "sub/broken"]
  clip = src.load("clip")
  assert clip.shape == (11, 16, 16, 3) and list(clip[:, 0, 0, 0]) == [i * 20 for i in range(1, 12)]
  strided = sources.FrameFolders(str(tmp_path), 16, max_frames=3, every=4).load("clip")
  assert list(strided[:, 0, 0, 0]) == [20, 100, 180]
  assert "1 frame(s)" in str(pytest.raises(sources.BadInput, src.load, "one").value)
  assert str(pytest.raises(sources.BadInput, src.load, "sub/broken").value).startswith("frame f2.png:")
  with pytest.raises(ValueError, match="every=0"):
    sources.FrameFolders(str(tmp_path), 16, every=0)


def write_video(path, frames: list[np.ndarray], rotation: int = 0) -> None:
  import av  # pylint: disable=g-import-not-at-top
  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(str(path), "w") as out:
    stream = out.add_stream("mpeg4", rate=10)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt = "yuv420p"
    if rotation:
      stream.set_display_rotation(rotation)
    for f in frames:
      out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
    out.mux(stream.encode())


def test_video_files(tmp_path):
  pytest.importorskip("av")
  ramp = [np.full((32, 48, 3), 40 * i, np.uint8) for i in range(5)]
  write_video(tmp_path / "a.mp4", ramp)
  write_video(tmp_path / "nested" / "b.MOV", ramp[:1])
  (tmp_path / "fake.mkv").write_text("not a video")
  src = sources.VideoFiles(str(tmp_path), 16)
  assert src.keys() == ["a.mp4", "fake.mkv", "nested/b.MOV"]
  video = src.load("a.mp4")
  assert video.shape == (5, 16, 16, 3) and video.dtype == np.uint8
  assert np.all(np.abs(video[:, 8, 8, 0].astype(int) - [0, 40, 80, 120, 160]) <= 6)
  strided = sources.VideoFiles(str(tmp_path), 16, max_frames=2, every=2).load("a.mp4")
  assert np.all(np.abs(strided[:, 8, 8, 0].astype(int) - [0, 80]) <= 6)
  assert "not a video" in str(pytest.raises(sources.BadInput, src.load, "fake.mkv").value)
  assert "1 frame(s)" in str(pytest.raises(sources.BadInput, src.load, "nested/b.MOV").value)


def test_video_rotation_applied(tmp_path):
  av = pytest.importorskip("av")
  if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
    pytest.skip("this PyAV cannot write a display matrix")
  frame = np.zeros((32, 48, 3), np.uint8)
  frame[:16, :16] = 255  # top-left; after the 90 degree counter-clockwise turn, bottom-left
  write_video(tmp_path / "r.mp4", [frame] * 2, rotation=90)
  out = sources.VideoFiles(str(tmp_path), 16).load("r.mp4")
  assert out[0, 15, 0, 0] > 200 and out[0, 0, 0, 0] < 50


def test_aligned_folders(tmp_path):
  for stem, v in (("s1/a", 10), ("b", 20), ("c", 30)):
    save(tmp_path / "image" / f"{stem}.jpg", grey(v))
  for stem, v in (("s1/a", 110), ("b", 120), ("d", 140)):
    save(tmp_path / "depth" / f"{stem}.png", PIL.Image.new("I;16", (24, 16), v * 257))
  src = sources.AlignedFolders(str(tmp_path), ("image", "depth"), 16)
  assert src.keys() == ["b", "s1/a"]  # c and d lack a modality
  pair = src.load("s1/a")
  assert pair.shape == (2, 16, 16, 3) and abs(int(pair[0, 8, 8, 0]) - 10) <= 3 and pair[1, 8, 8, 0] == 110
  assert sources.AlignedFolders(str(tmp_path), ["depth", "image"], 16).load("b")[0, 0, 0, 0] == 120
  save(tmp_path / "depth" / "b.jpg", grey(1))
  fresh = sources.AlignedFolders(str(tmp_path), ("image", "depth"), 16)
  reason = str(pytest.raises(sources.BadInput, fresh.load, "b").value)
  assert reason == "2 files for one stem: depth/b.jpg, depth/b.png"
  with pytest.raises(ValueError, match="normals"):
    sources.AlignedFolders(str(tmp_path), ("image", "normals"), 16)


def test_numpy_arrays_in_memory():
  rgb = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
  src = sources.NumpyArrays(rgb, 16, labels=np.arange(12) % 3)
  assert src.keys() == [str(i) for i in range(12)]  # index order, "10" after "9"
  assert np.array_equal(src.load("10")[0], rgb[10]) and src.label("5") == 2
  assert sources.NumpyArrays(rgb, 16).label("5") == -1
  gray = sources.NumpyArrays(np.full((2, 9, 9), 0.5, np.float32), 8).load("1")
  assert np.all(gray == 128)
  rgba = np.zeros((1, 8, 8, 4), np.uint8)
  assert np.all(sources.NumpyArrays(rgba, 8).load("0") == 255)  # fully transparent: white
  video = sources.NumpyArrays(np.zeros((2, 3, 8, 8, 3), np.uint16) + 65535, 8).load("0")
  assert video.shape == (3, 8, 8, 3) and np.all(video == 255)
  reason = str(pytest.raises(sources.BadInput, sources.NumpyArrays(np.full((1, 8, 8), 2.0), 8).load, "0").value)
  assert reason.startswith("float pixels outside [0, 1]")
  tiny = sources.NumpyArrays(np.zeros((1, 4, 4)), 8)
  assert "too small" in str(pytest.raises(sources.BadInput, tiny.load, "0").value)
  with pytest.raises(ValueError, match="shape"):
    sources.NumpyArrays(np.zeros((2, 8, 8, 2), np.uint8), 8)
  with pytest.raises(ValueError, match="dtype"):
    sources.NumpyArrays(np.zeros((2, 8, 8), np.int64), 8)


def test_numpy_arrays_files(tmp_path):
  images = np.arange(3 * 8 * 8 * 3, dtype=np.uint8).reshape(3, 8, 8, 3)
  np.save(tmp_path / "x.npy", images)
  src = sources.NumpyArrays(str(tmp_path / "x.npy"), 8)
  assert src.name == "x" and np.array_equal(src.load("2")[0], images[2])
  np.savez(tmp_path / "y.npz", images=images, labels=np.array([4, 5, 6]))
  src = sources.NumpyArrays(tmp_path / "y.npz", 8, array_key="images", labels="labels")
  assert src.keys() == ["0", "1", "2"] and src.label("1") == 5
  with pytest.raises(ValueError, match="array_key"):
    sources.NumpyArrays(tmp_path / "y.npz", 8)


def test_builtin_images():
  src = sources.BuiltinImages(16, "center_crop", names=("coffee", "camera", "chelsea"))
  assert src.keys() == ["camera", "chelsea", "coffee"]
  out = src.load("camera")  # a grey picture
  assert out.shape == (1, 16, 16, 3) and np.array_equal(out[..., 0], out[..., 2])
  assert sources.BuiltinImages(16).keys() == sorted(set(sources.images.TRAIN + sources.images.HELD_OUT))
  with pytest.raises(ValueError, match="nope"):
    sources.BuiltinImages(16, names=("nope",))


def test_tfds_source(tfds_dir):
  src = sources.TfdsSource("lvm_sources_tiny", "train", 16, data_dir=tfds_dir)
  assert src.keys() == ["0", "1", "2", "3", "4"] and src.name == "lvm_sources_tiny/train"
  for key in src.keys():
    out = src.load(key)
    assert out.shape == (1, 16, 16, 3) and out.dtype == np.uint8
    assert out[0, 8, 8, 0] == src.label(key) * 50  # records and labels stay paired
  grey_src = sources.TfdsSource("lvm_sources_tiny", "train", 8, data_dir=tfds_dir, image_key="grey", label_key=None)
  out = grey_src.load("3")
  assert out.shape == (1, 8, 8, 3) and grey_src.label("3") == -1 and len(np.unique(out)) == 1
  clip = sources.TfdsSource("lvm_sources_tiny", "train", 8, data_dir=tfds_dir, image_key="clip").load("2")
  assert clip.shape == (3, 8, 8, 3) and np.all(np.diff(clip[:, 4, 4, 0].astype(int)) == 1)
  with pytest.raises(ValueError, match="image_key='pixels'"):
    sources.TfdsSource("lvm_sources_tiny", "train", 8, data_dir=tfds_dir, image_key="pixels")


# ---------------------------------------------------------------- open_source


def test_open_source(tmp_path):
  save(tmp_path / "cls" / "a.png", grey(9))
  src = sources.open_source({"kind": "image_folder", "root": str(tmp_path), "size": 8, "mode": "squash",
                             "labels_from_dirs": True})
  assert isinstance(src, sources.ImageFolder) and src.keys() == ["cls/a.png"] and src.label("cls/a.png") == 0
  arrays = sources.open_source({"kind": "numpy_arrays", "path_or_array": np.zeros((2, 8, 8), np.uint8), "size": 8})
  assert arrays.load("1").shape == (1, 8, 8, 3)
  cases = [({"kind": "images"}, r"kind='images'.*image_folder\|frame_folders"),
           ({"root": "x", "size": 8}, "kind=None"),
           ({"kind": "image_folder", "size": 8}, "missing key 'root'; required: root, size"),
           ({"kind": "image_folder", "root": "x", "size": 8, "labels": True}, "unknown key 'labels'; allowed: root"),
           ({"kind": "image_folder", "root": "x", "size": 8, "mode": "fit"}, "squash|center_crop")]
  for spec, message in cases:
    with pytest.raises(ValueError, match=message) as e:
      sources.open_source(spec)
    assert "\n" not in str(e.value)
