"""Every experiment config loads, and the dataset configs name sources and sentence kinds that exist."""

import inspect
import os

import pytest

from lvm_jax.data import sentences, sources
from tests.conftest import REPO, load_config

CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads(name):
  assert load_config(name) is not None


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("dataset_")])
def test_dataset_configs_use_known_sources_and_kinds(name):
  c = load_config(name)
  for d in c.datasets:
    kind = d["source"]["kind"]
    if kind == "demo":
      continue
    cls = sources.SOURCES[kind]
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert set(d["source"]) - {"kind"} <= params, (kind, d["source"])
    assert d["sentence"]["kind"] in sentences.KINDS
