"""bench/accelerator.py's PyTorch part: the references, in a process of their own.

Hugging Face LlamaForCausalLM (the same network as our LVM, through lvm_jax.convert.hf_llama)
trained as its users train it: sdpa attention, bf16 autocast over fp32 weights, fused AdamW,
gradient clipping; eager and under torch.compile. HF generate for the sampler (bf16 weights, KV
cache), diffusers' VQModel for the tokenizer (fp32).
"""

import gc
import time

import numpy as np
import torch
import transformers
from accelerator_parts import SIZES, Rows

from lvm_jax.convert import hf_llama, vqgan_torch
from lvm_jax.models import transformer, vqgan


def device() -> str:
  return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def llama(size: str, seq: int) -> torch.nn.Module:
  d, f, n, h = SIZES[size]
  cfg = transformer.Config(d_model=d, ffn=f, layers=n, heads=h)
  hf_cfg = transformers.LlamaConfig(**hf_llama.hf_config(cfg, seq), attn_implementation="sdpa")
  return transformers.LlamaForCausalLM(hf_cfg).to(device())


def train_rate(rows: Rows, size: str, compiled: bool, quick: bool) -> None:
  B, L = (2, 128) if quick else (8, 4096)
  model = llama(size, L)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                          fused=torch.cuda.is_available())
  ids = torch.from_numpy(np.random.default_rng(0).integers(0, 8192, (B, L))).long().to(device())
  forward = torch.compile(model) if compiled else model

  def step():
    with torch.autocast(device(), dtype=torch.bfloat16):
      loss = forward(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  t0 = time.perf_counter()
  for _ in range(3 if compiled else 2):
    step()
  sync()
  warm = time.perf_counter() - t0
  n = 2 if quick else 8
  t0 = time.perf_counter()
  for _ in range(n):
    step()
  sync()
  t = (time.perf_counter() - t0) / n
  mode = "compile" if compiled else "eager"
  gib = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
  rows.add("ref", f"HF Llama {size} train step, {mode}", B * L / t, "tok/s", key=f"hf:step:{size}:{mode}",
           note=f"{gib:.1f} GiB (process peak), warm-up {warm:.0f} s")


def generate_rate(rows: Rows, quick: bool) -> None:
  prompt_len, new = (32, 16) if quick else (768, 256)
  model = llama("tiny" if quick else "lvm_300m", prompt_len + new).to(torch.bfloat16).eval()
  for B in (1, 64):
    prompt = torch.from_numpy(np.random.default_rng(B).integers(0, 8192, (B, prompt_len))).long().to(device())
    run = lambda n, p=prompt: model.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=0,
                                             pad_token_id=8192)
    with torch.no_grad():
      run(8)
      sync()
      t0 = time.perf_counter()
      run(new)
      sync()
    t = time.perf_counter() - t0
    rows.add("ref", f"HF generate B{B} prompt {prompt_len} + {new} new, bf16", B * new / t, "tok/s",
             key=f"hf:sampler:{B}", ref_of=f"sampler:{B}")


def vqgan_rate(rows: Rows, quick: bool) -> None:
  import diffusers  # pylint: disable=g-import-not-at-top
  cfg = vqgan.Config(dtype="float32")
  size, B = (64, 2) if quick else (256, 8)
  model = diffusers.VQModel(**vqgan_torch.diffusers_kwargs(cfg)).to(device()).eval()
  x = torch.rand(B, 3, size, size, device=device())
  grid = size // cfg.factor
  with torch.no_grad():
    ids = model.quantize(model.encode(x).latents)[2][2]

    def encode():
      return model.quantize(model.encode(x).latents)[2][2]

    def decode():
      out = model.decode(ids.reshape(-1), force_not_quantize=True, shape=(B, grid, grid, cfg.z_channels)).sample
      return (out.clamp(0, 1) * 255).round().to(torch.uint8)

    # torch runs fp32 convolutions in TF32 unless told not to: both ways, the default first.
    for tf32 in (True, False):
      torch.backends.cudnn.allow_tf32 = tf32
      for name, fn in (("encode", encode), ("decode", decode)):
        fn()
        sync()
        times = []
        for _ in range(5):
          t0 = time.perf_counter()
          fn()
          sync()
          times.append(time.perf_counter() - t0)
        what = "" if tf32 else ", convolutions without TF32"
        rows.add("ref", f"diffusers VQModel {name} {size}px B{B} fp32{what}", B / float(np.median(times)), "img/s",
                 key=f"diffusers:vqgan:{name}" + ("" if tf32 else ":full_fp32"),
                 ref_of=f"vqgan:{name}" + ("" if tf32 else ":full_fp32"))
    torch.backends.cudnn.allow_tf32 = True


def free() -> None:
  """Returns a finished measurement's memory (its objects died with its function)."""
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def run(rows: Rows, quick: bool) -> None:
  torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides (the VQGAN rows)
  rows.add("env", "torch", torch.__version__, note=f"transformers {transformers.__version__}, {device()}")
  small = "tiny" if quick else "lvm_300m"
  for what, fn, need in (("HF 300M eager", lambda: train_rate(rows, small, False, quick), 20),
                         ("HF 1B eager", lambda: train_rate(rows, "tiny" if quick else "lvm_1b", False, quick), 25),
                         ("generate", lambda: generate_rate(rows, quick), 20),
                         ("diffusers", lambda: vqgan_rate(rows, quick), 15),
                         ("HF 300M compile", lambda: train_rate(rows, small, True, quick), 60)):
    rows.guarded("ref", what, fn, need=need)
    free()
