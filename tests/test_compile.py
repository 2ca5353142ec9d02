"""AOT compilation of the sharded train step for TPU topologies (libtpu, no TPU)."""

import importlib.util

import pytest

from lvm_jax import compile as compile_lib
from lvm_jax.models import transformer
from tests.conftest import load_config


@pytest.mark.parametrize("name,expected", [
    ("v5p-8", "v5p:2x2x1"), ("v5p-128", "v5p:4x4x4"), ("v4-256", "v4:4x4x8"),
    ("v5e-16", "v5e:4x4"), ("v6e-128", "v6e:8x16"), ("v5e:2x4", "v5e:2x4")])
def test_slice_names_map_to_topologies(name, expected):
  assert compile_lib.topology_name(name)[1] == expected


def test_bad_topology_is_one_line():
  with pytest.raises(ValueError, match="--topology='v9-8'"):
    compile_lib.topology_name("v9-8")


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e .[tpu])")


@needs_libtpu
def test_tiny_train_step_compiles_for_a_tpu_slice():
  c = load_config("lvm_tiny")
  c.mesh.ici.update(fsdp=2, tensor=2)
  r = compile_lib.report(c, "v5e-4")
  assert r["chips"] == 4 and r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  assert 0 < r["total_gib"] < r["hbm_gib"]
  assert r["model_flops_per_chip"] == transformer.flops_per_step(c) / 4  # the family's analytic count


@needs_libtpu
def test_tiny_train_step_uses_the_flash_kernel_on_tpu():
  """'auto' resolves to the Pallas kernel for a TPU mesh even on this CPU host."""
  c = load_config("lvm_tiny")
  c.model.attention = "auto"
  compiled, _, b = compile_lib.compile_train_step(c, "v5e-4")
  assert b.model_cfg.attention == "flash:tpu"
  assert "tpu_custom_call" in compiled.as_text()


@pytest.mark.slow  # ~15 s: an XLA:TPU compile
@needs_libtpu
def test_aim_train_step_compiles_with_the_prefix_kernel():
  """AIM through the same compile path: images + prefix lengths in, the flash kernel's prefix mask."""
  c = load_config("aim_tiny")
  c.model.attention = "auto"
  compiled, mesh, b = compile_lib.compile_train_step(c, "v5e-4")
  assert b.model_cfg.attention == "flash:tpu" and "tpu_custom_call" in compiled.as_text()


@pytest.mark.slow
@needs_libtpu
def test_flash_attention_memory_is_linear_in_the_sequence():
  """XLA:TPU's compiled temporaries of attention forward + backward (8 heads of 128, bf16): the
  kernel's stay within a few q-sized buffers, the XLA reference's grow with its [L, L] scores."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from lvm_jax.kernels import attention  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
  replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(devices[:1]), ("x",)), jax.sharding.PartitionSpec())
  temps = {}
  for impl in ("flash:tpu", "xla"):
    for L in (4096, 16384):
      qkv = jax.ShapeDtypeStruct((1, L, 8, 128), jnp.bfloat16, sharding=replicated)
      seg = jax.ShapeDtypeStruct((1, L), jnp.int32, sharding=replicated)
      loss = lambda q, k, v, s: jnp.sum(attention.attention(q, k, v, segment_ids_BL=s, impl=impl).astype(jnp.float32))
      compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv, seg).compile()
      temps[impl, L] = compiled.memory_analysis().temp_size_in_bytes
  q_bytes = 16384 * 8 * 128 * 2
  assert temps["flash:tpu", 16384] <= 4 * q_bytes, temps
  assert temps["xla", 16384] >= 8 * temps["xla", 4096] and temps["xla", 16384] >= 40 * temps["flash:tpu", 16384], temps


@pytest.mark.slow
@needs_libtpu
def test_7b_at_seq_4096_fits_a_v5p_128():
  c = load_config("lvm_7b")
  assert c.seq_len == 4096
  r = compile_lib.report(c, "v5p-128")
  assert r["chips"] == 64 and r["total_gib"] < r["hbm_gib"]


@pytest.mark.slow  # ~15 s: an XLA:TPU compile
@needs_libtpu
def test_two_slices_put_the_dcn_axis_across_slices():
  c = load_config("lvm_tiny")
  c.mesh.dcn.data = 2
  _, mesh, _ = compile_lib.compile_train_step(c, "v5e-4", num_slices=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  for i in range(2):  # each index of the data axis is one whole slice
    assert {d.slice_index for d in mesh.devices[i].flat} == {i}
