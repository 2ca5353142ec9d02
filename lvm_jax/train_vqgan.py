"""VQGAN training: python -m lvm_jax.train_vqgan --config configs/vqgan_tiny.py --workdir W.

What is this trainer's own: the generator (models/vqgan.py's loss: L1 + perceptual LPIPS-VGG +
codebook + commitment + an adaptively weighted GAN term) and a PatchGAN critic with hinge loss
(models/discriminator.py), two Adam optimizers, the critic's start (`gan.start`), and the
generator's EMA. Why PatchGAN + hinge + adaptive weight rather than StyleGAN + R1 + LeCAM: it is
what taming and LlamaGen train f16 tokenizers with, needs no second-order gradient (R1), and the
adaptive weight keeps the GAN term from swamping reconstruction whatever the loss scales.
Everything else is the trainer core's (loop.py), as for the LVM: config validation, the mesh
(data-parallel: params replicated, batch sharded), verified orbax checkpoints of the state and
the data iterator, exact resume, SIGTERM, the non-finite guard (a step whose generator or
critic loss or gradients are not finite changes nothing), metrics read one step late,
metrics.jsonl + TensorBoard with held-out PSNR of the EMA model and reconstruction grids.
"""

import dataclasses
import functools
import importlib
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lvm_jax import cli, evaluate, loop, metrics, pictures
from lvm_jax.models import discriminator, lpips, quantizer, vqgan


@dataclasses.dataclass(frozen=True)
class Built(loop.Built):
  """loop.Built (graphdef and tx: the generator's) and the critic's graph and optimizer."""
  critic_graphdef: Any = None
  critic_tx: Any = None


def shift_weight(schedule: Any, step: jax.Array) -> jax.Array:
  """The shift loss's weight at `step`: (from_step, weight) pairs, piecewise constant, 0 before the first."""
  weight = jnp.float32(0.0)
  for start, w in schedule:
    weight = jnp.where(step >= start, jnp.float32(w), weight)
  return weight


