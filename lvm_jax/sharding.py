"""Mesh, logical axis rules, and the shardings of parameters, optimizer state and batches.

The mesh has three axes, `data`, `fsdp` and `tensor`, each an ICI size (within a slice) times a
DCN size (across slices). Parameters carry logical axis names in their `axes` metadata
(models/transformer.py); the config's rules map those names onto mesh axes. Everything here is
derived once from the config and handed to `jax.jit` as data.
"""

import contextlib
import math
import threading
from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, Any]]


class MeshError(ValueError):
  """The mesh the config asks for does not fit the devices."""


def _fill(sizes: dict, total: int, what: str) -> list[int]:
  """Axis sizes in AXES order with at most one -1 filled so the product is `total`."""
  dims = [int(sizes.get(a, 1)) for a in AXES]
  known = math.prod(d for d in dims if d != -1)
  if dims.count(-1) > 1:
    raise MeshError(f"mesh.{what}={dict(zip(AXES, dims))}: at most one axis may be -1")
  if -1 in dims:
    if total % known:
      raise MeshError(f"mesh.{what}={dict(zip(AXES, dims))}: {total} devices are not divisible by {known}")
    dims[dims.index(-1)] = total // known
  if math.prod(dims) != total:
    raise MeshError(f"mesh.{what}={dict(zip(AXES, dims))} has {math.prod(dims)} devices but {total} are available")
  return dims


def make_mesh(mesh_cfg: Any, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh; DCN axes split across slices."""
  devices = list(jax.devices() if devices is None else devices)
  slices = {getattr(d, "slice_index", 0) for d in devices}
  dcn = _fill(mesh_cfg["dcn"], len(slices), "dcn")
  ici = _fill(mesh_cfg["ici"], len(devices) // len(slices), "ici")
  if len(slices) > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(ici, devices)
    except (AssertionError, NotImplementedError, ValueError):
      # Topology-aware placement only knows TPU/GPU layouts; CPU devices go in order.
      grid = np.asarray(devices).reshape(ici)
  # Auto axes: GSPMD propagates shardings from the annotations; nothing needs explicit mode.
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


# ---------------------------------------------------------------------------- logical axes

_state = threading.local()


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
  """Makes `rules` the ones `constrain` uses while tracing the model."""
  old = getattr(_state, "rules", None)
  _state.rules = tuple(rules)
  try:
    yield
  finally:
    _state.rules = old


def logical_to_spec(axes: Sequence[Optional[str]], rules: Rules) -> P:
  """Logical names -> PartitionSpec, each mesh axis used at most once per array: with the default
  rules ('batch', 'length', 'embed') -> P(('data', 'fsdp'), None, None), since batch took fsdp."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in axes:
    target = table.get(name) if name is not None else None
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    mesh_axes = tuple(a for a in mesh_axes if a not in used)
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return P(*spec)


def current_spec(axes: Sequence[Optional[str]]) -> Optional[P]:
  """The PartitionSpec of logical `axes` under the active rules and mesh, None outside them."""
  rules = getattr(_state, "rules", None)
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return None
  return logical_to_spec(axes, rules)


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
  """Sharding constraint on an activation, a no-op outside a mesh + rules context."""
  spec = current_spec(axes)
  return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


# ---------------------------------------------------------------------------- state and batch


def param_specs(abstract_model: nnx.Module, rules: Rules) -> dict:
  """PartitionSpecs of the model's parameters (a pure dict), from their `axes` metadata.

  A parameter stacked by nnx.vmap (layers built as one module) has one leading axis more than
  its metadata names: the layer axis, never sharded."""
  state = nnx.state(abstract_model, nnx.Param)

  def spec(v: nnx.Variable) -> P:
    axes = tuple(v.get_metadata()["axes"])
    return logical_to_spec((None,) * (len(v.get_value().shape) - len(axes)) + axes, rules)

  specs = jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs)


def _path_key(path: tuple) -> tuple:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def tree_specs_like(tree: Any, params: Any, param_specs_tree: Any) -> Any:
  """Specs for a tree that embeds copies of the params (optimizer moments): a leaf whose path
  ends with a parameter's path and has its shape gets that parameter's spec; scalars (step
  counts) replicate. Any other array is an error rather than a silently replicated state."""
  by_path = {}
  for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree.leaves(param_specs_tree, is_leaf=lambda x: isinstance(x, P)),
                                strict=True):
    by_path[_path_key(path)] = (leaf.shape, spec)

  def spec_of(path: tuple, leaf: Any) -> P:
    key = _path_key(path)
    for start in range(len(key)):
      hit = by_path.get(key[start:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    if leaf.ndim:
      raise ValueError(f"optimizer state {'/'.join(key)} {leaf.shape} matches no parameter: "
                       "give it a sharding rule in sharding.tree_specs_like")
    return P()

  return jax.tree_util.tree_map_with_path(spec_of, tree)


def named(mesh: Mesh, specs: Any) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_spec(rules: Rules) -> P:
  return logical_to_spec(("batch", "length"), rules)


def check_batch(global_batch: int, grad_accum: int, mesh: Mesh, rules: Rules) -> None:
  """Each micro-batch must split evenly over the devices its batch axis is sharded on."""
  batch_axes = batch_spec(rules)[0] or ()
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  if global_batch % (shards * grad_accum):
    raise MeshError(
        f"global_batch={global_batch} is not divisible by {' x '.join(batch_axes)} ({shards}) "
        f"x grad_accum ({grad_accum}) = {shards * grad_accum}")


def global_batch_array(local: dict, sharding: NamedSharding, global_batch: int) -> dict:
  """Host-local numpy batch -> global jax.Arrays (each process passes its own rows). Every
  array is split over the batch axes along its first dimension, whatever its rank."""
  rows = NamedSharding(sharding.mesh, P(sharding.spec[0]))
  return {k: jax.make_array_from_process_local_data(rows, v, (global_batch, *v.shape[1:])) for k, v in local.items()}


def local_rows(sharding: NamedSharding, global_batch: int) -> np.ndarray:
  """The global batch rows that this process's devices hold, in order."""
  index_map = sharding.addressable_devices_indices_map((global_batch, 1))
  rows = sorted({r for idx in index_map.values() for r in range(*idx[0].indices(global_batch))})
  return np.asarray(rows, np.int64)
