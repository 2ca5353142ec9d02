"""Tokenizer report: how much of a picture a VQGAN keeps, on any images, to compare tokenizers.

  lvm-tokenizer-report --vqgan_workdir /tmp/lvm_demo/vqgan --out /tmp/lvm_demo/tokenizer.json
  lvm-tokenizer-report --vqgan_weights amused_vqgan.safetensors --vqgan_config configs/vqgan_f16_8192.py \\
      --source '{"kind": "image_folder", "root": "/data/val"}' --out amused.json --tb_dir /tmp/tb/amused

The VQGAN is a train_vqgan workdir's EMA generator (--vqgan_workdir) or safetensors weights with
the config of their architecture (--vqgan_weights, --vqgan_config, --vqgan_layout), as lvm-prompt
takes them. The images come from any source of data/sources.py, as JSON (its "size" and "mode"
are this tool's: the tokenizer's image size, --resize), or by default the held-out images that
VQGAN training evaluates on and never trains on: a workdir's data module's (the demo's held-out
frames, the built-in pictures' held-out crops), for a weights file the built-in pictures' (this
report is what lvm-evaluate reports for a VQGAN workdir). Up to --max_images of a source, spread
evenly over it; a clip counts by its first frame; unusable files are skipped and counted.

Per image, pixels in [0, 1], reconstruction = decode(encode(image)) unrounded:
  psnr   10 log10(1 / MSE) in dB, averaged over images (as the demo's task metrics average theirs)
  ssim   Wang et al. 2004: Gaussian 11x11 window (sigma 1.5), K1 0.01, K2 0.03, per RGB channel,
         over the positions where the window fits (skimage's gaussian_weights=True,
         use_sample_covariance=False), averaged over channels, positions and images
  lpips  LPIPS-VGG (models/lpips.py) when a weights file is given (--lpips_weights) or the
         workdir's training config names one that exists
  shift_consistency  the share of tokens whose code stays the same when the image moves by one
         token down and right (rolled; the tokens that wrapped around are not counted): what an
         LVM can copy from one frame of a moving scene to the next
and over the whole set the codebook's usage (share of codes used at least once) and perplexity
(exp of the entropy of the code histogram: the number of equally used codes it is worth).

The JSON (--out) holds every number with whether higher or lower is better, and where it comes
from; TensorBoard (--tb_dir, by default <workdir>/tokenizer_report) gets the scalars, the table
and a labeled original | reconstruction grid; the console gets the table.
"""

import concurrent.futures
import importlib
import json
import os
import sys
from typing import Any, Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx

from lvm_jax import cli, config as config_lib, metrics, pictures, progress
from lvm_jax.models import quantizer, vqgan

HELD_OUT = "held_out"  # --source default: the held-out images VQGAN training evaluates on
SSIM_SIGMA, SSIM_RADIUS, SSIM_K1, SSIM_K2 = 1.5, 5, 0.01, 0.03  # Wang et al.'s constants: an 11x11 window
GRID_IMAGES = 8  # original | reconstruction pairs in TensorBoard


def psnr(original_NHWC: jax.Array, recon_NHWC: jax.Array) -> jax.Array:
  """PSNR in dB of each image [N], pixels in [0, 1] (a perfect reconstruction scores 100)."""
  mse_N = jnp.mean(jnp.square(jnp.asarray(recon_NHWC, jnp.float32) - jnp.asarray(original_NHWC, jnp.float32)),
                   axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse_N, 1e-10))


def _gaussian_window() -> np.ndarray:
  taps = np.exp(-0.5 * (np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1) / SSIM_SIGMA) ** 2)
  return (taps / taps.sum()).astype(np.float32)


def _blur(x_NHWC: jax.Array) -> jax.Array:
  """Separable Gaussian filter where the whole window fits: [N, H - 10, W - 10, C]."""
  w = _gaussian_window()
  H, W = x_NHWC.shape[1] - 2 * SSIM_RADIUS, x_NHWC.shape[2] - 2 * SSIM_RADIUS
  rows = sum(float(w[k]) * x_NHWC[:, k:k + H] for k in range(len(w)))
  return sum(float(w[k]) * rows[:, :, k:k + W] for k in range(len(w)))


