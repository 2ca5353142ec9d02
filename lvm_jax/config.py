"""Shared config defaults for the LVM experiments, and their validation.

Each file in configs/ calls `lvm_config(...)` with its model size and changes what differs; the
trainer calls `validate(config)` before it builds a mesh or compiles anything, so a wrong config
fails in one line instead of deep inside XLA.
"""

import importlib
import types
from typing import Any, Mapping

import ml_collections
import numpy as np

# Logical axis -> mesh axes. Parameters and activations are annotated with the logical names on
# the left; these rules are the only place that says how they map onto the mesh. FSDP shards the
# d_model side of every matrix, tensor parallelism the heads / ffn / vocab side (as in EasyLM).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)


def lvm_config(d_model: int, ffn: int, layers: int, heads: int) -> ml_collections.ConfigDict:
  """The LVM training recipe of the official release, at a given transformer size."""
  c = ml_collections.ConfigDict()
  c.model_name = "transformer"  # lvm_jax.models.<model_name>: the model, its batch, loss and FLOPs
  c.model = dict(
      vocab_size=8292,  # 8192 VQGAN codes + 100 reserved ids, as in the release
      d_model=d_model, ffn=ffn, layers=layers, heads=heads,
      rope_theta=1e4, norm_eps=1e-6,
      dtype="bfloat16",  # compute dtype; params and optimizer state stay fp32
      remat="full",  # none | full | dots (see models/transformer.py)
      attention="auto",  # kernels/attention.py: auto (flash on TPU, cudnn on GPU, xla on CPU) | xla | flash | cudnn
      attention_block=0,  # flash query/key block; 0 = the backend's default
      scan_layers=True,  # False: unrolled layers, faster on GPUs, slower to compile (models/transformer.py)
      max_sentences=0,  # the most sentences packed in a row, 0 = as many as fit; on GPUs 8 keeps cuDNN fast
  )
  c.seq_len = 4096  # 16 images of 16x16 tokens
  c.tokens_per_image = 256
  c.global_batch = 128  # sequences per optimizer update (0.52M tokens)
  c.grad_accum = 1  # micro-batches per update, scanned inside the step
  c.steps = 100_000  # optimizer updates
  c.seed = 0
  c.init_from = ""  # a new run's weights: WORKDIR[:STEP] of this family, an HF Llama dir, an ml-aim .safetensors

  c.optim = dict(
      lr=1.5e-4, end_lr=3e-5, warmup=2000, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1,
      # substrings of parameter paths that get no weight decay (the release decays everything)
      no_decay=("norm", "embed"),
      clip=1.0,
  )
  c.loss = dict(z_loss=0.0)  # keyword arguments of the model's loss: PaLM's log(Z)^2 weight, 0 = off

  # Mesh: ICI sizes within a slice and DCN sizes across slices; -1 takes the remaining devices.
  c.mesh = dict(ici=dict(data=1, fsdp=-1, tensor=1), dcn=dict(data=1, fsdp=1, tensor=1))
  c.rules = DEFAULT_RULES

  # Token stores made by python -m lvm_jax.make_dataset, read by lvm_jax/data/pipeline.py.
  c.data = dict(
      name="pipeline",  # lvm_jax.data.<name>
      mixture=dict(main=dict(path="", weight=1.0, dataset="", task="")),  # --config.data.mixture.main.path=
      seed=0, threads=16,  # threads: tensorstore reads in flight per process (GCS latency)
      bos=-1,  # a BOS id to start every sentence with; -1 = none, as the release
      loss_from_image=0,  # first image of a sentence that is a target; 0 = all (the release), 1: README "Data"
      allow_new_tokenizer=False,  # resume a workdir on stores of another tokenizer (workdir.py)
  )

  # The VQGAN of the data (python -m lvm_jax.train_vqgan workdir or safetensors weights with its
  # config file): prompting and evaluation decode generated tokens with it.
  c.vqgan = dict(config="", workdir="", weights="", layout="diffusers")

  c.log_every = 50
  # monitor.py: held-out answer perplexity per dataset/task, labeled sample grids (0 = off).
  c.eval_every, c.sample_every = 1000, 5000
  c.eval_data = dict(dataset="*_held_out", per_task=64, samples=4)
  c.profile_steps = ()  # (first, last): a jax.profiler trace of those steps into <workdir>/profile
  c.max_skipped_steps = 10  # non-finite updates in a row before the run stops (loop.py)
  c.storage_deadline_s = 600.0  # how long writes to the workdir wait out a storage outage
  c.ckpt_every, c.ckpt_keep = 1000, 3
  c.peak_tflops = 0.0  # per device; 0 = look up the TPU generation, or measure on CPU
  return c


