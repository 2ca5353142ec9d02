"""The tokenizer report (lvm_jax/tokenizer_report.py): its SSIM is skimage's, its codebook numbers
are the histogram's, and the command writes JSON, TensorBoard and a table for a weights file and an
image folder (a VQGAN workdir's report, through lvm-evaluate: tests/test_load.py)."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from PIL import Image

from lvm_jax import config as config_lib, tokenizer_report
from lvm_jax.convert import vqgan_torch
from lvm_jax.data import images as images_lib
from lvm_jax.models import vqgan
from tests.conftest import REPO, events, load_config
from tests.models.test_lpips import _random_weights as _random_lpips_weights


def _pictures(size=48):
  """Three scikit-image pictures and a blurred, a noisy and a darker version of each: [9, S, S, 3]."""
  originals = images_lib.pictures(("astronaut", "coffee", "chelsea"), 1)
  square = [np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC)) for p in originals]
  rng = np.random.default_rng(0)
  pairs = []
  for p in square:
    blurred = np.asarray(Image.fromarray(p).resize((size // 4, size // 4)).resize((size, size), Image.BILINEAR))
    noisy = np.clip(p + rng.normal(0, 20, p.shape), 0, 255).astype(np.uint8)
    pairs += [(p, blurred), (p, noisy), (p, (p * 0.7).astype(np.uint8))]
  return np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs])


def test_ssim_is_skimages_gaussian_ssim():
  from skimage.metrics import structural_similarity  # pylint: disable=g-import-not-at-top
  a, b = _pictures()
  ours = np.asarray(tokenizer_report.ssim(a / 255.0, b / 255.0))
  want = [structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=255, channel_axis=-1) for x, y in zip(a, b)]
  assert np.ptp(want) > 0.3  # the pairs span good and bad reconstructions
  np.testing.assert_allclose(ours, want, atol=1e-4)


def test_perfect_reconstruction_scores_the_maximum():
  a, _ = _pictures(size=16)
  x = a / 255.0
  np.testing.assert_allclose(np.asarray(tokenizer_report.ssim(x, x)), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(tokenizer_report.psnr(x, x)), 100.0)
  one_grey_level = np.clip(a.astype(np.int32) + 1, 0, 255) / 255.0  # MSE just under (1/255)^2: ~48.1 dB
  assert np.all(np.asarray(tokenizer_report.psnr(x, one_grey_level)) >= 48.1)
  with pytest.raises(config_lib.ConfigError, match="more than 10 pixels a side"):
    tokenizer_report.ssim(x[:, :10, :10], x[:, :10, :10])


def test_codebook_usage_and_perplexity_of_a_known_histogram():
  ids = np.array([[0, 0, 1, 1], [2, 2, 2, 2]])  # histogram 2, 2, 4 of 16 codes
  per_image = {"psnr": np.array([20.0, 30.0]), "ssim": np.array([0.5, 0.7]), "shift_consistency": np.array([0.5, 1.0])}
  m = tokenizer_report.summary(per_image, ids, codes=16)
  p = np.array([0.25, 0.25, 0.5])
  np.testing.assert_allclose(m["codebook_perplexity"]["value"], np.exp(-np.sum(p * np.log(p))), rtol=1e-6)
  assert m["codebook_usage"]["value"] == 3 / 16 and m["codebook_usage"]["codes_used"] == 3
  assert m["psnr"] == {"value": 25.0, "better": "higher", "unit": "dB"} and m["ssim"]["value"] == pytest.approx(0.6)
  assert m["shift_consistency"]["value"] == 0.75
  assert all(v["better"] == "higher" for v in m.values()) and "lpips" not in m


def test_shift_consistency_counts_codes_that_follow_a_one_token_move():
  """Per image: the share of the tokens of the image rolled one token down and right whose code is
  the code of the token that content came from (the first row and column wrapped: not counted)."""
  model = vqgan.Model(vqgan.Config(**load_config("vqgan_tiny").model), rngs=nnx.Rngs(0))
  x = _pictures(size=32)[0][:3]
  measured = tokenizer_report.measure(model, tokenizer_report.array_images(x, {"kind": "test"}), batch=2)
  f = model.cfg.factor
  ids = np.asarray(model.encode(x / 255.0))
  moved = np.asarray(model.encode(np.roll(x / 255.0, (f, f), axis=(1, 2))))
  want = (moved[:, 1:, 1:] == ids[:, :-1, :-1]).mean((1, 2))
  np.testing.assert_allclose(measured.per_image["shift_consistency"], want, atol=1e-6)
  assert np.all(want < 1)  # an untrained encoder's codes do not follow the move


def test_bad_sources_are_one_line():
  for text, message in [("{nope", "not JSON"), ('["image_folder"]', "expected a JSON object with a 'kind'"),
                        ('{"kind": "folder"}', "source kind='folder': expected one of")]:
    with pytest.raises(config_lib.ConfigError, match=message) as e:
      spec = tokenizer_report.parse_source(text)
      tokenizer_report.source_images(spec, 32, "squash", 8)
    assert "\n" not in str(e.value)
  assert tokenizer_report.parse_source("held_out") is None
  with pytest.raises(config_lib.ConfigError, match="no images there"):
    tokenizer_report.source_images({"kind": "builtin_images", "names": []}, 32, "squash", 8)


def _random_tokenizer(path: str) -> None:
  """vqgan_tiny's architecture with random weights as a safetensors file (no init to compile)."""
  cfg = vqgan.Config(**load_config("vqgan_tiny").model)
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: vqgan.Model(cfg, rngs=nnx.Rngs(0))), nnx.Param))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32), abstract)
  vqgan_torch.save_safetensors(params, path, cfg)