def ssim(original_NHWC: jax.Array, recon_NHWC: jax.Array) -> jax.Array:
  """Mean SSIM of each image [N], pixels in [0, 1] (data range 1)."""
  if min(original_NHWC.shape[1:3]) <= 2 * SSIM_RADIUS:
    raise config_lib.ConfigError(f"SSIM needs images of more than {2 * SSIM_RADIUS} pixels a side, "
                                 f"got {original_NHWC.shape[1]}x{original_NHWC.shape[2]}")
  # Moments of pixels less 0.5: E[x^2] - E[x]^2 in fp32 then cancels less in flat regions.
  a = jnp.asarray(original_NHWC, jnp.float32) - 0.5
  b = jnp.asarray(recon_NHWC, jnp.float32) - 0.5
  mu_a, mu_b = _blur(a), _blur(b)
  var_a, var_b = _blur(a * a) - mu_a * mu_a, _blur(b * b) - mu_b * mu_b
  cov = _blur(a * b) - mu_a * mu_b
  mu_a, mu_b = mu_a + 0.5, mu_b + 0.5
  c1, c2 = SSIM_K1**2, SSIM_K2**2
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def summary(per_image: dict[str, np.ndarray], ids: np.ndarray, codes: int) -> dict:
  """{name: {"value", "better", ...}}: the per-image scores' means and the codebook's usage and
  perplexity over all `ids`."""
  stats = {k: float(v) for k, v in quantizer.codebook_stats(jnp.asarray(ids), codes).items()}
  out = {"psnr": {"value": float(np.mean(per_image["psnr"])), "better": "higher", "unit": "dB"},
         "ssim": {"value": float(np.mean(per_image["ssim"])), "better": "higher"}}
  if "lpips" in per_image:
    out["lpips"] = {"value": float(np.mean(per_image["lpips"])), "better": "lower"}
  out["shift_consistency"] = {"value": float(np.mean(per_image["shift_consistency"])), "better": "higher"}
  out["codebook_usage"] = {"value": stats["codebook_usage"], "better": "higher",
                           "codes_used": int(np.unique(ids).size)}
  out["codebook_perplexity"] = {"value": stats["codebook_perplexity"], "better": "higher"}
  return out


class ImageSet(NamedTuple):
  """Images to tokenize, read a batch at a time."""
  count: int  # at most this many (unusable files are skipped)
  batches: Callable[[int], Iterator[tuple[np.ndarray, int]]]  # batch size -> (uint8 [n, S, S, 3], skipped)
  source: dict  # what they are, for the report


def array_images(images_NHW3: np.ndarray, source: dict) -> ImageSet:
  """Images already in memory, uint8 [N, S, S, 3]."""
  batches = lambda n: ((images_NHW3[i:i + n], 0) for i in range(0, len(images_NHW3), n))
  return ImageSet(len(images_NHW3), batches, source)


def held_out_images(size: int, shrink: int) -> ImageSet:
  """The crops of the built-in held-out pictures (data/images.py) that VQGAN training evaluates on."""
  from lvm_jax.data import images  # pylint: disable=g-import-not-at-top
  return array_images(images.held_out(size, shrink), {"kind": HELD_OUT, "pictures": list(images.HELD_OUT),
                                                      "shrink": shrink})


def source_images(spec: dict, size: int, mode: str, max_images: int, threads: int = 16) -> ImageSet:
  """Up to max_images items of a data/sources.py source, evenly spread, each as its first frame."""
  from lvm_jax.data import sources  # pylint: disable=g-import-not-at-top
  if max_images < 1:
    raise config_lib.ConfigError(f"--max_images={max_images}: need at least 1")
  try:
    src = sources.open_source({**spec, "size": size, "mode": mode})
    keys = src.keys()
  except ValueError as e:  # an unknown kind or key, a missing folder, an empty prefix
    raise config_lib.ConfigError(f"--source {json.dumps(spec)}: {e}") from None
  if not keys:
    raise config_lib.ConfigError(f"--source {json.dumps(spec)}: no images there")
  if len(keys) > max_images:  # evenly spread: folders are sorted by class or by time
    keys = [keys[i] for i in np.linspace(0, len(keys) - 1, max_images).round().astype(int)]

  def load(key: str) -> Optional[np.ndarray]:
    try:
      return src.load(key)[0]
    except sources.BadInput as e:
      logging.warning("tokenizer report: skipping %s: %s", key, e)
      return None

  def batches(n: int) -> Iterator[tuple[np.ndarray, int]]:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      for start in range(0, len(keys), n):
        try:
          loaded = list(pool.map(load, keys[start:start + n]))
        except ValueError as e:  # storage failures (data/files.py), not one bad file
          raise config_lib.ConfigError(f"--source {json.dumps(spec)}: {e}") from None
        good = [x for x in loaded if x is not None]
        yield (np.stack(good) if good else np.zeros((0, size, size, 3), np.uint8)), len(loaded) - len(good)

  return ImageSet(len(keys), batches, {**spec, "size": size, "mode": mode})


