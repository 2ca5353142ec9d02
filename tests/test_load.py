"""Workdirs are data (lvm_jax/load.py): an LVM workdir prompts from any directory, old (relative
paths) or new (vqgan_record: absolute paths, the tokenizer's architecture as JSON), and a Python
file its config.json names is never executed by prompt, evaluate or load_vqgan."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from lvm_jax import checkpoint, config as config_lib, load, prompt, sharding, train, train_vqgan
from lvm_jax.convert import vqgan_torch
from lvm_jax.data import images as images_lib, synthetic
from lvm_jax.models import vqgan
from tests.conftest import REPO, load_config, not_info

VQ_CONFIG = os.path.join(REPO, "configs", "vqgan_tiny.py")
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
# Stands for a config file from someone else's workdir: running it leaves a marker, then fails.
EVIL = """import pathlib
pathlib.Path(__file__).with_suffix(".ran").write_text("this file was executed")
raise RuntimeError("this file was executed")
"""


@dataclasses.dataclass
class Runs:
  root: str  # where the "user" ran training from
  vqgan: str  # a train_vqgan workdir: root/vqgan
  weights: str  # the same tokenizer architecture as safetensors: root/vq.safetensors
  lvm: str  # an LVM workdir's checkpoints: root/lvm (its config.json is rewritten per case)
  saved: dict  # what each workdir's checkpoint holds: {"vqgan": state, "lvm": state}


def _random(tree: dict) -> dict:
  """Random numbers of a tree's shapes: compiling an init would take most of this file's time,
  and no test here needs trained weights."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype)
                      if np.issubdtype(a.dtype, np.floating) else np.zeros(a.shape, a.dtype), tree)


def _first_save(c, workdir: str, b: dict, data_iter) -> dict:
  """A workdir as its trainer leaves it at a save: config.json and an orbax checkpoint written by
  checkpoint.Checkpointer (of a random state of the trainer's shapes), which it returns."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(c.to_json(indent=1))
  state = _random(b.abstract_state)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), c.ckpt_keep, c.ckpt_every) as ckpt:
    ckpt.save(0, jax.device_put(state, b.state_shardings), data_iter, force=True)
    ckpt.wait()
  return state


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
  root = str(tmp_path_factory.mktemp("user"))
  vq = load_config("vqgan_tiny", "test")
  mesh = sharding.make_mesh(vq.mesh, jax.local_devices())
  b = train_vqgan.build(vq, mesh)
  state = _first_save(vq, os.path.join(root, "vqgan"), b,
                      images_lib.make_iterator(vq, sharding.local_rows(b.batch_sharding, vq.global_batch)))
  weights = os.path.join(root, "vq.safetensors")  # the same tokenizer, exported
  vqgan_torch.save_safetensors(state["ema"], weights, vqgan.Config(**vq.model))
  c = load_config("lvm_tiny", "test")  # vocab 256 = the tiny VQGAN's codes
  mesh = sharding.make_mesh(c.mesh)
  b = train.build(c, mesh)
  lvm_state = _first_save(c, os.path.join(root, "lvm"), b,
                          synthetic.make_iterator(c, sharding.local_rows(b.batch_sharding, c.global_batch)))
  return Runs(root, os.path.join(root, "vqgan"), weights, os.path.join(root, "lvm"),
              {"vqgan": state, "lvm": lvm_state})


@pytest.mark.parametrize("name,item", [("vqgan", "ema"), ("lvm", "params")])
def test_load_params_reads_the_familys_weights_item_exactly(runs, name, item):
  """The loader reads the family's WEIGHTS (the VQGAN's EMA generator, the LVM's params), nothing
  of the optimizer, bit for bit, with the family's inference config."""
  workdir = getattr(runs, name)
  c = config_lib.load_from_workdir(workdir)
  cfg, weights, step = load.load_params(c, workdir)
  assert step == 0 and config_lib.model_module(c).WEIGHTS == item
  jax.tree.map(np.testing.assert_array_equal, weights, runs.saved[name][item])
  if name == "lvm":
    assert (cfg.remat, cfg.attention) == ("none", "auto")


