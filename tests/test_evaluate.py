"""Evaluation: answer-image perplexity equals the NLL spelled out; prompting metrics and their
baselines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvm_jax import evaluate, prompt
from lvm_jax.data import demo as demo_data, store
from lvm_jax.models import transformer, vqgan
from tests.conftest import load_config

CFG = transformer.Config(d_model=32, ffn=64, layers=1, heads=2, vocab_size=20, remat="none")


def test_perplexity_is_the_answer_images_nll(tmp_path):
  manifest = store.Manifest(tokens_per_image=3, vocab=20, tokenizer="t")
  store.create(str(tmp_path), manifest)
  rng = np.random.default_rng(0)
  w = store.ShardWriter(str(tmp_path), "0", manifest)
  sentences = [(rng.integers(0, 20, 3 * n), d) for n, d in ((2, "a"), (3, "a"), (2, "b"), (2, "a"))]
  for tokens, d in sentences:
    w.add(tokens, d, "t")
  w.close()
  lvm = transformer.Model(CFG, rngs=nnx.Rngs(0))
  got = evaluate.perplexity(lvm, str(tmp_path))
  nll = {}
  for tokens, d in sentences:
    logp = jax.nn.log_softmax(lvm(jnp.asarray(tokens[None], jnp.int32))[0, :-1])
    nll.setdefault(d, []).append(-float(sum(logp[t - 1, tokens[t]] for t in range(len(tokens) - 3, len(tokens)))))
  for d, v in nll.items():
    g = got[f"{d}/t"]
    assert g["sentences"] == len(v) and g["tokens"] == 3 * len(v)
    np.testing.assert_allclose(g["corpus_ppl"], np.exp(np.sum(v) / (3 * len(v))), rtol=1e-4)
    np.testing.assert_allclose(g["mean_ppl"], np.mean(np.exp(np.array(v) / 3)), rtol=1e-4)


def test_task_metrics_report_model_and_baseline():
  vq = vqgan.Model(vqgan.Config(**load_config("vqgan_tiny").model), rngs=nnx.Rngs(0))
  lvm = transformer.Model(transformer.Config(d_model=32, ffn=64, layers=1, heads=2, vocab_size=256, remat="none"),
                          rngs=nnx.Rngs(1))
  p = prompt.Prompter(lvm, vqgan.Tokenizer(vq, 32, 8))
  m = evaluate.task_metrics(p, ("moving_digit", "counting", "colorization"), 4, jax.random.key(0))
  sents = demo_data.sentences("moving_digit", "held_out", 4, 32, seed=1234, images=4)
  copy_last = np.mean([evaluate.psnr(a, b) for a, b in zip(sents[:, -2], sents[:, -1])])
  assert m["moving_digit"]["metric"] == "psnr" and np.isclose(m["moving_digit"]["baseline"], copy_last)
  assert m["counting"]["baseline"] == 0.1 and 0 <= m["counting"]["model"] <= 1
  assert m["colorization"]["metric"] == "mse" and m["colorization"]["baseline"] > 0


@pytest.mark.slow  # ~2 min: probes trained to convergence
def test_aim_probe_reports_against_pixels_and_a_random_trunk(tmp_path):
  """python -m lvm_jax.evaluate on an AIM workdir: the attentive probe on digits, next to a
  linear probe on raw pixels and the same probe on an untrained trunk; the trunk exported to
  ml-aim's layout (python -m lvm_jax.convert.aim_torch) and probed from that file reports the same."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from lvm_jax import train  # pylint: disable=g-import-not-at-top
  from tests.conftest import REPO  # pylint: disable=g-import-not-at-top
  train.train(load_config("aim_tiny", "test"), str(tmp_path / "aim"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")

  def run(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]

  probe_flags = ["--probe_layers=2,3", "--probe_steps=400"]
  run("lvm_jax.evaluate", f"--workdir={tmp_path / 'aim'}", f"--out={tmp_path / 'probe.json'}", *probe_flags)
  report = json.load(open(tmp_path / "probe.json"))["probe"]
  assert report["layers"] == [2, 3] and report["test_images"] == len(demo_data.digit_samples("held_out"))
  assert report["classes"] == 10 and report["skipped_inputs"] == 0
  for k in ("attentive_probe", "random_trunk_probe", "linear_probe_pixels"):
    assert 0.2 < report[k] <= 1.0, report  # well above chance (0.1) on digits
    assert 0.1 < report["10_per_class"][k] <= report[k] + 0.05, report  # fewer labels, no better
  run("lvm_jax.convert.aim_torch", f"--workdir={tmp_path / 'aim'}", f"--out={tmp_path / 'aim.safetensors'}")
  run("lvm_jax.evaluate", f"--ml_aim={tmp_path / 'aim.safetensors'}", "--aim_config=configs/aim_tiny.py",
      f"--out={tmp_path / 'probe_ml_aim.json'}", *probe_flags)
  assert json.load(open(tmp_path / "probe_ml_aim.json"))["probe"] == report


def test_probe_source_flags_are_json_objects():
  from lvm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  assert evaluate._source_flag(None, {"kind": "digits"}) == {"kind": "digits"}
  assert evaluate._source_flag('{"kind": "image_folder", "root": "/d"}', {}) == {"kind": "image_folder", "root": "/d"}
  with pytest.raises(config_lib.ConfigError, match="not JSON"):
    evaluate._source_flag("kind=image_folder", {})
  with pytest.raises(config_lib.ConfigError, match="JSON object"):
    evaluate._source_flag('["image_folder"]', {})


def test_an_ml_aim_file_of_another_size_is_a_config_error(tmp_path):
  from lvm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from lvm_jax.convert import aim_torch  # pylint: disable=g-import-not-at-top
  from lvm_jax.models import aim  # pylint: disable=g-import-not-at-top
  other = aim.Config(width=64, depth=2, heads=4, patch=4, image_size=16, head_width=32, head_depth=1, head_mlp=64)
  trunk = nnx.to_pure_dict(nnx.state(aim.Model(other, rngs=nnx.Rngs(0)).trunk, nnx.Param))
  aim_torch.save_safetensors(aim_torch.to_ml_aim(trunk), str(tmp_path / "other.safetensors"))
  with pytest.raises(config_lib.ConfigError, match="does not have the shapes"):
    evaluate._aim_trunk(load_config("aim_tiny"), None, str(tmp_path / "other.safetensors"))


@pytest.mark.parametrize("flags,error", [
    (["--ml_aim=m.safetensors"], "give --workdir (LVM, AIM or VQGAN), or --ml_aim with --aim_config"),
    (["--ml_aim=m.safetensors", "--aim_config=configs/lvm_tiny.py"], "not an AIM config (model_name='transformer')"),
    (["--ml_aim=missing.safetensors", "--aim_config=configs/aim_tiny.py"], "--ml_aim missing.safetensors: ")])
def test_flag_mistakes_are_one_line_errors(flags, error):
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.conftest import REPO  # pylint: disable=g-import-not-at-top
  r = subprocess.run([sys.executable, "-m", "lvm_jax.evaluate", *flags], cwd=REPO, capture_output=True, text=True,
                     timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode != 0 and error in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_perplexity_refuses_a_store_beyond_the_models_vocabulary(tmp_path):
  from lvm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from tests.test_workdir import _store  # pylint: disable=g-import-not-at-top
  root = _store(str(tmp_path / "store"), "tok-a", vocab=256)
  lvm = transformer.Model(transformer.Config(d_model=32, ffn=64, layers=1, heads=2, vocab_size=100), rngs=nnx.Rngs(0))
  with pytest.raises(config_lib.ConfigError, match="holds token ids up to 255, outside the model's vocabulary of 100"):
    evaluate.perplexity(lvm, root)