def parse_source(text: Optional[str]) -> Optional[dict]:
  """--source: None for the built-in held-out crops, else its JSON spec."""
  if not text or text == HELD_OUT:
    return None
  try:
    spec = json.loads(text)
  except json.JSONDecodeError as e:
    raise config_lib.ConfigError(f"--source {text!r}: not JSON ({e}) and not {HELD_OUT!r}") from None
  if not isinstance(spec, dict) or "kind" not in spec:
    raise config_lib.ConfigError(f"--source {text!r}: expected a JSON object with a 'kind', e.g. "
                                 '{"kind": "image_folder", "root": "/data/val"}')
  return spec


class Measured(NamedTuple):
  per_image: dict[str, np.ndarray]  # {"psnr", "ssim"[, "lpips"]}: [N] each
  ids: np.ndarray  # int32 [N, tokens per image]
  examples: list[tuple[np.ndarray, np.ndarray]]  # the first (original uint8, reconstruction in [0, 1])
  skipped: int


def _scorer(model: vqgan.Model, perceptual: Optional[Any]) -> Callable[[np.ndarray], tuple]:
  """jit(uint8 images) -> (ids [B, L], reconstructions, {score: [B]})."""
  graphdef, weights = nnx.split(model)
  lp_graphdef, lp_weights = nnx.split(perceptual) if perceptual is not None else (None, None)

  def score(weights: Any, lp_weights: Any, images_BHWC: jax.Array) -> tuple:
    m = nnx.merge(graphdef, weights)
    x = images_BHWC.astype(jnp.float32) / 255.0
    ids_Bhw = m.encode(x)
    recon = m.decode(ids_Bhw)
    f = m.cfg.factor
    moved_Bhw = m.encode(jnp.roll(x, (f, f), axis=(1, 2)))
    same_Bhw = (jnp.roll(ids_Bhw, (1, 1), axis=(1, 2)) == moved_Bhw)[:, 1:, 1:]
    scores = {"psnr": psnr(x, recon), "ssim": ssim(x, recon), "shift_consistency": jnp.mean(same_Bhw, axis=(1, 2))}
    if lp_graphdef is not None:
      scores["lpips"] = nnx.merge(lp_graphdef, lp_weights)(recon, x)
    return ids_Bhw.reshape(ids_Bhw.shape[0], -1), recon, scores

  jitted = jax.jit(score)
  return lambda images: jitted(weights, lp_weights, images)


def measure(model: vqgan.Model, image_set: ImageSet, batch: int, perceptual: Optional[Any] = None,
            keep: int = GRID_IMAGES) -> Measured:
  """Every image through encode -> decode, in fixed batches (the last one padded: one compile)."""
  if batch < 1:
    raise config_lib.ConfigError(f"--batch={batch}: need at least 1")
  score = _scorer(model, perceptual)
  per_image: dict[str, list] = {}
  ids, examples, skipped, seen = [], [], 0, 0
  tracker = progress.Progress("tokenizer report", image_set.count, unit="image")
  for images, bad in image_set.batches(batch):
    before, n = seen, len(images)
    skipped, seen = skipped + bad, seen + n + bad
    if n:
      padded = np.concatenate([images, np.zeros((batch - n, *images.shape[1:]), np.uint8)]) if n < batch else images
      batch_ids, recon, scores = jax.device_get(score(padded))
      ids.append(batch_ids[:n])
      for k, v in scores.items():
        per_image.setdefault(k, []).append(v[:n])
      examples += list(zip(images, recon[:n]))[:keep - len(examples)]
    if seen * 10 // image_set.count > before * 10 // image_set.count:  # about every tenth
      tracker.log(seen)
  if not ids:
    raise config_lib.ConfigError(f"no image could be loaded from {json.dumps(image_set.source)} "
                                 f"({skipped} skipped: see the warnings above)")
  return Measured({k: np.concatenate(v) for k, v in per_image.items()}, np.concatenate(ids), examples, skipped)