def test_evaluate_reports_a_vqgan_workdirs_held_out_psnr(runs):
  import types  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from lvm_jax import evaluate  # pylint: disable=g-import-not-at-top
  c = config_lib.load_from_workdir(runs.vqgan)
  full = evaluate.REPORTS[vqgan.EVALUATION](c, types.SimpleNamespace(workdir=runs.vqgan))
  report = full["reconstruction"]  # lvm_jax/tokenizer_report.py's, on the held-out crops
  held = images_lib.held_out(c.image_size, c.data.shrink)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: vqgan.Model(vqgan.Config(**c.model), rngs=nnx.Rngs(0))))
  want, _ = evaluate.reconstruction(evaluate.reconstructor(graphdef), runs.saved["vqgan"]["ema"], held)
  assert report["tokenizer"] == {"workdir": runs.vqgan, "step": 0, "weights": "ema"} and report["images"] == len(held)
  np.testing.assert_allclose(report["metrics"]["psnr"]["value"], want, rtol=1e-6)
  assert {"ssim", "codebook_usage", "codebook_perplexity"} <= set(report["metrics"])
  assert f"{len(held)} images from the held-out" in evaluate.table(full)


def lvm_workdir(runs: Runs, name: str, vqgan_entry: dict) -> str:
  """root/name: the LVM's checkpoints with a config.json whose `vqgan` is `vqgan_entry`, as
  training from `runs.root` wrote it (old: the spec as typed; new: vqgan_record's)."""
  workdir = os.path.join(runs.root, name)
  shutil.copytree(os.path.join(runs.lvm, "checkpoints"), os.path.join(workdir, "checkpoints"))
  with open(os.path.join(runs.lvm, "config.json")) as f:
    c = json.load(f)
  c["vqgan"] = vqgan_entry
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(c, f, indent=1)
  return workdir