def _shift(c: Any, step: jax.Array) -> jax.Array:
  """This step's whole-token shift (dy, dx) for the shift loss: each in [-2, 2], not both 0."""
  pairs = jnp.array([(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if dy or dx])
  return pairs[jax.random.randint(jax.random.fold_in(jax.random.key(c.seed), step), (), 0, len(pairs))]


def train_step(state: dict, batch: dict, *, c: Any, b: Built, perceptual: Any) -> tuple[dict, dict]:
  """One update of the generator, its EMA and (from gan.start) the critic; skipped if not finite."""
  images = batch["images"].astype(jnp.float32) / 255.0
  gan_on = (state["step"] >= c.gan.start).astype(jnp.float32)

  def g_loss(gparams: Any) -> tuple[jax.Array, dict]:
    critic, model = nnx.merge(b.critic_graphdef, state["d"]), nnx.merge(b.graphdef, gparams)
    total, aux = vqgan.loss(model, batch, perceptual=perceptual, perceptual_weight=c.perceptual_weight,
                            gan_weight=c.gan.weight * gan_on,
                            gan_loss=lambda recon: discriminator.generator_loss(critic(recon)))
    latents = aux.pop("latents")
    if c.get("shift_weights"):  # the batch's own latents from the pass above: one encoder pass more, not two
      aux["shift_loss"] = vqgan.shift_loss(model, images, _shift(c, state["step"]), latents)
      total = total + shift_weight(c.shift_weights, state["step"]) * aux["shift_loss"]
    return total, aux

  (g_total, aux), g_grads = jax.value_and_grad(g_loss, has_aux=True)(state["g"])
  recon = jax.lax.stop_gradient(aux.pop("recon"))

  def d_loss(dparams: Any) -> jax.Array:
    critic = nnx.merge(b.critic_graphdef, dparams)
    return discriminator.hinge_d_loss(critic(images), critic(recon))

  d_value, d_grads = jax.value_and_grad(d_loss)(state["d"])
  d_grads = jax.tree.map(lambda g: g * gan_on, d_grads)  # the critic waits for the GAN start
  g_updates, g_opt = b.tx.update(g_grads, state["g_opt"], state["g"])
  d_updates, d_opt = b.critic_tx.update(d_grads, state["d_opt"], state["d"])
  g = optax.apply_updates(state["g"], g_updates)
  ema = jax.tree.map(lambda e, p: c.ema * e + (1.0 - c.ema) * p, state["ema"], g)
  new = {"g": g, "d": optax.apply_updates(state["d"], d_updates), "ema": ema, "g_opt": g_opt, "d_opt": d_opt}
  finite = (jnp.isfinite(g_total) & jnp.isfinite(d_value) & jnp.isfinite(optax.tree.norm(g_grads))
            & jnp.isfinite(optax.tree.norm(d_grads)) & jnp.isfinite(optax.tree.norm(g)))
  new, count = loop.guard(state, new, finite)
  stats = quantizer.codebook_stats(aux.pop("ids"), c.model.codes)
  psnr = -10.0 * jnp.log10(jnp.mean(jnp.square(jnp.clip(recon, 0, 1) - images)))
  return new, {"loss": g_total, "d_loss": d_value, "train_psnr": psnr, **aux, **stats, **count}


def load_perceptual(c: Any) -> Any:
  if not c.lpips_weights or not os.path.exists(c.lpips_weights):
    if c.perceptual_weight:
      warnings.warn(f"no LPIPS weights at {c.lpips_weights or '(lpips_weights unset)'}: perceptual weight "
                    "is 0 (make the file with python -m lvm_jax.convert.lpips_weights)", stacklevel=2)
    return None
  return lpips.from_file(c.lpips_weights)


def build(c: Any, mesh: jax.sharding.Mesh) -> Built:
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
  return Built.make(c, mesh, cfg, gdef, g_tx, init, abstract, replicated, critic_graphdef=ddef, critic_tx=d_tx)


def train_vqgan(c: Any, workdir: str, stop_at: int | None = None) -> dict:
  """Trains to c.steps (or SIGTERM, or `stop_at`), resuming from the newest checkpoint that
  verifies in workdir, through the trainer core (loop.py); returns the final state."""
  mesh = loop.prepare(c, workdir)
  data_iter, identity = loop.data(c, mesh)
  b = build(c, mesh)
  held_out = importlib.import_module(f"lvm_jax.data.{c.data.name}").evaluation_images(c)
  reconstruct = evaluate.reconstructor(b.graphdef)
  step_fn = jax.jit(functools.partial(train_step, c=c, b=b, perceptual=load_perceptual(c)),
                    in_shardings=(b.state_shardings, b.batch_sharding),
                    out_shardings=(b.state_shardings, None), donate_argnums=0)

  def held_out_psnr(state: dict, step: int) -> dict:
    return {"eval/psnr": evaluate.reconstruction(reconstruct, state["ema"], held_out)[0]}

  def samples(state: dict, step: int, writer: metrics.Writer) -> None:
    _, recon = evaluate.reconstruction(reconstruct, state["ema"], held_out[:8])
    rows = [[("original", x), ("reconstruction", r)] for x, r in zip(held_out[:8], recon)]
    writer.image("samples/reconstructions", pictures.grid(rows, min_cell=64), step)

  trainer = loop.Trainer(built=b, step_fn=step_fn, row=lambda m: {k: float(v) for k, v in m.items()
                                                                   if k not in loop.COUNTERS},
                         flops_per_step=vqgan.flops_per_step(c), rate=("images_per_sec", c.global_batch),
                         evaluate=held_out_psnr, samples=samples, data=identity)
  return loop.run(c, workdir, trainer, data_iter, mesh, stop_at)


def cli_main() -> None:
  cli.train_main(train_vqgan)


if __name__ == "__main__":
  cli_main()
