"""Loading trained models from workdirs: the one place that reads them, and it never runs code.

A workdir may come from someone else, so everything read from it is data: config.json, orbax
checkpoints, safetensors. The VQGAN an LVM workdir names is stored as a record made once, when
training starts on the user's own command line (`vqgan_record`): absolute paths and the
tokenizer's architecture as JSON. `load_vqgan` reads such a record and refuses the Python config
file older workdirs name, rather than executing it. Relative paths of older workdirs resolve
against the workdir first and then the current directory (where they used to resolve).

A new run's starting weights (config.init_from, `init_params`) are read here too: a training
workdir of the same family (newest step that verifies, or WORKDIR:STEP), a Hugging Face
LlamaForCausalLM directory, or an ml-aim safetensors file; again only orbax, safetensors, JSON.
"""

import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from lvm_jax import checkpoint, config as config_lib, models
from lvm_jax.models import aim, transformer, vqgan


def load_params(c: Any, workdir: str, step: Optional[int] = None) -> tuple[Any, dict, int]:
  """(model config for inference, weights as numpy pure dicts, step) of the newest checkpoint in a
  training workdir that verifies (or of `step`), for any model family (c.model_name): only the
  family's WEIGHTS item is read (the LVM's params, the VQGAN's EMA generator), never the
  optimizer's moments."""
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
  weights, step = checkpoint.read_weights(directory, family.WEIGHTS, abstract, step)
  return family.inference(cfg), weights, step


def load_model(c: Any, workdir: str) -> tuple[Any, int]:
  """(model with its trained weights, step): load_params put into the family's Model."""
  cfg, weights, step = load_params(c, workdir)
  model = models.abstract(config_lib.model_module(c), cfg)
  nnx.update(model, jax.tree.map(jnp.asarray, weights))
  return model, step


def init_source(spec: str) -> tuple[str, Optional[int]]:
  """(path, step or None) of a config.init_from value: a trailing ':N' names a workdir's step
  (gs://bucket/w:1200 too; the 'gs:' of a bare gs:// path is no step)."""
  path, sep, step = spec.rpartition(":")
  return (path, int(step)) if sep and path and step.isdigit() else (spec, None)


def absolute_init_from(spec: str) -> str:
  """config.init_from with a local path made absolute, so the workdir's record means it from anywhere."""
  path, step = init_source(spec)
  if not path or "://" in path:
    return spec
  return os.path.abspath(os.path.expanduser(path)) + ("" if step is None else f":{step}")


def init_params(c: Any, abstract_params: Any) -> dict:
  """A new run's starting weights from c.init_from: {top-level key: subtree} of the parameters it
  holds (all of them; of an ml-aim file, the AIM trunk), each checked against `abstract_params`
  (shapes, dtypes, shardings of the run's params) and placed on its sharding. A shape that
  differs is one ConfigError line naming the parameter."""
  path, step = init_source(c.init_from)
  weights, source = _init_weights(c, path, step)
  _check_init_shapes(c.init_from, weights, abstract_params)
  placed = {k: jax.tree.map(_place, weights[k], abstract_params[k]) for k in weights}
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  loaded, total = count(weights), count(abstract_params)
  rest = "" if loaded == total else f" (the rest, {', '.join(sorted(abstract_params.keys() - weights.keys()))}: random)"
  logging.info("init_from: %s of %s parameters from %s (%s)%s; optimizer state and step start fresh",
               f"{loaded:,}", f"{total:,}", path, source, rest)
  return placed


def _place(w: np.ndarray, a: jax.ShapeDtypeStruct) -> jax.Array:
  """A host array on its sharding: each process puts only its own shards on its devices."""
  w = np.asarray(w, a.dtype)
  return jax.make_array_from_callback(a.shape, a.sharding, lambda index: w[index])


def _init_weights(c: Any, path: str, step: Optional[int]) -> tuple[dict, str]:
  """(numpy params or a part of them, what they are) of an init_from path, by what it holds."""
  family, where = config_lib.model_module(c), f"init_from={c.init_from}"
  if not epath.Path(path).exists():
    raise config_lib.ConfigError(f"{where}: {_display(path)} does not exist")
  if (epath.Path(path) / "checkpoints").exists():  # a training workdir: its own config.json says what it holds
    source = config_lib.load_from_workdir(path)
    if source.get("model_name") != c.model_name:
      raise config_lib.ConfigError(f"{where}: a model_name={source.get('model_name')!r} workdir, "
                                   f"this run trains {c.model_name!r}")
    _, weights, step = load_params(source, path, step)
    return weights, f"step {step} of a training workdir"
  if step is not None:
    raise config_lib.ConfigError(f"{where}: ':{step}' names a checkpoint step, but {_display(path)} has no "
                                 "checkpoints/ (not a training workdir)")
  try:
    if family is transformer:
      from lvm_jax.convert import hf_llama  # pylint: disable=g-import-not-at-top
      return hf_llama.load_pretrained(path)[1], "Hugging Face LlamaForCausalLM"
    if family is aim:
      from lvm_jax import convert  # pylint: disable=g-import-not-at-top
      from lvm_jax.convert import aim_torch  # pylint: disable=g-import-not-at-top
      file = str(epath.Path(path) / "model.safetensors") if epath.Path(path).is_dir() else path
      return {"trunk": aim_torch.from_ml_aim(convert.load_float32(file))[0]}, "ml-aim safetensors, trunk"
  except Exception as e:  # pylint: disable=broad-except  # unreadable, not safetensors, another layout
    raise config_lib.ConfigError(f"{where}: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from None
  raise config_lib.ConfigError(f"{where}: {_display(path)} has no checkpoints/, and model_name={c.model_name!r} "
                               "starts from no other format (an LVM from a Hugging Face directory, AIM from ml-aim)")


def _check_init_shapes(spec: str, weights: dict, abstract_params: dict) -> None:
  """One ConfigError line for the first parameter whose shape differs, is missing or is unknown."""
  flat = lambda tree: {"params/" + "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): tuple(x.shape)
                       for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  have = flat(weights)
  want = flat({k: v for k, v in abstract_params.items() if k in weights})
  changed = sorted(k for k in have.keys() & want.keys() if have[k] != want[k])
  missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
  if changed:
    what = f"{changed[0]} is {have[changed[0]]} there, {want[changed[0]]} in this config's model"
  elif missing:
    what = f"no {missing[0]} there (this config's model has it, {want[missing[0]]})"
  elif extra:
    what = f"{extra[0]} {have[extra[0]]} there is not in this config's model"
  else:
    return
  raise config_lib.ConfigError(f"init_from={spec}: {what}")


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