def aim_config(width: int, depth: int, heads: int, image_size: int = 224, patch: int = 14) -> ml_collections.ConfigDict:
  """AIM v1 pretraining (models/aim.py) on the trainer of the LVM: the same mesh, checkpoints,
  metrics; ml-l3m's AIM v1 recipe: batch 4096, AdamW lr 1e-3, betas (0.9, 0.95), wd 0.05 (none on
  biases and norms; positions are fixed, not parameters), warmup then cosine to 0, clip 1.0;
  random resized crops (0.4-1.0) and flips, prefix lengths uniform in [1, N-1]; an MLP head of
  12 blocks of 2048 / 8192."""
  c = lvm_config(d_model=width, ffn=4 * width, layers=depth, heads=heads)
  c.model_name = "aim"
  c.model = dict(width=width, depth=depth, heads=heads, patch=patch, image_size=image_size, mlp_ratio=4,
                 head_width=2048, head_depth=12, head_mlp=8192, norm_eps=1e-6, dtype="bfloat16",
                 attention="auto")
  c.seq_len = (image_size // patch) ** 2  # patches per image: tokens/s counts patches
  c.tokens_per_image = c.seq_len
  c.global_batch, c.steps = 4096, 125_000
  c.optim.update(lr=1e-3, end_lr=0.0, warmup=3125, weight_decay=0.05, no_decay=("bias", "norm"))
  # Random resized crops (area 0.4-1, aspect 3/4-4/3) and flips of a source's images.
  c.loss = dict()
  # Validation loss on held-out images (centre crops, fixed prefixes): an image folder's val split.
  c.eval_every, c.sample_every = 0, 0
  c.eval_data = dict(source=dict(kind="image_folder", root=""), images=1024)
  c.data = dict(name="aim_images", source=dict(kind="image_folder", root=""), scale=(0.4, 1.0), seed=0,
                threads=16)  # decode threads per process
  del c.vqgan
  return c


def synthetic_data() -> dict:
  """lvm_jax/data/synthetic.py: generated sentences with a known loss floor (tests, benchmarks)."""
  return dict(name="synthetic", codes=64, images_per_sentence=(2, 4))  # codes per image; inclusive range


def vqgan_config(model: dict, image_size: int) -> ml_collections.ConfigDict:
  """VQGAN training recipe (train_vqgan.py) around a tokenizer architecture (models/vqgan.py)."""
  c = ml_collections.ConfigDict()
  c.model_name = "vqgan"
  c.model = model
  c.image_size = image_size
  c.global_batch = 256
  c.steps = 500_000
  c.seed = 0
  c.lr, c.b1, c.b2, c.clip = 1e-4, 0.5, 0.9, 1.0  # Adam as taming (beta1 0.5 keeps the GAN stable)
  c.ema = 0.999  # generator EMA; evaluation and export use it
  c.perceptual_weight = 1.0
  # models/vqgan.py shift_loss: latents that follow a shift by whole tokens. Its weight is piecewise
  # constant: (from_step, weight) pairs in step order, 0 before the first; () = off, as taming.
  c.shift_weights = ()
  c.lpips_weights = ""  # local safetensors from lvm_jax.convert.lpips_weights; empty: weight 0
  c.gan = dict(start=20_000, weight=0.5, lr=1e-4, width=64, layers=3)
  c.data = dict(name="images", shrink=2)  # built-in pictures, shrunk by this factor before cropping
  c.mesh = dict(ici=dict(data=-1, fsdp=1, tensor=1), dcn=dict(data=1, fsdp=1, tensor=1))
  c.rules = DEFAULT_RULES
  c.log_every, c.eval_every, c.sample_every = 100, 2000, 2000  # held-out PSNR; reconstruction grids
  c.profile_steps = ()
  c.max_skipped_steps, c.storage_deadline_s = 10, 600.0
  c.ckpt_every, c.ckpt_keep = 5000, 3
  return c


class ConfigError(ValueError):
  """A config that cannot run; the message names the key and the allowed values."""


def plain(x: Any) -> Any:
  """ConfigDicts and mappings as dicts, lists as tuples, numpy scalars as Python's, recursively:
  what json.dumps takes, and what a frozen model Config needs (tuples: it is a static jit argument)."""
  if isinstance(x, ml_collections.ConfigDict):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {k: plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return tuple(plain(v) for v in x)
  return x.item() if isinstance(x, np.generic) else x


def load_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The config a trainer saved in its workdir; JSON lists come back as tuples, as written."""
  import json  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise ConfigError(f"{path} does not exist: not a workdir of python -m lvm_jax.train / train_vqgan")
  return ml_collections.ConfigDict(plain(json.loads(path.read_text())))


def config_dirs() -> list[str]:
  """Where built-in configs live: the installed package's lvm_jax/configs (setup.py maps the
  checkout's configs/ there), then a checkout's configs/ beside lvm_jax/."""
  import os  # pylint: disable=g-import-not-at-top
  package = os.path.dirname(os.path.abspath(__file__))
  dirs = [os.path.join(package, "configs"), os.path.join(os.path.dirname(package), "configs")]
  return [d for d in dirs if os.path.isdir(d)]


def builtin_configs() -> list[str]:
  import glob  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  return sorted({os.path.basename(f)[:-3] for d in config_dirs() for f in glob.glob(os.path.join(d, "*.py"))
                 if not os.path.basename(f).startswith("_")})


def config_path(value: str) -> str:
  """A config as named on a command line, FILE[:ARG] or a built-in NAME[:ARG] (lvm_300m,
  lvm_tiny:test), as FILE[:ARG]; one line when it is neither."""
  import os  # pylint: disable=g-import-not-at-top
  path, sep, arg = value.partition(":")
  # A file, not any path: a directory named like a built-in (a workdir called lvm_demo) must not
  # hide it.
  if os.path.isfile(path) or os.sep in path or path.endswith(".py"):
    return value
  for d in config_dirs():
    if os.path.exists(os.path.join(d, path + ".py")):
      return os.path.join(d, path + ".py") + sep + arg
  raise ConfigError(f"--config={value}: no such file and no built-in config of that name "
                    f"(built-in: {', '.join(builtin_configs())})")


def load_file(path: str) -> ml_collections.ConfigDict:
  """get_config(arg) of a config named as on the command line: FILE[:ARG] or NAME[:ARG]."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  file, _, arg = config_path(path).partition(":")
  if not os.path.isfile(file):
    raise ConfigError(f"config file {file} does not exist")
  spec = importlib.util.spec_from_file_location(os.path.basename(file)[:-3], file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def check(ok: bool, msg: str) -> None:
  if not ok:
    raise ConfigError(msg)


def model_module(c: Any) -> types.ModuleType:
  """lvm_jax.models.<c.model_name>: the model family's contract (Config, Model, loss, batch_spec,
  flops_per_step, validate, WEIGHTS; see models/transformer.py)."""
  name = c.get("model_name", "")
  try:
    return importlib.import_module(f"lvm_jax.models.{name}")
  except ModuleNotFoundError:
    raise ConfigError(f"model_name={name!r}: no module lvm_jax/models/{name}.py") from None


def validate(c: Any) -> None:
  """One-line errors for configs that would fail later or silently do the wrong thing: the
  trainer's settings here, the model's by its family (model_module(c).validate)."""
  check(c.global_batch > 0 and c.get("grad_accum", 1) > 0,
        f"global_batch={c.global_batch} and grad_accum={c.get('grad_accum', 1)} must be positive")
  check(c.global_batch % c.get("grad_accum", 1) == 0,
        f"global_batch={c.global_batch} is not divisible by grad_accum={c.get('grad_accum', 1)}")
  check(c.log_every >= 1, f"log_every={c.log_every} must be >= 1")
  check(c.max_skipped_steps >= 1, f"max_skipped_steps={c.max_skipped_steps} must be >= 1")
  for kind in ("ici", "dcn"):
    for axis, size in c.mesh[kind].items():
      check(axis in ("data", "fsdp", "tensor"), f"mesh.{kind}.{axis}: unknown mesh axis (data|fsdp|tensor)")
      check(size == -1 or size >= 1, f"mesh.{kind}.{axis}={size}: expected -1 or a positive size")
  steps = tuple(c.get("profile_steps", ()))
  check(not steps or (len(steps) == 2 and 1 <= steps[0] <= steps[1]),
        f"profile_steps={steps}: expected () or (first, last) with 1 <= first <= last")
  init_from = c.get("init_from", "")
  check(isinstance(init_from, str), f"init_from={init_from!r}: expected a path (a training workdir[:step], "
        "a Hugging Face LlamaForCausalLM directory or an ml-aim .safetensors file), or '' for random weights")
  if "optim" in c and c.steps and c.optim.warmup >= c.steps:  # a smoke run (--config.steps=5) is fine
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning("optim.warmup=%d >= steps=%d: the learning rate never reaches optim.lr=%g",
                    c.optim.warmup, c.steps, c.optim.lr)
  model_module(c).validate(c)
