"""Evaluation: answer-image perplexity equals the NLL spelled out; prompting metrics and their
baselines."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvm_jax import config as config_lib, evaluate, prompt
from lvm_jax.data import demo as demo_data, store
from lvm_jax.models import tokenize, transformer, vqgan
from tests.conftest import load_config

CFG = transformer.Config(d_model=32, ffn=64, layers=1, heads=2, vocab_size=20, remat="none")


def _write_store(root: str, shards: list[list[tuple[np.ndarray, str, str]]]) -> None:
  """A store of 3-token images and vocabulary 20, one shard per list (store order: shard by shard)."""
  manifest = store.Manifest(tokens_per_image=3, vocab=20, tokenizer="t")
  store.create(root, manifest)
  for name, sentences in enumerate(shards):
    w = store.ShardWriter(root, str(name), manifest)
    for tokens, d, t in sentences:
      w.add(tokens, d, t)
    w.close()


def _answer_nll(lvm: transformer.Model, tokens: np.ndarray) -> float:
  """NLL of the last 3-token image, spelled out token by token."""
  logp = jax.nn.log_softmax(lvm(jnp.asarray(tokens[None], jnp.int32))[0, :-1])
  return -float(sum(logp[t - 1, tokens[t]] for t in range(len(tokens) - 3, len(tokens))))


def test_perplexity_is_the_answer_images_nll(tmp_path):
  rng = np.random.default_rng(0)
  sentences = [(rng.integers(0, 20, 3 * n), d, "t") for n, d in ((2, "a"), (3, "a"), (2, "b"), (2, "a"))]
  _write_store(str(tmp_path), [sentences])
  lvm = transformer.Model(CFG, rngs=nnx.Rngs(0))
  got = evaluate.perplexity(lvm, str(tmp_path))
  nll = {}
  for tokens, d, _ in sentences:
    nll.setdefault(d, []).append(_answer_nll(lvm, tokens))
  for d, v in nll.items():
    g = got[f"{d}/t"]
    assert g["sentences"] == len(v) and g["tokens"] == 3 * len(v) and g["better"] == "lower"
    np.testing.assert_allclose(g["corpus_ppl"], np.exp(np.sum(v) / (3 * len(v))), rtol=1e-4)
    np.testing.assert_allclose(g["mean_ppl"], np.mean(np.exp(np.array(v) / 3)), rtol=1e-4)


def test_the_sentence_cap_is_per_dataset_and_task(tmp_path):
  """A global cap filled in store order left out the groups stored last: every group gets
  min(cap, available), the first ones in store order, whatever is stored before or after them."""
  rng = np.random.default_rng(1)
  sizes = {("a", "x"): 5, ("a", "y"): 1, ("b", "x"): 4, ("b", "z"): 3}
  # Groups interleaved over two shards, the last group only in the second.
  order = [g for i in range(5) for g in sizes if i < sizes[g] and g != ("b", "z")] + [("b", "z")] * 3
  sentences = [(rng.integers(0, 20, 6), d, t) for d, t in order]
  _write_store(str(tmp_path), [sentences[:6], sentences[6:]])
  lvm = transformer.Model(CFG, rngs=nnx.Rngs(0))
  got = evaluate.perplexity(lvm, str(tmp_path), per_task=3)
  assert {k: (v["sentences"], v["tokens"]) for k, v in got.items()} == {
      "a/x": (3, 9), "a/y": (1, 3), "b/x": (3, 9), "b/z": (3, 9)}
  for (d, t), n in (("a", "x"), 3), (("b", "z"), 3):
    first = [_answer_nll(lvm, tok) for tok, dd, tt in sentences if (dd, tt) == (d, t)][:n]
    np.testing.assert_allclose(got[f"{d}/{t}"]["corpus_ppl"], np.exp(np.sum(first) / (3 * n)), rtol=1e-4)
  # The selection: store indices, the same on every read of the store.
  s = store.Store(str(tmp_path))
  want_a = [i for i, g in enumerate(order) if g == ("a", "x")][:2] + [order.index(("a", "y"))]
  np.testing.assert_array_equal(evaluate.first_per_group(s, "a", None, 2), sorted(want_a))
  np.testing.assert_array_equal(evaluate.first_per_group(store.Store(str(tmp_path)), "a", None, 2), sorted(want_a))
  assert list(evaluate.first_per_group(s, None, "z", 2)) == [10, 11]
  with pytest.raises(config_lib.ConfigError, match="per_task=0"):
    evaluate.perplexity(lvm, str(tmp_path), per_task=0)


def test_inpainting_is_scored_in_the_hole():
  truth = np.full((1, 4, 4, 3), 100, np.uint8)
  truth[0, :2] = 200
  query = truth.copy()
  query[0, 0, :2] = 0  # a hole in the bright half
  np.testing.assert_array_equal(evaluate.hole(query[0]), np.pad(np.ones((1, 2), bool), ((0, 3), (0, 2))))
  filled = evaluate.filled(query)[0]
  assert np.all(filled[0, :2] == round((6 * 200 + 8 * 100) / 14)) and np.array_equal(filled[1:], truth[0, 1:])
  _, score, base, _ = evaluate._scoring("inpainting", query)
  assert score(truth[0], truth[0], query[0]) == evaluate.psnr(truth[0], truth[0])
  answer = truth[0].copy()
  answer[2:] = 0  # wrong outside the hole: not counted
  assert score(answer, truth[0], query[0]) == score(truth[0], truth[0], query[0])
  assert np.isnan(score(truth[0], truth[0], truth[0]))  # nothing masked: no score


def test_lvm_report_names_its_sources_settings_and_directions(tmp_path, monkeypatch):
  """eval.json: checkpoint step, workdir, store, selection, sampling settings, and for every
  number whether higher or lower is better; the console table shows them per group and task."""
  vq = vqgan.Model(vqgan.Config(**load_config("vqgan_tiny").model), rngs=nnx.Rngs(0))
  lvm = transformer.Model(transformer.Config(d_model=32, ffn=64, layers=1, heads=2, vocab_size=256, remat="none"),
                          rngs=nnx.Rngs(1))
  p = prompt.Prompter(lvm, tokenize.Tokenizer(vq, 32, 8), step=7)
  rng = np.random.default_rng(0)
  _write_store(str(tmp_path / "store"), [[(rng.integers(0, 20, 6), "d", t) for t in "xxxy"]])
  monkeypatch.setattr(demo_data, "TASKS", ("moving_digit", "counting", "colorization", "inpainting"))
  r = evaluate.lvm_report(p, "w", str(tmp_path / "store"), None, None, per_task=2, count=4, seed=3)
  assert json.loads(json.dumps(r)) == r  # what eval.json holds
  assert (r["step"], r["workdir"], r["store"]) == (7, os.path.abspath("w"), str(tmp_path / "store"))
  assert r["perplexity_settings"]["per_task"] == 2 and r["perplexity_settings"]["dataset"] is None
  assert {k: (v["sentences"], v["tokens"], v["better"]) for k, v in r["perplexity"].items()} == {
      "d/x": (2, 6, "lower"), "d/y": (1, 3, "lower")}
  assert r["task_settings"] == {"split": "held_out", "count": 4, "images": 4, "data_seed": 1234, "sampling_seed": 3,
                                **evaluate.TASK_SAMPLING}
  assert evaluate.TASK_SAMPLING["samples"] > 1 and evaluate.TASK_SAMPLING["temperature"] > 0
  m = r["tasks"]
  assert {t: (v["metric"], v["better"]) for t, v in m.items()} == {
      "moving_digit": ("psnr", "higher"), "counting": ("accuracy", "higher"), "colorization": ("mse", "lower"),
      "inpainting": ("hole_psnr", "higher")}
  sents = demo_data.sentences("moving_digit", "held_out", 4, 32, seed=1234, images=4)
  copy_last = np.mean([evaluate.psnr(a, b) for a, b in zip(sents[:, -2], sents[:, -1])])
  assert np.isclose(m["moving_digit"]["baseline"], copy_last)
  assert m["counting"]["baseline"] == 0.1 and 0 <= m["counting"]["model"] <= 1 and 0 <= m["counting"]["greedy"] <= 1
  assert m["colorization"]["baseline"] > 0
  inpaint = demo_data.sentences("inpainting", "held_out", 4, 32, seed=1234, images=4)
  holes = [evaluate.hole(q) for q in inpaint[:, -2]]
  fill = [evaluate.psnr(f[h], t[h]) for f, t, h in zip(evaluate.filled(inpaint[:, -2]), inpaint[:, -1], holes) if h.any()]
  assert np.isclose(m["inpainting"]["baseline"], np.mean(fill))  # scored in the hole only
  lines = evaluate.table(r).splitlines()
  assert [ln.split()[-1] for ln in lines if ln.startswith("d/")] == ["2", "1"]  # sentences per group
  row = next(ln for ln in lines if ln.startswith("colorization")).split()
  assert row[1:5] == ["mse", "lower", f"{m['colorization']['model']:.3f}", f"{m['colorization']['greedy']:.3f}"]
  for t in ("moving_digit", "colorization", "inpainting"):  # the margin is the means' difference, toward better
    sign = 1 if m[t]["better"] == "higher" else -1
    assert np.isclose(m[t]["margin"], sign * (m[t]["model"] - m[t]["baseline"])) and m[t]["margin_se"] >= 0
  assert np.isclose(m["counting"]["margin"], m["counting"]["model"] - 0.1)


def test_the_margin_is_the_paired_difference_and_its_standard_error():
  """Per-sentence scores of the model and the baseline on the same sentences: the margin is their
  mean difference (positive: the model is better, whichever direction the metric prefers), its
  standard error that of the paired differences; unscored sentences (NaN) are left out."""
  model, base = np.array([12.0, 14.0, np.nan, 11.0]), np.array([11.0, 11.0, np.nan, 11.0])
  got = evaluate.margin(model, base, "higher")
  assert np.isclose(got["margin"], 4 / 3) and np.isclose(got["margin_se"], np.std([1, 3, 0], ddof=1) / np.sqrt(3))
  assert np.isclose(evaluate.margin(base, model, "lower")["margin"], 4 / 3)  # lower is better: same win
  assert evaluate.clearly_beats(evaluate.margin(model + 5, base, "higher"))
  assert not evaluate.clearly_beats(evaluate.margin(np.array([12.0, 10.0, 11.2]), np.array([11.0] * 3), "higher"))
  assert not evaluate.clearly_beats({"model": 1.0, "baseline": 0.0})  # a report written before margins


@pytest.mark.slow  # ~2 min: probes trained to convergence
def test_aim_probe_reports_against_pixels_and_a_random_trunk(tmp_path):
  """python -m lvm_jax.evaluate on an AIM workdir: the attentive probe on digits, next to a
  linear probe on raw pixels and the same probe on an untrained trunk; the trunk exported to
  ml-aim's layout (python -m lvm_jax.convert.aim_torch) and probed from that file reports the same."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
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
  assert evaluate._source_flag(None, {"kind": "digits"}) == {"kind": "digits"}
  assert evaluate._source_flag('{"kind": "image_folder", "root": "/d"}', {}) == {"kind": "image_folder", "root": "/d"}
  with pytest.raises(config_lib.ConfigError, match="not JSON"):
    evaluate._source_flag("kind=image_folder", {})
  with pytest.raises(config_lib.ConfigError, match="JSON object"):
    evaluate._source_flag('["image_folder"]', {})


def test_an_ml_aim_file_of_another_size_is_a_config_error(tmp_path):
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
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.conftest import REPO  # pylint: disable=g-import-not-at-top
  r = subprocess.run([sys.executable, "-m", "lvm_jax.evaluate", *flags], cwd=REPO, capture_output=True, text=True,
                     timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode != 0 and error in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_perplexity_refuses_a_store_beyond_the_models_vocabulary(tmp_path):
  from tests.test_workdir import _store  # pylint: disable=g-import-not-at-top
  root = _store(str(tmp_path / "store"), "tok-a", vocab=256)
  lvm = transformer.Model(transformer.Config(d_model=32, ffn=64, layers=1, heads=2, vocab_size=100), rngs=nnx.Rngs(0))
  with pytest.raises(config_lib.ConfigError, match="holds token ids up to 255, outside the model's vocabulary of 100"):
    evaluate.perplexity(lvm, root)
