"""VQGAN training: python -m lvm_jax.train_vqgan --config configs/vqgan_tiny.py --workdir W.

Generator loss = L1 + perceptual (LPIPS-VGG) + codebook + commitment + (from `gan.start`) a
PatchGAN hinge loss scaled by taming's adaptive weight |grad nll| / |grad gan| at the decoder's
last layer. Why PatchGAN + hinge + adaptive weight rather than StyleGAN + R1 + LeCAM: it is what
taming and LlamaGen train f16 tokenizers with, needs no second-order gradient (R1), and the
adaptive weight keeps the GAN term from swamping reconstruction whatever the loss scales.
Data-parallel over the mesh (params replicated, batch sharded), generator EMA, PSNR of the EMA
model on held-out crops with reconstruction grids in TensorBoard. The loop is the LVM trainer's
(loop.py): verified orbax checkpoints of everything plus the data iterator, exact resume,
SIGTERM, the non-finite guard (a step whose generator or discriminator loss or gradients are not
finite changes nothing), metrics.jsonl + TensorBoard.
"""

import functools
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lvm_jax import checkpoint, cli, loop, metrics, sharding, workdir as workdir_lib
from lvm_jax.data import images as images_lib
from lvm_jax.models import discriminator, lpips, vqgan


def _conv(conv: nnx.Conv, x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv` applied with another kernel (the adaptive weight differentiates w.r.t. it)."""
  y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), conv.padding,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + conv.bias[...].astype(x.dtype).reshape(1, 1, 1, -1)


def generator_loss(gparams: Any, dparams: Any, images: jax.Array, gan_on: jax.Array, *, c: Any,
                   gdef: Any, ddef: Any, perceptual: Any) -> tuple[jax.Array, dict]:
  model, disc = nnx.merge(gdef, gparams), nnx.merge(ddef, dparams)
  feats, aux = model(images)
  conv_out = model.decoder.conv_out

  def nll_and_gan(kernel: jax.Array, feats: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    recon = _conv(conv_out, feats, kernel).astype(jnp.float32)
    nll = jnp.mean(jnp.abs(images - recon))
    if perceptual is not None:
      nll = nll + c.perceptual_weight * jnp.mean(perceptual(recon, images))
    return nll, discriminator.generator_loss(disc(recon)), recon

  kernel = conv_out.kernel[...]
  nll, gan, recon = nll_and_gan(kernel, feats)
  # Adaptive weight (taming): balance the two gradients at the last layer; a constant for the step.
  fixed = jax.lax.stop_gradient(feats)
  g_nll = jax.grad(lambda k: nll_and_gan(k, fixed)[0])(kernel)
  g_gan = jax.grad(lambda k: nll_and_gan(k, fixed)[1])(kernel)
  weight = jnp.clip(optax.tree.norm(g_nll) / (optax.tree.norm(g_gan) + 1e-4), 0.0, 1e4)
  weight = jax.lax.stop_gradient(weight * c.gan.weight * gan_on)
  total = nll + weight * gan + aux["codebook_loss"] + aux["commitment_loss"] + aux.get("entropy_loss", 0.0)
  return total, {"nll": nll, "gan_g": gan, "gan_weight": weight, "recon": recon, **aux}


def train_step(state: dict, batch: dict, *, c: Any, gdef: Any, ddef: Any, perceptual: Any,
               g_tx: optax.GradientTransformation, d_tx: optax.GradientTransformation) -> tuple[dict, dict]:
  images = batch["images"].astype(jnp.float32) / 255.0
  gan_on = (state["step"] >= c.gan.start).astype(jnp.float32)
  loss_fn = functools.partial(generator_loss, c=c, gdef=gdef, ddef=ddef, perceptual=perceptual)
  (g_total, aux), g_grads = jax.value_and_grad(loss_fn, has_aux=True)(state["g"], state["d"], images, gan_on)
  recon = jax.lax.stop_gradient(aux.pop("recon"))

  def d_loss(dparams: Any) -> jax.Array:
    disc = nnx.merge(ddef, dparams)
    return discriminator.hinge_d_loss(disc(images), disc(recon))

  d_value, d_grads = jax.value_and_grad(d_loss)(state["d"])
  d_grads = jax.tree.map(lambda g: g * gan_on, d_grads)  # the discriminator waits for the GAN start
  g_updates, g_opt = g_tx.update(g_grads, state["g_opt"], state["g"])
  d_updates, d_opt = d_tx.update(d_grads, state["d_opt"], state["d"])
  g = optax.apply_updates(state["g"], g_updates)
  ema = jax.tree.map(lambda e, p: c.ema * e + (1.0 - c.ema) * p, state["ema"], g)
  new = {"g": g, "d": optax.apply_updates(state["d"], d_updates), "ema": ema, "g_opt": g_opt, "d_opt": d_opt}
  finite = (jnp.isfinite(g_total) & jnp.isfinite(d_value) & jnp.isfinite(optax.tree.norm(g_grads))
            & jnp.isfinite(optax.tree.norm(d_grads)) & jnp.isfinite(optax.tree.norm(g)))
  new, count = loop.guard(state, new, finite)
  stats = vqgan.codebook_stats(aux.pop("ids"), c.model.codes)
  psnr = -10.0 * jnp.log10(jnp.mean(jnp.square(jnp.clip(recon, 0, 1) - images)))
  return new, {"loss": g_total, "d_loss": d_value, "train_psnr": psnr, **aux, **stats, **count}


def load_perceptual(c: Any) -> Any:
  if not c.lpips_weights or not os.path.exists(c.lpips_weights):
    if c.perceptual_weight:
      warnings.warn(f"no LPIPS weights at {c.lpips_weights or '(lpips_weights unset)'}: perceptual weight "
                    "is 0 (make the file with python -m lvm_jax.convert.lpips_weights)", stacklevel=2)
    return None
  return lpips.from_file(c.lpips_weights)


def build(c: Any, mesh: jax.sharding.Mesh) -> dict:
  """Graphs, optimizers, the init function and the (replicated) state sharding."""
  cfg = vqgan.Config(**c.model)
  gdef, _ = nnx.split(nnx.eval_shape(lambda: vqgan.Model(cfg, rngs=nnx.Rngs(0))))
  ddef, _ = nnx.split(nnx.eval_shape(lambda: discriminator.Model(nnx.Rngs(0), c.gan.width, c.gan.layers)))
  adam = lambda lr: optax.chain(optax.clip_by_global_norm(c.clip), optax.adam(lr, b1=c.b1, b2=c.b2))
  g_tx, d_tx = adam(c.lr), adam(c.gan.lr)

  def init(key: jax.Array) -> dict:
    kg, kd = jax.random.split(key)
    g = nnx.to_pure_dict(nnx.state(vqgan.Model(cfg, rngs=nnx.Rngs(kg)), nnx.Param))
    d = nnx.to_pure_dict(nnx.state(discriminator.Model(nnx.Rngs(kd), c.gan.width, c.gan.layers), nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "g": g, "d": d, "ema": g, "g_opt": g_tx.init(g),
            "d_opt": d_tx.init(d), **loop.counters()}

  abstract = jax.eval_shape(init, jax.random.key(0))
  replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract)
  return dict(cfg=cfg, gdef=gdef, ddef=ddef, g_tx=g_tx, d_tx=d_tx, init=init, state_shardings=replicated,
              abstract_state=checkpoint.abstract_like(abstract, replicated),
              batch_sharding=NamedSharding(mesh, P(sharding.batch_spec(c.rules)[0])))


def evaluate(reconstruct: Any, ema: Any, held_out: np.ndarray) -> tuple[float, np.ndarray]:
  """PSNR (dB) of the EMA model's reconstructions of the held-out crops, and a comparison grid."""
  x = jnp.asarray(held_out, jnp.float32) / 255.0
  recon = np.asarray(reconstruct(ema, x))
  psnr = float(-10.0 * np.log10(np.mean(np.square(recon - np.asarray(x)))))
  pairs = np.concatenate([np.asarray(x), recon], axis=2)[:8]  # original | reconstruction
  return psnr, np.concatenate(list(pairs), axis=0)


def train_vqgan(c: Any, workdir: str, stop_at: int | None = None) -> dict:
  """Trains to c.steps (or SIGTERM, or `stop_at`), resuming from the newest checkpoint that
  verifies in workdir, through the LVM trainer's loop (loop.py); returns the final state."""
  workdir_lib.check_writable(workdir)
  with c.unlocked():
    workdir_lib.absolute_paths(c)
  mesh = sharding.make_mesh(c.mesh)
  sharding.check_batch(c.global_batch, 1, mesh, c.rules)
  b = build(c, mesh)
  data_iter = images_lib.make_iterator(c, sharding.local_rows(b["batch_sharding"], c.global_batch))
  held_out = images_lib.held_out(c.image_size, c.data.shrink)
  perceptual = load_perceptual(c)
  reconstruct = jax.jit(lambda ema, x: (lambda m: m.decode(m.encode(x)))(nnx.merge(b["gdef"], ema)))
  step_fn = jax.jit(functools.partial(train_step, c=c, gdef=b["gdef"], ddef=b["ddef"], perceptual=perceptual,
                                      g_tx=b["g_tx"], d_tx=b["d_tx"]),
                    in_shardings=(b["state_shardings"], b["batch_sharding"]),
                    out_shardings=(b["state_shardings"], None), donate_argnums=0)

  def held_out_eval(state: dict, step: int, writer: metrics.Writer) -> dict:
    psnr, grid = evaluate(reconstruct, state["ema"], held_out)
    writer.image("held_out/original|reconstruction", grid, step)
    return {"psnr": psnr}

  row = lambda m, step_time: {k: float(v) for k, v in m.items() if k not in loop.COUNTERS}
  trainer = loop.Trainer(abstract_state=b["abstract_state"], state_shardings=b["state_shardings"], init=b["init"],
                         batch_sharding=b["batch_sharding"], step_fn=step_fn, row=row, evaluate=held_out_eval,
                         eval_every=c.eval_every)
  return loop.run(c, workdir, trainer, data_iter, mesh, stop_at)


def cli_main() -> None:
  config = cli.define_config()
  workdir = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard go here.")
  stop_at = flags.DEFINE_integer("stop_at", None, "Save and exit after this step (a job's budget).")
  cli.run(lambda _: train_vqgan(config.value, workdir.value, stop_at.value), required=["config", "workdir"])


if __name__ == "__main__":
  cli_main()
