"""The README's main job: the quick demo runs every stage and writes every artifact."""

import json
import os

import pytest

from lvm_jax import demo
from lvm_jax.data import demo as demo_data


@pytest.mark.slow  # ~2 min: every stage of the demo
def test_quick_demo_runs_every_stage(tmp_path):
  result = demo.demo(str(tmp_path), quick=True, count=2)
  assert set(result["tasks"]) == set(demo_data.TASKS)
  # Every held-out task, each with all of its sentences (2 in the quick store; the cap is per task).
  assert {k: v["sentences"] for k, v in result["perplexity"].items()} == {
      f"{t}_held_out/{t}": 2 for t in demo_data.TASKS}
  assert result["step"] == 6 and result["store"] == str(tmp_path / "store")
  assert result["task_settings"]["count"] == 2 and result["task_settings"]["samples"] == 16
  for path in ("vqgan/checkpoints", "store/manifest.json", "lvm/metrics.jsonl", "eval.json", "prompts/counting.png"):
    assert os.path.exists(tmp_path / path), path
  assert json.load(open(tmp_path / "eval.json")) == json.loads(json.dumps(result))


def test_the_shipped_tokenizer_is_the_demo_config_trained():
  """lvm_jax/assets/vqgan_demo.safetensors loads through dataset_demo's record (configs/vqgan_demo.py's
  architecture, as data) and reconstructs held-out demo frames it never saw far better than an
  untrained VQGAN, and better than the 8x8 box filter of its token grid: a trained tokenizer."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lvm_jax import config as config_lib, evaluate, load  # pylint: disable=g-import-not-at-top
  from lvm_jax.models import tokenize, vqgan  # pylint: disable=g-import-not-at-top
  c = config_lib.load_file("dataset_demo")
  assert c.vqgan.weights == demo_data.TOKENIZER and os.path.exists(demo_data.TOKENIZER)
  model, size = load.load_vqgan(c.vqgan)
  vq = config_lib.load_file("vqgan_demo")
  assert size == vq.image_size and model.cfg == vqgan.Config(**vq.model)
  x = demo_data.evaluation_images(vq, per_task=2)
  tok = tokenize.Tokenizer(model, size, 16)
  recon = tok.decode(tok.encode(x))
  psnr = np.mean([evaluate.psnr(a, b) for a, b in zip(recon, x)])
  box = x.reshape(len(x), 8, 4, 8, 4, 3).mean((2, 4)).repeat(4, 1).repeat(4, 2)
  # 20.2 dB when shipped; the box filter keeps 64 exact colours (19.8), an untrained VQGAN ~9.
  assert psnr > np.mean([evaluate.psnr(a, b) for a, b in zip(box, x)]) and psnr > 19.0


def test_the_shipped_lvm_is_the_demo_recipe_trained():
  """lvm_jax/assets/lvm_demo is configs/lvm_demo.py:focused's model (:long's, then :continued's,
  trained on) after its last step, as a LlamaForCausalLM directory, and it has learnt: on held-out
  moving digits (samples it never saw) its answers beat copying the last frame (19.2 dB against
  12.5 over 64 sentences when shipped), which an untrained model's do not."""
  import jax  # pylint: disable=g-import-not-at-top
  from lvm_jax import config as config_lib, evaluate, prompt  # pylint: disable=g-import-not-at-top
  from lvm_jax.convert import hf_llama  # pylint: disable=g-import-not-at-top
  cfg, _ = hf_llama.load_pretrained(demo_data.LVM)
  recipe = config_lib.load_file("lvm_demo:focused")
  assert (cfg.d_model, cfg.ffn, cfg.layers, cfg.heads, cfg.vocab_size) == (
      recipe.model.d_model, recipe.model.ffn, recipe.model.layers, recipe.model.heads, recipe.model.vocab_size)
  p = prompt.from_hf(demo_data.LVM, config_lib.load_file("dataset_demo").vqgan)
  assert p.step == recipe.steps
  m = evaluate.task_metrics(p, ("moving_digit",), 8, jax.random.key(0))["moving_digit"]
  assert m["model"] > m["baseline"] + 1.0, m
