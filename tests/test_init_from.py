"""config.init_from: a new run takes its parameters from a training workdir (newest step or a
named one), a Hugging Face LlamaForCausalLM directory or an ml-aim file (load.init_params); the
optimizer and step start fresh, a shape that differs is one line, a restart resumes its own
checkpoint."""

import dataclasses
import json
import logging
import os

import jax
import numpy as np
import pytest
import ml_collections
from flax import nnx

from lvm_jax import checkpoint, config as config_lib, load, sharding, train
from lvm_jax.convert import aim_torch, hf_llama
from lvm_jax.models import aim
from tests.conftest import load_config


@dataclasses.dataclass
class Source:
  workdir: str  # workdir A: lvm_tiny:test trained 4 steps, checkpoints at steps 2 and 4
  at2: dict  # A's params at step 2 and at step 4 (its newest), as numpy
  at4: dict
  first_loss: float  # A's loss at step 1 (random parameters)


def _numpy(tree: dict) -> dict:
  return jax.tree.map(np.asarray, tree)


def _assert_equal(a: dict, b: dict) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _config(**changes) -> ml_collections.ConfigDict:
  c = load_config("lvm_tiny", "test")
  c.steps, c.ckpt_every = 4, 2
  c.update(changes)
  return c


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Source:
  workdir = str(tmp_path_factory.mktemp("init_from") / "a")
  c = _config()
  at4 = _numpy(train.train(c, workdir)["params"])
  # Step 2 read back by the trainer's own restore of the whole state: not the path under test.
  b = train.build(c, sharding.make_mesh(c.mesh))
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), 3, 0, create=False) as ckpt:
    at2 = _numpy(ckpt.restore(2, b.abstract_state)["params"])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    first_loss = json.loads(f.readline())["loss"]
  return Source(workdir, at2, at4, first_loss)


def test_a_new_run_starts_from_a_workdir_and_a_restart_resumes_its_own(source, tmp_path, caplog):
  c, workdir = _config(init_from=source.workdir), str(tmp_path / "b")
  with caplog.at_level(logging.INFO):
    state = train.train(c, workdir, stop_at=0)  # the fresh state, before any step
  _assert_equal(state["params"], source.at4)
  assert int(state["step"]) == 0 and int(state["skipped_steps"]) == 0
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state["opt_state"]))  # moments and counts 0
  count = sum(x.size for x in jax.tree.leaves(source.at4))
  assert f"init_from: {count:,} of {count:,} parameters from {source.workdir} (step 4 of a training workdir)" \
      in caplog.text, caplog.text
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["init_from"] == source.workdir  # the record says where the weights came from

  trained = _numpy(train.train(c, workdir, stop_at=2))  # training goes on from A's weights
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["loss"] < source.first_loss - 0.1, (rows[0]["loss"], source.first_loss)  # same batch as A's 1st

  caplog.clear()
  with caplog.at_level(logging.INFO):
    again = train.train(c, workdir, stop_at=2)  # a restart: its own step 2, not A's weights again
  assert int(again["step"]) == 2
  _assert_equal(again, trained)
  assert f"init_from={source.workdir} ignored: the run resumes its own checkpoint, step 2" in caplog.text


def test_a_named_step_of_a_workdir(source, tmp_path):
  state = train.train(_config(init_from=f"{source.workdir}:2"), str(tmp_path / "b"), stop_at=0)
  _assert_equal(state["params"], source.at2)
  with pytest.raises(checkpoint.CheckpointError, match=r"no step 3 in .*checkpoints \(steps: 2, 4\)") as e:
    train.train(_config(init_from=f"{source.workdir}:3"), str(tmp_path / "c"), stop_at=0)
  assert "\n" not in str(e.value)


def test_a_new_run_starts_from_a_hugging_face_export(source, tmp_path):
  c = _config()
  cfg, params, step = load.load_params(c, source.workdir)
  hf_llama.save_pretrained(params, cfg, str(tmp_path / "hf"), codes=c.data.codes)
  state = train.train(_config(init_from=str(tmp_path / "hf")), str(tmp_path / "c"), stop_at=0)
  assert step == 4
  _assert_equal(state["params"], source.at4)


@pytest.mark.parametrize("change,error", [
    (dict(d_model=32), r"params/embed is \(256, 64\) there, \(256, 32\) in this config's model"),
    (dict(layers=3), r"params/layers/attn_norm is \(2, 64\) there, \(3, 64\) in this config's model"),
])
def test_a_shape_that_differs_is_one_line_naming_the_parameter(source, tmp_path, change, error):
  c = _config(init_from=source.workdir)
  c.model.update(change)
  with pytest.raises(config_lib.ConfigError, match=f"init_from={source.workdir}: {error}") as e:
    train.train(c, str(tmp_path), stop_at=0)
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "config.json")  # a start that failed leaves no record


def test_a_source_that_is_not_weights_is_one_line(source, tmp_path):
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    train.train(_config(init_from=str(tmp_path / "nothing")), str(tmp_path / "b"), stop_at=0)
  with pytest.raises(config_lib.ConfigError, match="names a checkpoint step, but .* has no checkpoints/"):
    train.train(_config(init_from=f"{tmp_path}:3"), str(tmp_path / "b"), stop_at=0)
  with pytest.raises(config_lib.ConfigError, match="no readable config.json"):
    train.train(_config(init_from=str(tmp_path)), str(tmp_path / "b"), stop_at=0)


def test_init_from_parses_a_step_and_is_recorded_absolute():
  assert load.init_source("/w/a:1200") == ("/w/a", 1200)
  assert load.init_source("gs://b/w:12") == ("gs://b/w", 12)
  assert load.init_source("gs://b/w") == ("gs://b/w", None)
  assert load.init_source("hf_dir") == ("hf_dir", None)
  assert load.absolute_init_from("run:5") == os.path.join(os.getcwd(), "run") + ":5"
  assert load.absolute_init_from("gs://b/w:5") == "gs://b/w:5"


@pytest.mark.slow  # ~6 s: an AIM run
def test_aim_starts_from_an_ml_aim_trunk_its_head_random(tmp_path, source, caplog):
  c = load_config("aim_tiny", "test")
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: aim.Model(aim.Config(**c.model), rngs=nnx.Rngs(0))),
                                        nnx.Param))
  rng = np.random.default_rng(0)  # random numbers of the trunk's shapes: an eager init takes seconds
  trunk = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract["trunk"])
  aim_torch.save_safetensors(aim_torch.to_ml_aim(trunk), str(tmp_path / "aim.safetensors"))
  c.init_from = str(tmp_path / "aim.safetensors")
  with caplog.at_level(logging.INFO):
    state = train.train(c, str(tmp_path / "run"), stop_at=0)
  _assert_equal(state["params"]["trunk"], trunk)
  # ml-aim released no pretraining head: it keeps the seed's random init.
  assert "(ml-aim safetensors, trunk) (the rest, head: random)" in caplog.text, caplog.text
  kernels = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state["params"]["head"])
             if "kernel" in jax.tree_util.keystr(p)]
  assert kernels and all(np.isfinite(k).all() and k.std() > 0 for k in kernels)
  c.init_from = source.workdir  # an LVM workdir holds no AIM's weights
  with pytest.raises(config_lib.ConfigError, match="a model_name='transformer' workdir, this run trains 'aim'"):
    train.train(c, str(tmp_path / "other"), stop_at=0)
