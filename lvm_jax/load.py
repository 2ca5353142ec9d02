"""Loading trained models from workdirs: the one place that reads them, and it never runs code.

A workdir may come from someone else, so everything read from it is data: config.json, orbax
checkpoints, safetensors. The VQGAN an LVM workdir names is stored as a record made once, when
training starts on the user's own command line (`vqgan_record`): absolute paths and the
tokenizer's architecture as JSON. `load_vqgan` reads such a record and refuses the Python config
file older workdirs name, rather than executing it. Relative paths of older workdirs resolve
against the workdir first and then the current directory (where they used to resolve).
"""

import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from lvm_jax import checkpoint, config as config_lib, models
from lvm_jax.models import vqgan


def load_params(c: Any, workdir: str) -> tuple[Any, dict, int]:
  """(model config for inference, weights as numpy pure dicts, step) of the newest checkpoint in a
  training workdir that verifies, for any model family (c.model_name): only the family's WEIGHTS
  item is read (the LVM's params, the VQGAN's EMA generator), never the optimizer's moments."""
  family = config_lib.model_module(c)
  try:
    cfg = family.Config(**c.model)
  except TypeError as e:  # an unknown or missing field in the workdir's model section
    raise config_lib.ConfigError(f"model in {_display(workdir)}/config.json: {e}") from None
  abstract = nnx.to_pure_dict(nnx.state(models.abstract(family, cfg), nnx.Param))
  directory = str(epath.Path(workdir) / "checkpoints")
  if not epath.Path(directory).exists():
    raise checkpoint.CheckpointError(f"no checkpoint in {_display(directory)} (not a training workdir, or "
                                     "training saved none yet)")
  weights, step = checkpoint.read_weights(directory, family.WEIGHTS, abstract)
  return family.inference(cfg), weights, step


def load_model(c: Any, workdir: str) -> tuple[Any, int]:
  """(model with its trained weights, step): load_params put into the family's Model."""
  cfg, weights, step = load_params(c, workdir)
  model = models.abstract(config_lib.model_module(c), cfg)
  nnx.update(model, jax.tree.map(jnp.asarray, weights))
  return model, step


def vqgan_record(spec: Mapping[str, Any], base_dir: Optional[str] = None) -> dict:
  """What an LVM workdir stores of the user's vqgan spec dict(config=, workdir=, weights=, layout=):
  dict(workdir, weights, layout, model, image_size) with absolute paths (gs:// as given) and the
  architecture as data. Local paths are taken against base_dir (default: the current directory).

  The architecture comes from the spec's own `model` (a record again), else from the config file
  for weights (the user named it: it runs here, once), else from the VQGAN workdir's config.json.
  A spec naming no VQGAN gives a record naming none (model {}, image_size 0).
  """
  base = base_dir or os.getcwd()
  absolute = lambda p: p if not p or "://" in p else os.path.abspath(os.path.join(base, os.path.expanduser(p)))
  workdir, weights, config = (absolute(spec.get(k) or "") for k in ("workdir", "weights", "config"))
  record = dict(workdir=workdir, weights=weights, layout=spec.get("layout") or "diffusers")
  if spec.get("model"):
    vq = dict(model=spec["model"], image_size=spec.get("image_size") or 0)
  elif weights and config:
    vq = config_lib.load_file(config)
  elif workdir:
    vq = _vqgan_workdir_config(workdir, "vqgan.workdir")
    vq = dict(model=vq.model, image_size=vq.image_size)
  elif weights:
    raise config_lib.ConfigError(f"vqgan.weights={weights} needs vqgan.config, the file of its architecture")
  elif config:
    raise config_lib.ConfigError(f"vqgan.config={config} without vqgan.weights or vqgan.workdir: nothing to load")
  else:
    return dict(record, model={}, image_size=0)
  model = config_lib.plain(vq["model"])
  _vqgan_config(model, "vqgan.model")  # a wrong architecture fails now, not at prompting
  if not vq["image_size"]:
    raise config_lib.ConfigError("vqgan: a model without its image_size")
  return dict(record, model=model, image_size=int(vq["image_size"]))


