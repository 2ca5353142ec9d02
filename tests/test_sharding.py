"""Mesh construction, logical rules and the shardings of state and batch on 8 fake devices."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lvm_jax import config as config_lib, sharding
from lvm_jax.models import transformer

MESH = dict(ici=dict(data=2, fsdp=-1, tensor=2), dcn=dict(data=1, fsdp=1, tensor=1))


def test_mesh_fills_minus_one():
  mesh = sharding.make_mesh(MESH)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize("ici,msg", [
    (dict(data=3, fsdp=1, tensor=1), "has 3 devices but 8 are available"),
    (dict(data=3, fsdp=-1, tensor=1), "not divisible by 3"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one axis may be -1"),
])
def test_mesh_mismatch_is_one_line(ici, msg):
  with pytest.raises(sharding.MeshError, match=msg) as e:
    sharding.make_mesh(dict(ici=ici, dcn=MESH["dcn"]))
  assert "\n" not in str(e.value)


def test_logical_rules_use_each_mesh_axis_once():
  rules = config_lib.DEFAULT_RULES
  assert sharding.logical_to_spec(("batch", "length", "embed"), rules) == P(("data", "fsdp"), None, None)
  assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim"), rules) == P(None, "fsdp", "tensor", None)


def test_param_and_optimizer_specs_follow_the_params():
  import optax  # pylint: disable=g-import-not-at-top
  cfg = transformer.Config(d_model=32, ffn=64, layers=2, heads=4, vocab_size=64)
  abstract = nnx.eval_shape(lambda: transformer.Model(cfg, rngs=nnx.Rngs(0)))
  specs = sharding.param_specs(abstract, config_lib.DEFAULT_RULES)
  assert specs["layers"]["w_down"] == P(None, "tensor", "fsdp")
  assert specs["embed"] == P("tensor", "fsdp")
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
  opt_specs = sharding.tree_specs_like(opt_state, params, specs)
  mu = opt_specs[0].mu
  assert mu["layers"]["wq"] == specs["layers"]["wq"] and mu["lm_head"] == specs["lm_head"]
  assert opt_specs[0].count == P()
  stray = {"moments": params, "factored_row": jax.ShapeDtypeStruct((7,), np.float32)}
  with pytest.raises(ValueError, match="factored_row .* matches no parameter"):
    sharding.tree_specs_like(stray, params, specs)


def test_batch_divisibility_error_names_the_numbers():
  mesh = sharding.make_mesh(MESH)
  sharding.check_batch(8, 2, mesh, config_lib.DEFAULT_RULES)
  with pytest.raises(sharding.MeshError, match=r"global_batch=6 .*data x fsdp \(4\) x grad_accum \(1\)"):
    sharding.check_batch(6, 1, mesh, config_lib.DEFAULT_RULES)


def test_local_rows_and_global_batch_assembly():
  mesh = sharding.make_mesh(MESH)
  s = jax.sharding.NamedSharding(mesh, sharding.batch_spec(config_lib.DEFAULT_RULES))
  rows = sharding.local_rows(s, 8)
  np.testing.assert_array_equal(rows, np.arange(8))  # one process holds every row
  local = {"tokens": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}
  arr = sharding.global_batch_array(local, s, 8)["tokens"]
  assert arr.sharding.spec == P(s.spec[0]) and arr.sharding.mesh == mesh  # rows split, the rest whole
  np.testing.assert_array_equal(np.asarray(arr), local["tokens"])
