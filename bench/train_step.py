"""Train-step throughput: lvm_jax vs Hugging Face LlamaForCausalLM (PyTorch, CPU), one run.

  python bench/train_step.py [--d_model 512 --layers 8 --seq 1024 --batch 4]

Both sides run the same network (LLaMA, vocab 8292, fp32) through a full training step
(forward, backward, AdamW update) on the same batch shape. Prints tokens/s for each, their
ratio, and lvm_jax's MFU against the XLA matmul peak measured in this process.
Targets (issue 2): ratio >= 1.5 and MFU >= 60% at the default size.
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from timing import median_seconds  # noqa: E402

from lvm_jax import config as config_lib, metrics, sharding, train  # noqa: E402
from lvm_jax.models import transformer  # noqa: E402


def jax_step_time(c, batch: dict, warmup: int, reps: int) -> float:
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  b = train.build(c, mesh)
  with jax.set_mesh(mesh), sharding.axis_rules(c.rules):
    state = jax.jit(b.init, out_shardings=b.state_shardings)(jax.random.key(0))
    step = train.jit_train_step(c, b)
    batch = {k: jax.device_put(jnp.asarray(v), b.batch_sharding) for k, v in batch.items()}
    box = [state]

    def run():
      box[0], m = step(box[0], batch)
      jax.block_until_ready(m["loss"])

    return median_seconds(run, reps, warmup)


def torch_step_time(c, tokens: np.ndarray, warmup: int, reps: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from lvm_jax.convert import hf_llama  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count())
  cfg = transformer.Config(**c.model)
  model = transformers.LlamaForCausalLM(
      transformers.LlamaConfig(**hf_llama.hf_config(cfg, c.seq_len), attn_implementation="sdpa"))
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  ids = torch.from_numpy(tokens).long()

  def run():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  return median_seconds(run, reps, warmup)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--ffn", type=int, default=1376)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--reps", type=int, default=5)
  # On CPUs "dots" beats "none": recomputing the softmax costs less than storing it.
  p.add_argument("--remat", default="dots")
  args = p.parse_args()

  c = config_lib.lvm_config(args.d_model, args.ffn, args.layers, args.heads)
  c.model.update(dtype="float32", remat=args.remat)
  c.seq_len, c.tokens_per_image, c.global_batch, c.steps = args.seq, 0, args.batch, 1000
  c.optim.warmup = 10
  tokens = np.random.default_rng(0).integers(0, 8192, (args.batch, args.seq)).astype(np.int32)
  batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
           "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), tokens.shape).copy(),
           "loss_mask": np.ones_like(tokens)}

  t_jax = jax_step_time(c, batch, warmup=2, reps=args.reps)
  t_torch = torch_step_time(c, tokens, warmup=1, reps=args.reps)
  peak = metrics.measured_peak_flops("float32")
  flops = transformer.train_flops_per_token(transformer.Config(**c.model), c.seq_len) * c.seq_len * args.batch
  n_tok = args.batch * args.seq
  print(f"config: d_model {args.d_model}, {args.layers} layers, seq {args.seq}, batch {args.batch}, fp32, "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__}")
  print(f"lvm_jax      {n_tok / t_jax:10.0f} tokens/s  ({t_jax * 1e3:.0f} ms/step)")
  print(f"HF torch     {n_tok / t_torch:10.0f} tokens/s  ({t_torch * 1e3:.0f} ms/step)")
  print(f"ratio        {t_torch / t_jax:10.2f}x   (target >= 1.5x)")
  print(f"lvm_jax MFU  {flops / t_jax / peak:10.1%}   of a measured {peak / 1e9:.0f} GFLOP/s XLA matmul "
        f"(target >= 60%)")


if __name__ == "__main__":
  main()