def load_vqgan(record: Mapping[str, Any], relative_to: Optional[str] = None) -> tuple[vqgan.Model, int]:
  """(model, image size) of a vqgan record: safetensors weights with the record's architecture, or
  the EMA generator of a train_vqgan workdir (architecture from its config.json). Never executes a
  file. `relative_to`: the LVM workdir the record came from, for its relative paths."""
  from lvm_jax.convert import vqgan_torch  # pylint: disable=g-import-not-at-top
  where = f" in {_display(relative_to)}/config.json" if relative_to else ""
  weights = resolve(record.get("weights") or "", relative_to, "vqgan.weights", where)
  if not weights:
    workdir = resolve(record.get("workdir") or "", relative_to, "vqgan.workdir", where)
    if not workdir:
      raise config_lib.ConfigError(f"vqgan{where} names no VQGAN (workdir or weights)")
    vq_config = _vqgan_workdir_config(workdir, "vqgan.workdir", where)  # how it was trained: data
    return load_model(vq_config, workdir)[0], int(vq_config.image_size)
  cfg, image_size = _architecture(record, relative_to, where, weights)
  # Shapes only: every parameter comes from the file (load_safetensors checks that), so a random
  # init would be thrown away (seconds for the 146M-parameter f16 tokenizer).
  model = nnx.eval_shape(lambda: vqgan.Model(cfg, rngs=nnx.Rngs(0)))
  try:
    nnx.update(model, vqgan_torch.load_safetensors(weights, cfg, record.get("layout") or "diffusers"))
  except (OSError, vqgan_torch.WeightsError) as e:
    raise config_lib.ConfigError(f"vqgan.weights={weights}: {e}") from None
  return model, image_size


def _architecture(record: Mapping[str, Any], relative_to: Optional[str], where: str,
                  weights: str) -> tuple[vqgan.Config, int]:
  """The architecture of a record's weights, from data only: its `model`, or a VQGAN workdir's."""
  if record.get("model"):
    if not record.get("image_size"):
      raise config_lib.ConfigError(f"vqgan{where} has a model but no image_size")
    return _vqgan_config(record["model"], f"vqgan.model{where}"), int(record["image_size"])
  if record.get("workdir"):
    workdir = resolve(record["workdir"], relative_to, "vqgan.workdir", where)
    vq_config = _vqgan_workdir_config(workdir, "vqgan.workdir", where)
    return _vqgan_config(vq_config.model, f"vqgan.workdir{where}"), int(vq_config.image_size)
  if record.get("config"):
    raise config_lib.ConfigError(
        f"vqgan{where} takes the architecture of {weights} from the Python file {record['config']}, and "
        "lvm_jax does not execute files named in a workdir: pass --vqgan_weights with a --vqgan_config "
        "you trust on the command line")
  raise config_lib.ConfigError(f"vqgan{where}: weights {weights} without their architecture (vqgan.model)")


def resolve(path: str, relative_to: Optional[str], name: str, where: str = "") -> str:
  """An existing absolute path for `path` (gs:// as given): relative ones against `relative_to` (the
  workdir they were read from), then the current directory, where older workdirs meant them."""
  if not path or "://" in path:
    return path
  path = os.path.expanduser(path)
  tried = [] if os.path.isabs(path) or not relative_to else [str(epath.Path(relative_to) / path)]
  tried.append(os.path.abspath(path))
  for candidate in tried:
    if epath.Path(candidate).exists():
      return os.path.abspath(candidate) if "://" not in candidate else candidate
  shown = [_display(t) for t in tried]
  missing = f"neither {shown[0]} nor {shown[1]} exists" if len(shown) == 2 else f"{shown[0]} does not exist"
  fix = " (write it as an absolute path)" if not os.path.isabs(path) else ""
  raise config_lib.ConfigError(f"{name}={path}{where}: {missing}{fix}")


def _vqgan_workdir_config(workdir: str, name: str, where: str = "") -> Any:
  if not (epath.Path(workdir) / "config.json").exists():
    raise config_lib.ConfigError(f"{name}={workdir}{where}: {_display(workdir)}/config.json does not exist "
                                 "(not a python -m lvm_jax.train_vqgan workdir)")
  return config_lib.load_from_workdir(workdir)


def _vqgan_config(model: Mapping[str, Any], name: str) -> vqgan.Config:
  try:
    return vqgan.Config(**config_lib.plain(model))
  except TypeError as e:  # an unknown or missing field
    raise config_lib.ConfigError(f"{name}: {e}") from None


def _display(path: Optional[str]) -> str:
  return path if path is None or "://" in path else os.path.abspath(path)
