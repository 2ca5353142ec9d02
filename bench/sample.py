"""New tokens/s of lvm_jax.sample.generate against Hugging Face `generate`, same weights, one run.

  python bench/sample.py [--d_model 512 --layers 8 --prompt 768 --new 256]

A LLaMA LVM (vocabulary 8292) with random weights, converted to LlamaForCausalLM through
lvm_jax.convert.hf_llama; prompts of 3 images (768 tokens), one new image (256 tokens), sampled
at temperature 1 over the 8192 codebook ids on both sides (HF: suppress_tokens), fp32, at batch
1 and 8. The lvm_jax time includes nothing but the (already compiled) generate call; HF's is its
generate with the KV cache. Targets (issue 6): >= 5x at B=1 and >= 20x at B=8. Then 8 candidates
of one prompt (sharing its prefill) against the prompt repeated 8 times.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from timing import median_seconds  # noqa: E402

from lvm_jax import models, sample  # noqa: E402
from lvm_jax.convert import hf_llama  # noqa: E402
from lvm_jax.models import transformer  # noqa: E402

TARGETS = {1: 5.0, 8: 20.0}
CODES = 8192


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--prompt", type=int, default=768)
  p.add_argument("--new", type=int, default=256)
  p.add_argument("--reps", type=int, default=2)
  args = p.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  cfg = transformer.Config(d_model=args.d_model, ffn=int(args.d_model * 8 / 3) // 64 * 64, layers=args.layers,
                           heads=args.heads, remat="none")
  model = transformer.Model(cfg, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama.hf_config(cfg, args.prompt + args.new)))
  hf.load_state_dict({k: torch.from_numpy(v) for k, v in hf_llama.to_hf(params, cfg).items()}, strict=False)
  hf.eval()
  suppress = list(range(CODES, cfg.vocab_size))
  print(f"LLaMA d_model {cfg.d_model}, {cfg.layers} layers, {models.count_params(models.abstract(transformer, cfg)) / 1e6:.0f}M params; "
        f"prompt {args.prompt} + {args.new} new tokens, fp32, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__}, torch {torch.__version__}")
  for batch in (1, 8):
    prompt = np.random.default_rng(batch).integers(0, CODES, (batch, args.prompt))
    ours = lambda: np.asarray(sample.generate(model, prompt, args.new, jax.random.key(0), codes=CODES))

    def theirs():
      with torch.no_grad():
        return hf.generate(torch.from_numpy(prompt), max_new_tokens=args.new, min_new_tokens=args.new,
                           do_sample=True, top_k=0, suppress_tokens=suppress, pad_token_id=CODES)

    t_ours, t_theirs = median_seconds(ours, args.reps), median_seconds(theirs, 1, warmup=0)
    rate_ours, rate_theirs = batch * args.new / t_ours, batch * args.new / t_theirs
    print(f"batch {batch}: lvm_jax {rate_ours:8.1f} new tokens/s, HF generate {rate_theirs:7.1f}, "
          f"ratio {rate_ours / rate_theirs:5.1f}x (target >= {TARGETS[batch]:g}x)")
  # The demo's consensus draws many candidates of each prompt: they share its prefill, against
  # the same rows as a batch of the prompt repeated (the work before).
  prompt = np.random.default_rng(0).integers(0, CODES, (1, args.prompt))
  draw = lambda rows, c: np.asarray(sample.generate(model, rows, args.new, jax.random.key(0), codes=CODES, candidates=c))
  t_shared = median_seconds(lambda: draw(prompt, 8), args.reps)
  t_repeated = median_seconds(lambda: draw(np.repeat(prompt, 8, axis=0), 1), args.reps)
  print(f"8 candidates of a prompt: {8 * args.new / t_shared:8.1f} new tokens/s, the prompt repeated 8 times "
        f"{8 * args.new / t_repeated:7.1f}, ratio {t_repeated / t_shared:5.2f}x")


if __name__ == "__main__":
  main()
