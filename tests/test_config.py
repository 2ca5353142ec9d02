"""config.py: validation is one line naming the key, per trainer and per model family; the
family is found by name; workdir configs come back as written."""

import json

import ml_collections
import numpy as np
import pytest

from lvm_jax import config as config_lib
from lvm_jax.models import aim, transformer, vqgan
from tests.conftest import load_config


@pytest.mark.parametrize("name,key,value,error", [
    ("lvm_tiny", "model.d_model", 30, r"model.d_model=30 is not divisible by model.heads=4"),
    ("lvm_tiny", "model.remat", "some", r"model.remat='some': expected one of \('none', 'full', 'dots'\)"),
    ("lvm_tiny", "model.attention", "pallas", r"model.attention='pallas': expected one of"),
    ("lvm_tiny", "model.attention_block", 24, r"model.attention_block=24: expected 0"),
    ("lvm_tiny", "seq_len", 100, r"seq_len=100 is not a multiple of tokens_per_image=8"),
    ("lvm_tiny", "grad_accum", 3, r"global_batch=8 is not divisible by grad_accum=3"),
    ("lvm_tiny", "mesh.ici.pipeline", 2, r"mesh.ici.pipeline: unknown mesh axis"),
    ("lvm_tiny", "log_every", 0, r"log_every=0 must be >= 1"),
    ("lvm_tiny", "data.loss_from_image", 8, r"data.loss_from_image=8: expected an image index from 0"),
    ("aim_tiny", "seq_len", 17, r"seq_len=17: must be the patches per image"),
    ("aim_tiny", "model.patch", 5, r"model.image_size=32 is not a multiple of model.patch=5"),
    ("vqgan_tiny", "image_size", 34, r"image_size=34 is not a multiple of the downsampling factor 4"),
    ("vqgan_tiny", "ema", 1.0, r"ema=1.0: expected a decay in \[0, 1\)"),
    ("vqgan_tiny", "model.downsample", "stride", r"model.downsample='stride': expected conv\|avgpool"),
    ("lvm_tiny", "model_name", "resnet", r"model_name='resnet': no module lvm_jax/models/resnet.py"),
])
def test_a_wrong_setting_is_one_line_naming_it(name, key, value, error):
  c = load_config(name, "test")
  with c.unlocked():
    *parents, last = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[last] = value
  with pytest.raises(config_lib.ConfigError, match=error) as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)


def test_a_warmup_longer_than_the_run_is_a_warning_not_an_error(caplog):
  """A smoke run (--config.steps=5) of a recipe with a longer warmup still starts, and says why
  its learning rate stays low."""
  c = load_config("lvm_tiny")
  c.steps = 5
  with caplog.at_level("WARNING"):
    config_lib.validate(c)
  assert "optim.warmup=20 >= steps=5" in caplog.text


def test_the_family_is_the_module_named_by_the_config():
  assert config_lib.model_module(load_config("lvm_tiny")) is transformer
  assert config_lib.model_module(load_config("aim_tiny")) is aim
  assert config_lib.model_module(load_config("vqgan_tiny")) is vqgan


def test_plain_gives_json_and_static_config_values():
  c = ml_collections.ConfigDict({"a": [1, (2, 3)], "b": {"c": np.int64(4)}})
  assert config_lib.plain(c) == {"a": (1, (2, 3)), "b": {"c": 4}}
  assert type(config_lib.plain(np.float32(0.5))) is float


def test_a_workdir_config_comes_back_with_tuples(tmp_path):
  c = load_config("vqgan_tiny")
  (tmp_path / "config.json").write_text(c.to_json())
  back = config_lib.load_from_workdir(str(tmp_path))
  assert back.model.channel_mult == tuple(c.model.channel_mult)
  assert vqgan.Config(**back.model) == vqgan.Config(**c.model)  # hashable: a static argument of jit
  assert json.loads(back.to_json()) == json.loads(c.to_json())
  with pytest.raises(config_lib.ConfigError, match="does not exist: not a workdir"):
    config_lib.load_from_workdir(str(tmp_path / "none"))


def test_a_missing_config_file_is_one_line():
  with pytest.raises(config_lib.ConfigError, match=r"config file /no/such.py does not exist"):
    config_lib.load_file("/no/such.py:arg")
