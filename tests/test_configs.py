"""Every experiment config loads, and the dataset configs name sources and sentence kinds that exist."""

import inspect
import os

import pytest

from lvm_jax import config as config_lib
from lvm_jax.data import sentences, sources
from tests.conftest import REPO, load_config

CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))


TRAINING = [n for n in CONFIGS if not n.startswith(("dataset_", "scaling_"))]
LADDERS = [n for n in CONFIGS if n.startswith("scaling_")]


@pytest.mark.parametrize("name", TRAINING)
def test_training_configs_validate_and_declare_their_batch(name):
  """Every shipped recipe passes the checks its trainer runs first, and its family's batch has
  the config's global batch as the leading dimension of every array."""
  c = load_config(name)
  config_lib.validate(c)
  spec = config_lib.model_module(c).batch_spec(c)
  assert spec and all(x.shape[0] == c.global_batch for x in spec.values()), spec


@pytest.mark.parametrize("name", LADDERS)
def test_scaling_ladders_validate_and_span_a_decade_of_sizes(name):
  """Every rung of a shipped ladder passes its trainer's checks, on one budget, and the sizes
  span 10x or more in non-embedding parameters: what a power law needs to be fitted on."""
  from lvm_jax import scaling  # pylint: disable=g-import-not-at-top
  rungs = scaling.rung_configs(load_config(name))
  assert len(rungs) >= 4 and len({(c.steps, c.global_batch, c.seq_len) for _, c in rungs}) == 1
  n = [scaling.param_counts(c)[1] for _, c in rungs]
  assert n == sorted(n) and n[-1] >= 10 * n[0], n


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
