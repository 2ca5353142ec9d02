"""Visual prompting from a training workdir and from an HF export, through the API and the CLI."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lvm_jax import load, pictures as pict, prompt, train
from lvm_jax.convert import vqgan_torch
from lvm_jax.models import vqgan
from tests.conftest import REPO, load_config

VQ_CONFIG = os.path.join(REPO, "configs", "vqgan_tiny.py")
GAP, STRIP = pict.GAP, pict.STRIP


@pytest.fixture(scope="module")
def lvm_workdir(tmp_path_factory):
  """A 2-step tiny LVM whose config names a random tiny VQGAN (32x32 images, 64 tokens, 256 codes)."""
  root = tmp_path_factory.mktemp("prompt")
  cfg = vqgan.Config(**load_config("vqgan_tiny").model)
  weights = str(root / "vq.safetensors")
  vqgan_torch.save_safetensors(nnx.to_pure_dict(nnx.state(vqgan.Model(cfg, rngs=nnx.Rngs(0)), nnx.Param)), weights, cfg)
  c = load_config("lvm_tiny", "test")
  c.model.vocab_size, c.tokens_per_image, c.seq_len = 256, 64, 128
  c.steps, c.optim.warmup = 2, 1
  # What training stores of the user's spec: absolute paths, the architecture as data.
  c.vqgan = load.vqgan_record(dict(config=VQ_CONFIG, workdir="", weights=weights, layout="diffusers"))
  train.train(c, str(root / "lvm"))
  return str(root / "lvm"), weights


def pictures(n: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_continue_images_shapes_and_seeds(lvm_workdir):
  p = prompt.from_workdir(lvm_workdir[0])
  assert p.step == 2  # the checkpoint's step, for reports to name
  imgs = pictures(3)
  a = p.continue_images(imgs, 2, jax.random.key(0), candidates=2)
  assert a.shape == (1, 2, 2, 32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, p.continue_images(imgs, 2, jax.random.key(0), candidates=2))
  assert not np.array_equal(a, p.continue_images(imgs, 2, jax.random.key(1), candidates=2))
  batch = p.continue_images(np.stack([imgs, pictures(3, seed=1)]), 1, jax.random.key(0))
  assert batch.shape == (2, 1, 1, 32, 32, 3)


def test_consensus_is_the_candidate_nearest_the_others():
  """The minimum-Bayes-risk pick under pixel MSE: per row, the candidate whose summed squared
  distance to the row's candidates is least (checked against the sum written out), always one of
  the candidates themselves, never a blend."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (4, 6, 5, 5, 3), dtype=np.uint8)
  x[0, 1] = x[0, 3] = x[0, 4]  # three equal candidates outvote three others
  risk = lambda row: [sum(np.sum((a.astype(np.int64) - b) ** 2) for b in row) for a in row]
  picked = prompt.consensus(x)
  assert picked.shape == (4, 5, 5, 3) and picked.dtype == np.uint8
  for b in range(4):
    np.testing.assert_array_equal(picked[b], x[b, int(np.argmin(risk(x[b])))])
  np.testing.assert_array_equal(picked[0], x[0, 4])
  flat = np.full((1, 3, 2, 2, 3), 0, np.uint8)
  flat[0, 1], flat[0, 2] = 100, 255  # a blend would be the mean, 118; the pick is the middle candidate
  np.testing.assert_array_equal(prompt.consensus(flat)[0], flat[0, 1])


def test_grid_labels_prompt_answer_and_candidates():
  prompts, answer, generated = pictures(3), pictures(1, seed=1)[0], pictures(2 * 2, seed=2).reshape(2, 2, 32, 32, 3)
  g = prompt.grid(prompts, generated, answer)
  cell, step = STRIP + 128, 128 + GAP  # 32 -> 128 by nearest neighbour; a label strip above each
  # First row: prompt 1..3 and the answer; then candidate 1 and 2, each with its two images.
  assert g.shape == (3 * cell + 2 * GAP, 4 * 128 + 3 * GAP, 3)
  big = lambda x: x.repeat(4, 0).repeat(4, 1)
  np.testing.assert_array_equal(g[STRIP:cell, step:step + 128], big(prompts[1]))
  np.testing.assert_array_equal(g[STRIP:cell, 3 * step:], big(answer))
  np.testing.assert_array_equal(g[2 * (cell + GAP) + STRIP:, step:step + 128], big(generated[1, 1]))
  assert np.all(g[cell + GAP:, 2 * step:] == 255)  # candidate rows are two cells wide
  label = lambda text: pict.grid([[(text, answer)]])[:STRIP]
  np.testing.assert_array_equal(g[:STRIP, :128], label("prompt 1"))
  np.testing.assert_array_equal(g[:STRIP, 3 * step:], label("answer"))
  np.testing.assert_array_equal(g[2 * (cell + GAP):2 * (cell + GAP) + STRIP, step:step + 128], label("generated 2.2"))
  assert not np.array_equal(label("generated 2.2"), label("generated 2.1"))
  # Without a known answer (the CLI) and one image per candidate: "generated c" under the prompt.
  one = prompt.grid(prompts, generated[:, :1])
  assert one.shape == (3 * cell + 2 * GAP, 3 * 128 + 2 * GAP, 3)
  np.testing.assert_array_equal(one[cell + GAP:cell + GAP + STRIP, :128], label("generated 1"))


@pytest.mark.slow  # ~17 s: the CLI in a subprocess
def test_cli_writes_the_grid(lvm_workdir, tmp_path):
  paths = []
  for i, img in enumerate(pictures(2)):
    paths.append(str(tmp_path / f"p{i}.png"))
    Image.fromarray(img).save(paths[-1])
  out = tmp_path / "o.png"
  cmd = [sys.executable, "-m", "lvm_jax.prompt", f"--workdir={lvm_workdir[0]}", f"--images={','.join(paths)}",
         f"--out={out}", "--candidates=2", "--temperature=0"]
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  # Two prompt images in the first row, then one row per candidate (pictures.grid's layout).
  assert Image.open(out).size == (2 * 128 + GAP, 3 * (STRIP + 128) + 2 * GAP)
  bad = subprocess.run(cmd[:4] + [f"--images={tmp_path / 'missing.png'}", f"--out={out}"], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"))
  # The error is the last line, with no traceback (cli.py may log a "starting:" line before it).
  assert bad.returncode == 2 and "missing.png" in bad.stderr.strip().splitlines()[-1], bad.stderr
  assert "Traceback" not in bad.stderr, bad.stderr


def test_hf_export_prompts_like_the_workdir(lvm_workdir, tmp_path):
  from lvm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from lvm_jax.convert import hf_llama  # pylint: disable=g-import-not-at-top
  workdir, weights = lvm_workdir
  cfg, params, step = load.load_params(config_lib.load_from_workdir(workdir), workdir)
  hf_llama.save_pretrained(params, cfg, str(tmp_path / "hf"), codes=256, step=step)
  spec = dict(config=VQ_CONFIG, workdir="", weights=weights, layout="diffusers")
  greedy = lambda p: p.continue_images(pictures(2), 1, jax.random.key(0), temperature=0.0)
  exported, original = prompt.from_hf(str(tmp_path / "hf"), spec), prompt.from_workdir(workdir)
  np.testing.assert_array_equal(greedy(exported), greedy(original))
  assert exported.step == original.step == step  # reports name the checkpoint either way
