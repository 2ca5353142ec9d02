"""VQGAN training end to end on built-in pictures: PSNR rises, the GAN starts on time, resume works."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvm_jax import sharding, train_vqgan
from lvm_jax.data import images
from lvm_jax.models import discriminator, lpips, vqgan
from tests.conftest import load_config
from tests.models.test_lpips import _random_weights


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow  # ~2.5 min: 180 VQGAN steps
def test_tiny_vqgan_learns_and_resumes(tmp_path):
  c = load_config("vqgan_tiny", "test")
  with pytest.warns(UserWarning, match="perceptual weight is 0"):
    train_vqgan.train_vqgan(c, str(tmp_path))
  rows = _rows(tmp_path)
  psnr = {r["step"]: r["eval/psnr"] for r in rows if "eval/psnr" in r}
  assert sorted(psnr) == [80, 160]
  held = images.held_out(c.image_size, c.data.shrink).astype(np.float32) / 255
  # PSNR as eval/psnr has it (tokenizer_report.psnr): the mean over images of each one's.
  mse = np.mean(np.square(held - held.mean(axis=(1, 2), keepdims=True)), axis=(1, 2, 3))
  mean_colour = np.mean(-10 * np.log10(mse))
  assert psnr[160] > psnr[80] + 0.5 and psnr[160] > mean_colour + 0.5, (psnr, mean_colour)
  gan = {r["step"]: r["gan_weight"] for r in rows}
  assert all(w == 0 for s, w in gan.items() if s <= c.gan.start) and all(w > 0 for s, w in gan.items() if s > c.gan.start + 1)
  assert os.listdir(tmp_path / "tensorboard")
  c.steps = 180
  train_vqgan.train_vqgan(c, str(tmp_path))
  assert [r["step"] for r in _rows(tmp_path)][-2:] == [160, 180]


@pytest.mark.slow  # ~40 s: compiling the generator loss with LPIPS-VGG
def test_perceptual_term_is_lpips_of_the_reconstruction():
  """The generator's reconstruction term is L1 + weight x LPIPS of the reconstruction it returns."""
  c = load_config("vqgan_tiny", "test")
  b = train_vqgan.build(c, sharding.make_mesh(c.mesh, jax.devices()[:1]))
  state = b.init(jax.random.key(0))
  batch = {"images": jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)), jnp.uint8)}
  images = batch["images"].astype(jnp.float32) / 255.0
  perceptual = lpips.Model(nnx.Rngs(1), weights=_random_weights())  # LPIPS heads are >= 0
  critic = nnx.merge(b.critic_graphdef, state["d"])
  loss = jax.jit(lambda g: vqgan.loss(nnx.merge(b.graphdef, g), batch, perceptual=perceptual, gan_weight=0.0,
                                      gan_loss=lambda r: discriminator.generator_loss(critic(r))))
  _, aux = loss(state["g"])
  l1 = float(jnp.mean(jnp.abs(images - aux["recon"])))
  expected = c.perceptual_weight * float(jnp.mean(perceptual(aux["recon"], images)))
  assert expected > 0.01
  np.testing.assert_allclose(float(aux["nll"]) - l1, expected, rtol=1e-4)


def test_shift_weight_schedule_is_piecewise_constant():
  schedule = ((10, 0.2), (20, 1.0))
  got = [float(train_vqgan.shift_weight(schedule, jnp.int32(s))) for s in (0, 9, 10, 19, 20, 500)]
  assert got == pytest.approx([0.0, 0.0, 0.2, 0.2, 1.0, 1.0])
  assert float(train_vqgan.shift_weight((), jnp.int32(5))) == 0.0


@pytest.mark.parametrize("bad", [((10, 0.2), (5, 1.0)), ((10, -1.0),), ((10,),)])
def test_bad_shift_weights_are_one_line(bad):
  from lvm_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  c = load_config("vqgan_demo")
  c.shift_weights = bad
  with pytest.raises(ConfigError, match="shift_weights=.*expected \\(from_step, weight\\) pairs"):
    vqgan.validate(c)
