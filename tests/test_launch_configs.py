"""Each LVM size of the release fits the TPU slice its config's docstring names.

The topology is read from the docstring's `--topology X` (the memory-check command it shows), so
the docstring and this test cannot drift apart; the launch line must name the same slice.
"""

import ast
import importlib.util
import os
import re

import pytest

from lvm_jax import compile as compile_lib
from lvm_jax import models
from lvm_jax.models import transformer
from tests.conftest import REPO, load_config

LVM = ["lvm_100m", "lvm_300m", "lvm_600m", "lvm_1b", "lvm_3b", "lvm_7b", "lvm_13b", "lvm_20b", "lvm_30b"]

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e .[tpu])")


def docstring(name: str) -> str:
  with open(os.path.join(REPO, "configs", f"{name}.py")) as f:
    return ast.get_docstring(ast.parse(f.read())) or ""


def topology(name: str) -> str:
  """The slice of the docstring's `python -m lvm_jax.compile ... --topology X` line."""
  found = re.findall(r"--topology[ =](\S+)", docstring(name))
  assert len(found) == 1, (name, found)
  return found[0]


@pytest.mark.parametrize("name", LVM)
def test_the_docstring_compiles_and_launches_on_one_slice(name):
  """One topology, the one the launch line reserves, large enough for the global batch."""
  text, slice_ = docstring(name), topology(name)
  assert f"python -m lvm_jax.compile --config configs/{name}.py --topology {slice_}" in text
  assert re.search(rf"bash launch/tpu_pod\.sh .*\b{re.escape(slice_)} configs/{name}\.py gs://", text), text
  gen, _ = compile_lib.topology_name(slice_)
  chips = int(slice_.split("-")[1]) // (2 if gen in ("v4", "v5p") else 1)
  assert load_config(name).global_batch % chips == 0, (name, chips)  # the batch splits over FSDP


@pytest.mark.parametrize("name,params", [("lvm_13b", 12.8e9), ("lvm_20b", 20.7e9), ("lvm_30b", 32.2e9)])
def test_the_largest_sizes_match_the_release(name, params):
  cfg = transformer.Config(**load_config(name).model)
  assert cfg.d_model // cfg.heads == 128  # head_dim of every vqlm size from 13B up
  count = models.count_params(models.abstract(transformer, cfg))
  assert abs(count - params) / params < 0.005, (name, count)
  assert f"({params / 1e9:.1f}B parameters)" in docstring(name)


@pytest.mark.slow  # ~1-3 min each on 2 cores: a real XLA:TPU compile of the full train step
@needs_libtpu
@pytest.mark.parametrize("name", LVM)
def test_each_lvm_size_fits_the_topology_its_docstring_names(name, record_property):
  c = load_config(name)
  assert c.seq_len == 4096 and c.model.remat == "full"
  r = compile_lib.report(c, topology(name))
  record_property("total_gib", round(r["total_gib"], 2))
  print(f"{name} on {topology(name)}: {r['total_gib']:.2f} GiB per chip of {r['hbm_gib']}")
  assert 0 < r["total_gib"] < r["hbm_gib"], r