def report(model: vqgan.Model, image_size: int, image_set: ImageSet, tokenizer: dict, batch: int = 16,
           lpips_weights: Optional[str] = None) -> tuple[dict, Measured]:
  """(the JSON report, what it was computed from) of a VQGAN on a set of images."""
  perceptual = None
  if lpips_weights:
    from lvm_jax.models import lpips  # pylint: disable=g-import-not-at-top
    try:
      perceptual = lpips.from_file(lpips_weights)
    except Exception as e:  # pylint: disable=broad-except  # missing, not safetensors, not LPIPS-VGG
      raise config_lib.ConfigError(f"--lpips_weights {lpips_weights}: {str(e).strip().splitlines()[0]}") from None
  with progress.phase(f"tokenizing {image_set.count} images of {json.dumps(image_set.source)}"):
    measured = measure(model, image_set, batch, perceptual)
  grid = image_size // model.cfg.factor
  out = {"tokenizer": tokenizer, "image_size": image_size, "tokens_per_image": grid * grid, "codes": model.cfg.codes,
         "source": image_set.source, "images": len(measured.ids), "skipped": measured.skipped,
         "lpips_weights": os.path.abspath(lpips_weights) if lpips_weights else None,
         "metrics": summary(measured.per_image, measured.ids, model.cfg.codes)}
  return out, measured


class Loaded(NamedTuple):
  """A VQGAN and what the report says of it."""
  model: vqgan.Model
  image_size: int
  about: dict  # where it comes from, for the report
  step: int  # its training step (0 for a weights file), TensorBoard's step
  workdir: Optional[str]  # its train_vqgan workdir, if it has one
  config: Any  # that workdir's config, or the training config given with a weights file (else None)


def from_workdir(c: Any, workdir: str) -> Loaded:
  """The EMA generator of a train_vqgan workdir whose config.json is `c`."""
  from lvm_jax import load  # pylint: disable=g-import-not-at-top
  if config_lib.model_module(c) is not vqgan:
    raise config_lib.ConfigError(f"{workdir}: a model_name={c.get('model_name')!r} workdir, not a VQGAN's")
  with progress.phase(f"loading the VQGAN of {workdir}"):
    model, step = load.load_model(c, workdir)
  where = workdir if "://" in workdir else os.path.abspath(workdir)
  return Loaded(model, int(c.image_size), {"workdir": where, "step": step, "weights": "ema"}, step, workdir, c)


def load_tokenizer(spec: dict) -> Loaded:
  """A VQGAN named as lvm-prompt's --vqgan_* flags name one (prompt.define_vqgan_flags)."""
  from lvm_jax import load  # pylint: disable=g-import-not-at-top
  if spec.get("workdir") and not spec.get("weights"):
    return from_workdir(config_lib.load_from_workdir(load.resolve(spec["workdir"], None, "--vqgan_workdir")),
                        spec["workdir"])
  record = load.vqgan_record(spec)  # runs --vqgan_config: the user named it on the command line
  with progress.phase(f"loading {record['weights']}"):
    model, image_size = load.load_vqgan(record)
  config = spec.get("config")
  about = {"weights": record["weights"], "layout": record["layout"], "config": config and os.path.abspath(config)}
  # A training config (data.name) says which held-out images its training evaluates on.
  trained = config_lib.load_file(config) if config else None
  return Loaded(model, image_size, about, 0, None, trained if trained is not None and "data" in trained else None)


