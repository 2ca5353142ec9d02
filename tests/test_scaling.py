"""Scaling ladder: the power-law fit recovers known laws, and --quick runs the whole ladder on a
small store (every rung trained and scored, the table, JSON and plot written), resumably."""

import json
import os
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvm_jax import config as config_lib, evaluate, scaling, sharding
from lvm_jax.data import store
from tests.conftest import REPO, load_config

TASKS = ("video", "pairs")


def _store(root: str) -> str:
  """Sentences of 4 images of 16 tokens, as the :test ladder reads them: a train and a held_out
  dataset per task; each image repeats its sentence's first one, so there is something to learn."""
  manifest = store.Manifest(tokens_per_image=16, vocab=256, tokenizer="tok")
  store.create(root, manifest)
  writer = store.ShardWriter(root, "0", manifest)
  rng = np.random.default_rng(0)
  for task in TASKS:
    for split, count in (("train", 16), ("held_out", 6)):
      for _ in range(count):
        writer.add(np.tile(rng.integers(0, 256, 16), 4), f"{task}_{split}", task)
  writer.close()
  return root


@pytest.mark.parametrize("e,a,alpha", [(1.5, 20.0, 0.3), (0.0, 8.0, 0.12), (2.2, 300.0, 0.5)])
def test_the_fit_recovers_a_known_power_law(e, a, alpha):
  x = np.geomspace(1e5, 1e9, 6)
  fit = scaling.fit_power_law(x, e + a * x**-alpha)
  assert fit["E"] == pytest.approx(e, abs=2e-3) and fit["alpha"] == pytest.approx(alpha, rel=1e-2)
  assert fit["A"] == pytest.approx(a, rel=5e-2) and fit["rmse"] < 1e-4


def test_the_fit_is_robust_to_noise():
  """With half a percent of noise on 5 points the exponent stays near the truth when the points
  span a loss range well above the noise, and the curve stays within the noise when they do not
  (then E and alpha trade off, as they do for any fit of 3 parameters to 5 points)."""
  rng = np.random.default_rng(0)
  x = np.geomspace(5e4, 3e6, 5)
  for a, alpha, alpha_tol in ((40.0, 0.3, 0.08), (6.0, 0.35, None)):
    clean = 1.8 + a * x**-alpha
    for _ in range(20):
      fit = scaling.fit_power_law(x, clean * (1 + 0.005 * rng.standard_normal(5)))
      assert 0 <= fit["E"] < clean.min() * 1.02 and np.max(np.abs(scaling.predict(fit, x) - clean)) < 0.06, fit
      assert alpha_tol is None or abs(fit["alpha"] - alpha) < alpha_tol, fit


def test_a_fit_needs_three_points():
  with pytest.raises(config_lib.ConfigError, match="3 or more points"):
    scaling.fit_power_law([1e3, 1e4], [2.0, 1.5])


def _ladder(root: str) -> Any:
  ladder = load_config("scaling_demo", "test")
  ladder.train.data.mixture.main.path = root
  return ladder


def test_held_out_loss_is_the_mean_next_token_nll(tmp_path):
  """Every token of every selected held-out sentence but the first is a target, as spelled out
  with the model's log-softmax; groups are (dataset, task), capped per group; padding rows count
  nothing."""
  [(_, c)] = scaling.rung_configs(_ladder(_store(str(tmp_path / "store"))))[:1]
  c.eval_data.per_task = 5  # 2 groups x 5: the last batch of 8 rows is mostly padding
  family = config_lib.model_module(c)
  model = family.Model(family.Config(**c.model), rngs=nnx.Rngs(0))
  got = scaling.held_out_loss(c, nnx.to_pure_dict(nnx.state(model, nnx.Param)), sharding.make_mesh(c.mesh))
  s = store.Store(str(tmp_path / "store"))
  picked = evaluate.first_per_group(s, "*_held_out", None, 5)
  tokens = np.stack([s.read(int(i)).result().astype(np.int32) for i in picked])
  logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(tokens))[:, :-1].astype(jnp.float32)))
  nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]  # [sentence, position]
  want = {}
  for i, row in zip(picked, nll):
    want.setdefault(f"{s.datasets[s.meta[i, 0]]}/{s.tasks[s.meta[i, 1]]}", []).append(row)
  assert set(got["per_group"]) == {f"{t}_held_out/{t}" for t in TASKS}
  for group, nlls in want.items():
    assert got["per_group"][group]["sentences"] == 5 and got["per_group"][group]["targets"] == 5 * 63
    assert got["per_group"][group]["loss"] == pytest.approx(np.mean(nlls), rel=1e-4)
  assert got["loss"] == pytest.approx(np.mean(list(want.values())), rel=1e-4) and got["sentences"] == 10