def cli(module: str, *flags: str, cwd: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", module, *flags], cwd=cwd, env=ENV, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err


@pytest.mark.slow  # ~25 s: four prompt processes
def test_prompt_reads_old_and_new_workdirs_from_another_directory(runs, tmp_path, monkeypatch):
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(elsewhere / "p.png")
  # New: training ran in root with relative paths; the workdir stores vqgan_record's answer.
  spec = dict(config="", workdir="vqgan", weights="", layout="diffusers")
  new = lvm_workdir(runs, "new", load.vqgan_record(spec, base_dir=runs.root))
  proc = cli("lvm_jax.prompt", f"--workdir={new}", "--images=p.png", "--out=o.png", "--temperature=0",
             cwd=str(elsewhere))
  # Old: the spec as typed, relative to where training ran, here inside the workdir (`cd old &&
  # python -m lvm_jax.train --workdir . --config.vqgan.workdir=../vqgan --config.vqgan.config=...`).
  old = lvm_workdir(runs, "old", dict(config=VQ_CONFIG, workdir="../vqgan", weights="", layout="diffusers"))
  monkeypatch.chdir(elsewhere)  # in this process while the CLI runs: the same lookup, no second start
  p = prompt.from_workdir(old)  # the CLI's loading; the CLI's generation is checked on `new`
  assert p.tokenizer.image_size == 32 and p.tokenizer.codes == 256
  rc, err = finish(proc)
  assert rc == 0, err[-3000:]
  blank = np.zeros((1, 32, 32, 3), np.uint8)  # one prompt image, one generated: the labeled grid's size
  assert Image.open(elsewhere / "o.png").size == prompt.grid(blank, blank[None]).shape[1::-1]


def test_a_record_of_weights_loads_from_another_directory(runs, tmp_path, monkeypatch):
  spec = dict(config=VQ_CONFIG, workdir="", weights="vq.safetensors", layout="diffusers")
  new = lvm_workdir(runs, "new_weights", load.vqgan_record(spec, base_dir=runs.root))
  monkeypatch.chdir(tmp_path)
  model, size = load.load_vqgan(config_lib.load_from_workdir(new).vqgan, relative_to=new)
  assert size == 32 and model.cfg == vqgan.Config(**load_config("vqgan_tiny").model)


def test_a_missing_vqgan_names_the_absolute_paths_tried(runs, tmp_path, monkeypatch):
  # The demo workdir: paths relative to a training directory that is not this one.
  old = lvm_workdir(runs, "demo_lvm", dict(config=VQ_CONFIG, workdir="workdir/demo/vqgan", weights=""))
  monkeypatch.chdir(tmp_path)
  with pytest.raises(config_lib.ConfigError) as e:
    load.load_vqgan(config_lib.load_from_workdir(old).vqgan, relative_to=old)
  message = str(e.value)
  assert len(message.splitlines()) == 1 and f"{old}/config.json" in message, message
  assert os.path.join(old, "workdir/demo/vqgan") in message and str(tmp_path / "workdir/demo/vqgan") in message


def test_a_python_file_named_by_a_workdir_never_runs(runs, tmp_path):
  evil = os.path.join(runs.root, "evil_config.py")
  with open(evil, "w") as f:
    f.write(EVIL)
  marker = os.path.join(runs.root, "evil_config.ran")
  old = lvm_workdir(runs, "evil", dict(config=evil, workdir="", weights=runs.weights, layout="diffusers"))
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "p.png")
  procs = [cli("lvm_jax.prompt", f"--workdir={old}", "--images=p.png", "--out=o.png", cwd=str(tmp_path)),
           cli("lvm_jax.evaluate", f"--workdir={old}", "--store=/nonexistent", cwd=str(tmp_path))]
  with pytest.raises(config_lib.ConfigError, match="does not execute files named in a workdir"):
    load.load_vqgan(config_lib.load_from_workdir(old).vqgan, relative_to=old)
  for proc in procs:
    rc, err = finish(proc)
    assert rc == 2 and "does not execute files named in a workdir" in err, err[-3000:]
    assert len(not_info(err)) == 1 and "--vqgan_config" in err, err
  # The same file next to the architecture stored as data: the data is used, the file ignored.
  record = dict(load.vqgan_record(dict(config=VQ_CONFIG, weights=runs.weights)), config=evil)
  model, size = load.load_vqgan(record)
  assert size == 32 and model.cfg.codes == 256
  assert not os.path.exists(marker)


def test_vqgan_record_is_absolute_json_with_the_architecture(runs, monkeypatch):
  monkeypatch.chdir(runs.root)  # the user's training directory: relative paths mean its files
  as_json = lambda x: json.loads(json.dumps(x))  # also fails on anything json cannot write
  tiny = as_json(load_config("vqgan_tiny").model.to_dict())
  from_workdir = load.vqgan_record(dict(config="", workdir="vqgan", weights="", layout="diffusers"))
  from_file = load.vqgan_record(dict(config=os.path.relpath(VQ_CONFIG), workdir="", weights="vq.safetensors"))
  assert as_json(from_workdir) == dict(workdir=runs.vqgan, weights="", layout="diffusers", model=tiny, image_size=32)
  assert as_json(from_file) == dict(workdir="", weights=runs.weights, layout="diffusers", model=tiny, image_size=32)
  # What config.json gives back loads, and recording a record again (a resumed run) changes nothing.
  model, size = load.load_vqgan(as_json(from_file))
  assert size == 32 and model.cfg == vqgan.Config(**load_config("vqgan_tiny").model)
  assert as_json(load.vqgan_record(as_json(from_file), base_dir="/elsewhere")) == as_json(from_file)
  remote = load.vqgan_record(dict(config=VQ_CONFIG, weights="gs://bucket/vq.safetensors"), base_dir="/x")
  assert remote["weights"] == "gs://bucket/vq.safetensors" and remote["image_size"] == 32
  assert load.vqgan_record(load_config("lvm_tiny").vqgan) == dict(workdir="", weights="", layout="diffusers",
                                                                  model={}, image_size=0)