def default_images(tok: Loaded) -> ImageSet:
  """The held-out images a VQGAN's training evaluates on (its data module's evaluation_images);
  for a weights file without its training config the built-in picture's crops, shrunk to
  about four a side (as vqgan_tiny's 32 px crops of the 512 px picture shrunk by 4)."""
  if tok.config is None:
    return held_out_images(tok.image_size, max(1, 128 // tok.image_size))
  module = importlib.import_module(f"lvm_jax.data.{tok.config.data.name}")
  return array_images(module.evaluation_images(tok.config), {"kind": HELD_OUT, "data": tok.config.data.name})


def workdir_report(c: Any, workdir: str, batch: int = 16) -> dict:
  """lvm-evaluate's report of a VQGAN workdir: this report on its held-out crops, with LPIPS when
  the training config's weights file is there."""
  tok = from_workdir(c, workdir)
  lpips_weights = c.get("lpips_weights") or None
  lpips_weights = lpips_weights if lpips_weights and os.path.exists(lpips_weights) else None
  return report(tok.model, tok.image_size, default_images(tok), tok.about, batch, lpips_weights)[0]


def write_tensorboard(tb_dir: str, rep: dict, measured: Measured, step: int) -> None:
  """Scalars tokenizer/<metric>, the table as text and the original | reconstruction grid, at the
  tokenizer's training step; earlier reports in tb_dir stay (metrics.jsonl and event files)."""
  rows = [[("original", x), ("reconstruction", r)] for x, r in measured.examples]
  with metrics.Writer(tb_dir, resume_step=sys.maxsize) as writer:  # resume_step: drop no earlier row
    writer.write(step, {f"tokenizer/{k}": v["value"] for k, v in rep["metrics"].items()})
    writer.text("tokenizer/report", table(rep), step)
    writer.image("tokenizer/reconstructions", pictures.grid(rows), step)


def _source_text(source: dict) -> str:
  if source.get("kind") == HELD_OUT and "data" in source:
    return f"the held-out images its training evaluates on (lvm_jax/data/{source['data']}.py)"
  if source.get("kind") == HELD_OUT:
    return f"the held-out crops of {', '.join(source['pictures'])} (shrunk {source['shrink']}x)"
  return json.dumps({k: v for k, v in source.items() if k not in ("size", "mode")}) + f", {source['mode']}"


def table(rep: dict) -> str:
  """The console's (and TensorBoard's) summary of a report."""
  t = rep["tokenizer"]
  what = (f"step {t['step']} of {t['workdir']} (EMA)" if "workdir" in t else f"{t['weights']} ({t['layout']})")
  lines = [f"tokenizer report of {what}: {rep['image_size']} px images, {rep['tokens_per_image']} tokens "
           f"of {rep['codes']} codes",
           f"{rep['images']} images from {_source_text(rep['source'])}"
           + (f", {rep['skipped']} skipped" if rep["skipped"] else ""),
           f"{'metric':22s} {'value':>9s}  better"]
  for name, m in rep["metrics"].items():
    label = name.replace("_", " ") + (f" ({m['unit']})" if "unit" in m else "")
    note = f"  ({m['codes_used']} of {rep['codes']} codes)" if "codes_used" in m else ""
    lines.append(f"{label:22s} {m['value']:9.4g}  {m['better']}{note}")
  if "lpips" not in rep["metrics"]:
    lines.append(f"{'lpips':22s} {'-':>9s}  (no LPIPS weights: --lpips_weights, made by lvm-convert-lpips)")
  return "\n".join(lines)


def cli_main() -> None:
  from lvm_jax import prompt  # pylint: disable=g-import-not-at-top
  vqgan_spec = prompt.define_vqgan_flags()
  source = flags.DEFINE_string("source", HELD_OUT, "Images: 'held_out' (those its training evaluates on) or a "
                               'data/sources.py spec as JSON, e.g. \'{"kind": "image_folder", "root": "/data/val"}\'.')
  resize = flags.DEFINE_enum("resize", "squash", ["squash", "center_crop"], "How --source images become "
                             "the tokenizer's size: squash (as make_dataset tokenizes) or center_crop.")
  max_images = flags.DEFINE_integer("max_images", 512, "Images of --source, at most (spread evenly over it).")
  batch = flags.DEFINE_integer("batch", 16, "Images per compiled batch.")
  lpips_weights = flags.DEFINE_string("lpips_weights", None, "LPIPS-VGG safetensors (lvm-convert-lpips); default: "
                                      "a VQGAN workdir's training config's, if that file exists.")
  out = flags.DEFINE_string("out", None, "JSON output path: every number, whether higher or lower is better, "
                            "and where it comes from.")
  tb_dir = flags.DEFINE_string("tb_dir", None, "TensorBoard directory (default: <vqgan workdir>/tokenizer_report; "
                               "none for a weights file).")

  def main(_):
    spec = vqgan_spec()
    if spec is None:
      raise config_lib.ConfigError("name the VQGAN: --vqgan_workdir, or --vqgan_weights with --vqgan_config")
    tok = load_tokenizer(spec)
    parsed = parse_source(source.value)
    images = default_images(tok) if parsed is None else source_images(parsed, tok.image_size, resize.value,
                                                                       max_images.value)
    lpips_file = lpips_weights.value
    if lpips_file is None and tok.config is not None and os.path.exists(tok.config.get("lpips_weights") or ""):
      lpips_file = tok.config.lpips_weights
    rep, measured = report(tok.model, tok.image_size, images, tok.about, batch.value, lpips_file)
    if out.value:
      os.makedirs(os.path.dirname(os.path.abspath(out.value)), exist_ok=True)
      with open(out.value, "w") as f:
        json.dump(rep, f, indent=1)
      logging.info("wrote %s", out.value)
    tb = tb_dir.value or (tok.workdir and os.path.join(tok.workdir, "tokenizer_report"))
    if tb:
      write_tensorboard(tb, rep, measured, tok.step)
      logging.info("TensorBoard: %s", tb)
    print(table(rep))

  cli.run(main, required=[])


if __name__ == "__main__":
  cli_main()