def test_the_ladder_trains_what_is_not_done_and_writes_table_json_and_plot(tmp_path, monkeypatch):
  """The ladder's bookkeeping with training and scoring stubbed (the slow test runs them): every
  rung once, a stopped rung ends the run and the next one resumes it, finished rungs are skipped;
  losses on a known law come back as that law's fit."""
  trained = []

  def fake_train(c, workdir, stop_at=None):
    name = os.path.basename(workdir)
    trained.append(name)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.writelines(json.dumps({"step": s, "loss": 5.0 - s / c.steps}) + "\n" for s in range(2, c.steps + 1, 2))
    stopped = name == "c" and trained.count("c") == 1  # the first start of c is preempted
    return {"step": np.int32(c.steps // 2 if stopped else c.steps), "params": None}

  law = lambda n: 1.5 + 30.0 * n**-0.3
  monkeypatch.setattr(scaling.train, "train", fake_train)
  monkeypatch.setattr(scaling, "held_out_loss", lambda c, params, mesh: {
      "loss": law(scaling.param_counts(c)[1]), "targets": 1.0, "sentences": 1, "per_group": {}})
  root = _store(str(tmp_path / "store"))
  work = str(tmp_path / "w")
  assert scaling.scaling(_ladder(root), work) is None and trained == ["a", "b", "c"]
  report = scaling.scaling(_ladder(root), work)
  assert trained == ["a", "b", "c", "c", "d"] and report["better"] == "lower"
  fit = report["fits"]["non_embedding_params"]
  assert fit["E"] == pytest.approx(1.5, abs=1e-2) and fit["alpha"] == pytest.approx(0.3, abs=1e-2)
  n = [r["non_embedding_params"] for r in report["rungs"]]
  assert n == sorted(n) and n[-1] > 10 * n[0] and all(r["params"] > r["non_embedding_params"] for r in report["rungs"])
  assert all(r["train_flops"] == 8 * r["flops_per_step"] and r["tokens"] == 8 * 8 * 64 for r in report["rungs"])
  assert json.load(open(tmp_path / "w" / "scaling.json")) == json.loads(json.dumps(report))
  md = open(tmp_path / "w" / "scaling.md").read()
  assert md.count("\n| ") == 2 + 4 and "alpha = 0.300" in md
  assert open(tmp_path / "w" / "scaling.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  os.remove(tmp_path / "w" / "b" / scaling.RESULT)  # a rung whose result was lost is trained again, alone
  again = scaling.scaling(_ladder(root), work)["rungs"]
  assert trained[5:] == ["b"] and [r["held_out_loss"] for r in again] == [r["held_out_loss"] for r in report["rungs"]]
  assert again[0] == report["rungs"][0]  # read back, not redone


@pytest.mark.slow  # ~2 min on 2 busy cores: 4 rungs trained and scored, compiled for 8 fake devices
def test_quick_ladder_runs_end_to_end_from_the_command_line(tmp_path):
  """The command a person runs, --quick: every rung really trained and scored, the outputs
  written; the rerun trains nothing."""
  cmd = [sys.executable, "-m", "lvm_jax.scaling", "--config", "scaling_demo:test", "--quick",
         "--store", _store(str(tmp_path / "store")), "--workdir", str(tmp_path / "w")]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.load(open(tmp_path / "w" / "scaling.json"))
  assert [r["name"] for r in report["rungs"]] == ["a", "b", "c", "d"] and report["quick"]
  # Both tasks' held-out sentences (quick: 2 each), every next token of each; about ln(256) after 4 steps.
  assert all(r["held_out"]["sentences"] == 4 and r["held_out"]["targets"] == 4 * 63 for r in report["rungs"])
  assert all(r["steps"] == 4 and 4.0 < r["held_out_loss"] < 7.0 for r in report["rungs"])
  assert "| a | 16 | 1 | 2 | 32 |" in out.stdout and os.path.exists(tmp_path / "w" / "scaling.png")
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and again.stderr.count("done before") == 4, again.stderr[-3000:]
  assert json.load(open(tmp_path / "w" / "scaling.json")) == report


def test_a_missing_store_or_another_ladder_is_one_line(tmp_path):
  ladder = _ladder(str(tmp_path / "nowhere"))
  with pytest.raises(config_lib.ConfigError, match=r"no token store at .*python -m lvm_jax.demo"):
    scaling.scaling(ladder, str(tmp_path / "w"))
  ladder.train.data.mixture.main.path = _store(str(tmp_path / "store"))
  scaling.record_ladder(str(tmp_path / "w"), scaling.rung_configs(ladder))
  ladder.train.steps = 9
  with pytest.raises(config_lib.ConfigError, match=r"ladder of other settings \(a\.steps: 8 -> 9"):
    scaling.scaling(ladder, str(tmp_path / "w"))


def test_a_rung_may_change_only_the_model_and_optimizer():
  ladder = load_config("scaling_demo", "test")
  with ladder.unlocked():
    ladder.rungs = ladder.rungs[:3] + ({**ladder.rungs[3], "steps": 5},)
  with pytest.raises(config_lib.ConfigError, match=r"rungs\[3\] \(d\) changes \['steps'\]"):
    scaling.rung_configs(ladder)