@pytest.mark.slow  # ~20 s: a CLI subprocess; the default suite keeps the metric contracts above
def test_report_of_weights_on_an_image_folder(tmp_path):
  """The command end to end: five pictures and a broken file; JSON, TensorBoard, the table."""
  folder = tmp_path / "pictures"
  folder.mkdir()
  for i, picture in enumerate(images_lib.pictures(("astronaut", "coffee", "chelsea", "rocket", "retina"), 8)):
    Image.fromarray(picture).save(folder / f"{i}.png")
  (folder / "5.png").write_bytes(b"not a picture")
  _random_tokenizer(str(tmp_path / "vq.safetensors"))
  safetensors.numpy.save_file(_random_lpips_weights(), str(tmp_path / "lpips.safetensors"))
  out, tb = tmp_path / "report.json", tmp_path / "tb"
  cmd = [sys.executable, "-m", "lvm_jax.tokenizer_report", f"--vqgan_weights={tmp_path / 'vq.safetensors'}",
         f"--vqgan_config={REPO}/configs/vqgan_tiny.py", f"--lpips_weights={tmp_path / 'lpips.safetensors'}",
         "--source", json.dumps({"kind": "image_folder", "root": str(folder)}), "--batch=4", f"--out={out}",
         f"--tb_dir={tb}"]
  proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rep = json.loads(out.read_text())
  assert (rep["images"], rep["skipped"], rep["tokens_per_image"], rep["codes"]) == (5, 1, 64, 256)
  assert rep["tokenizer"]["weights"] == str(tmp_path / "vq.safetensors") and rep["tokenizer"]["layout"] == "diffusers"
  assert rep["source"]["mode"] == "squash" and rep["source"]["size"] == 32
  m = rep["metrics"]
  assert sorted(m) == ["codebook_perplexity", "codebook_usage", "lpips", "psnr", "shift_consistency", "ssim"]
  assert 0 <= m["shift_consistency"]["value"] <= 1
  assert m["lpips"]["better"] == "lower" and m["lpips"]["value"] > 0
  assert 1 <= m["codebook_perplexity"]["value"] <= m["codebook_usage"]["codes_used"] <= 5 * 64
  assert m["codebook_usage"]["value"] == m["codebook_usage"]["codes_used"] / 256
  assert "5 images from " in proc.stdout and "1 skipped" in proc.stdout and "psnr (dB)" in proc.stdout
  [events_file] = glob.glob(str(tb / "tensorboard" / "events.out.tfevents.*"))
  found = {tag: value for _, tag, value in events(open(events_file, "rb").read())}
  assert found["tokenizer/psnr"] == pytest.approx(m["psnr"]["value"], rel=1e-6)
  assert {f"tokenizer/{name}" for name in m} <= set(found)
  assert found["tokenizer/reconstructions"].height > 5 * 32  # five original | reconstruction rows
  assert "5 images from" in found["tokenizer/report/text_summary"]
