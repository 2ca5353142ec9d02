"""Visual prompting: prompt images -> VQGAN tokens -> generated tokens -> images, and a PNG grid.

  python -m lvm_jax.prompt --workdir /tmp/lvm_demo/lvm --images a.png,b.png,c.png --out o.png
  python -m lvm_jax.prompt --hf /path/LVM_ckpts_7b --vqgan_config configs/vqgan_f16_8192.py \\
      --vqgan_weights amused_vqgan.safetensors --images x1.png,y1.png,x2.png --out o.png

The LVM comes from a training workdir (its newest checkpoint and config.json; the VQGAN named in
that config, read as data by lvm_jax/load.py, or the --vqgan_* flags) or from a Hugging Face
directory (convert/hf_llama.py). The images are read as the tokenizer job reads them
(data/sources.py: any format, squashed to the tokenizer's size); the grid (lvm_jax/pictures.py)
shows the labeled prompt images in its first row, then one row of generated images per candidate.
"""

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
from absl import flags
from flax import nnx

from lvm_jax import cli, config as config_lib, pictures, sample
from lvm_jax.models import tokenize, transformer, vqgan


@dataclasses.dataclass
class Prompter:
  """An LVM and its VQGAN, ready to continue visual sentences."""
  lvm: transformer.Model
  tokenizer: tokenize.Tokenizer
  step: Optional[int] = None  # the checkpoint's training step (a workdir's), for reports to name

  def encode(self, images_BNHW3: np.ndarray) -> np.ndarray:
    """uint8 prompts [B, n, S, S, 3] -> their code ids, a sentence per row: int32 [B, n * tokens]."""
    B, n = images_BNHW3.shape[:2]
    return np.asarray(self.tokenizer.encode(images_BNHW3.reshape(B * n, *images_BNHW3.shape[2:]))).reshape(B, -1)

  def continue_ids(self, ids_BL: np.ndarray, new_images: int, key: jax.Array, *, candidates: int = 1,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   window: Optional[int] = None) -> np.ndarray:
    """Code-id prompts [B, L] -> uint8 [B, candidates, new_images, S, S, 3]."""
    B, tpi = ids_BL.shape[0], self.tokenizer.grid ** 2
    new = sample.generate(self.lvm, ids_BL, new_images * tpi, key, codes=self.tokenizer.codes, temperature=temperature,
                          top_k=top_k, top_p=top_p, candidates=candidates, window=window)
    out = self.tokenizer.decode(np.asarray(new).reshape(B * candidates * new_images, tpi))
    return out.reshape(B, candidates, new_images, *out.shape[1:])

  def continue_images(self, images_NHW3: np.ndarray, new_images: int, key: jax.Array, **sampling: Any) -> np.ndarray:
    """uint8 prompts [B, n, S, S, 3] (or one [n, S, S, 3]) -> uint8 [B, candidates, new_images, S, S, 3];
    `sampling`: continue_ids's candidates, temperature, top_k, top_p, window."""
    prompts = images_NHW3[None] if images_NHW3.ndim == 4 else images_NHW3
    return self.continue_ids(self.encode(prompts), new_images, key, **sampling)


def consensus(candidates_BC_: np.ndarray) -> np.ndarray:
  """uint8 [B, C, ...] candidate answers -> [B, ...]: in each row the candidate with the least summed
  squared pixel distance to the row's others, the minimum-Bayes-risk answer under pixel MSE with the
  model's own samples as evidence. PSNR-like scores reward the expected answer: one sample, or
  greedy's token-by-token argmax, commits to details the model is unsure of, while the consensus
  keeps what the samples agree on and is still an image the model drew."""
  B, C = candidates_BC_.shape[:2]
  x_BCD = candidates_BC_.reshape(B, C, -1).astype(np.float64)
  sq_BC = np.einsum("bcd,bcd->bc", x_BCD, x_BCD)
  # |a - b|^2 from a Gram matrix: [B, C, C] instead of a [B, C, C, D] difference.
  dist_BCC = sq_BC[:, :, None] + sq_BC[:, None, :] - 2 * np.einsum("bcd,bed->bce", x_BCD, x_BCD)
  return candidates_BC_[np.arange(B), dist_BCC.sum(-1).argmin(-1)]


def from_workdir(workdir: str, vqgan_spec: Optional[dict] = None, batch_size: int = 8) -> Prompter:
  """The newest checkpoint of an LVM workdir and the VQGAN its config names, or `vqgan_spec`: the
  caller's own spec (command-line flags), whose config file may run as the user asked."""
  from lvm_jax import load  # pylint: disable=g-import-not-at-top
  c = config_lib.load_from_workdir(workdir)
  if vqgan_spec:
    vq = load.load_vqgan(load.vqgan_record(vqgan_spec))
  else:
    spec = dict(c.vqgan)
    if not (spec.get("workdir") or spec.get("weights")):
      raise config_lib.ConfigError(f"{workdir}/config.json names no VQGAN (vqgan.workdir / vqgan.weights): "
                                   "pass --vqgan_workdir or --vqgan_weights")
    # The workdir's record is data: it never runs a file, and its relative paths are the workdir's.
    vq = load.load_vqgan(spec, relative_to=workdir)
  cfg, params, step = load.load_params(c, workdir)  # after the VQGAN: its errors come before a long restore
  return dataclasses.replace(_prompter(cfg, params, *vq, batch_size), step=step)


def from_hf(hf_dir: str, vqgan_spec: dict, batch_size: int = 8) -> Prompter:
  """A LlamaForCausalLM directory and the caller's own VQGAN spec (as on the command line)."""
  from lvm_jax import load  # pylint: disable=g-import-not-at-top
  from lvm_jax.convert import hf_llama  # pylint: disable=g-import-not-at-top
  vq = load.load_vqgan(load.vqgan_record(vqgan_spec))
  cfg, params = hf_llama.load_pretrained(hf_dir)
  return dataclasses.replace(_prompter(cfg, params, *vq, batch_size), step=hf_llama.exported_step(hf_dir))


def _prompter(cfg: transformer.Config, params: Any, vq: vqgan.Model, image_size: int, batch_size: int) -> Prompter:
  lvm = nnx.eval_shape(lambda: transformer.Model(cfg, rngs=nnx.Rngs(0)))
  nnx.update(lvm, jax.tree.map(jax.numpy.asarray, params))
  batch = batch_size * len(jax.local_devices())
  return Prompter(lvm, tokenize.Tokenizer(vq, image_size, batch))


def grid(prompt_NHW3: np.ndarray, generated_CMHW3: np.ndarray, answer_HW3: Optional[np.ndarray] = None,
         min_cell: int = 128) -> np.ndarray:
  """Labeled picture (pictures.grid): a first row "prompt 1".."prompt n" and, when known, the true
  "answer"; then one row per candidate c: "generated c" (c.j for its j-th image when it has several)."""
  first = [(f"prompt {i + 1}", img) for i, img in enumerate(prompt_NHW3)]
  first += [] if answer_HW3 is None else [("answer", answer_HW3)]
  several = generated_CMHW3.shape[1] > 1
  rows = [[(f"generated {c + 1}" + (f".{j + 1}" if several else ""), img) for j, img in enumerate(candidate)]
          for c, candidate in enumerate(generated_CMHW3)]
  return pictures.grid([first, *rows], min_cell)


def read_images(paths: list[str], size: int) -> np.ndarray:
  from lvm_jax.data import sources  # pylint: disable=g-import-not-at-top
  images = []
  for path in paths:
    try:
      with open(path, "rb") as f:
        images.append(sources.decode_image(f.read(), size))
    except (OSError, sources.BadInput) as e:
      raise config_lib.ConfigError(f"--images: {path}: {e}") from None
  return np.stack(images)


def define_vqgan_flags() -> Callable[[], Optional[dict]]:
  """--vqgan_workdir, --vqgan_weights, --vqgan_config, --vqgan_layout (prompt and evaluate); returns
  what gives their spec once parsed, None without them (the LVM workdir's own VQGAN)."""
  vq_workdir = flags.DEFINE_string("vqgan_workdir", None, "VQGAN train_vqgan workdir (default: the LVM config's).")
  vq_weights = flags.DEFINE_string("vqgan_weights", None, "Or: VQGAN safetensors weights (with --vqgan_config).")
  vq_config = flags.DEFINE_string("vqgan_config", None, "VQGAN config file for --vqgan_weights (it is run: "
                                  "name only a file you trust).")
  vq_layout = flags.DEFINE_enum("vqgan_layout", "diffusers", ["diffusers", "muse"], "Layout of --vqgan_weights.")

  def spec() -> Optional[dict]:
    if not (vq_workdir.value or vq_weights.value):
      return None
    return dict(config=vq_config.value or "", workdir=vq_workdir.value or "", weights=vq_weights.value or "",
                layout=vq_layout.value)

  return spec


def cli_main() -> None:
  workdir = flags.DEFINE_string("workdir", None, "LVM training workdir (checkpoints + config.json).")
  hf = flags.DEFINE_string("hf", None, "Or: a LlamaForCausalLM directory with safetensors weights.")
  vqgan_spec = define_vqgan_flags()
  images = flags.DEFINE_list("images", None, "Prompt images, in sentence order.")
  out = flags.DEFINE_string("out", None, "Output PNG: the prompt, then one row of generated images per candidate.")
  new_images = flags.DEFINE_integer("new_images", 1, "Images to generate.")
  candidates = flags.DEFINE_integer("candidates", 1, "Continuations to draw.")
  temperature = flags.DEFINE_float("temperature", 1.0, "0 = greedy.")
  top_k = flags.DEFINE_integer("top_k", 0, "Keep the k most likely codes (0 = all).")
  top_p = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
  seed = flags.DEFINE_integer("seed", 0, "Sampling seed.")

  def main(_):
    spec = vqgan_spec()
    if bool(workdir.value) == bool(hf.value):
      raise config_lib.ConfigError("give exactly one of --workdir and --hf")
    if hf.value and spec is None:
      raise config_lib.ConfigError("--hf needs the VQGAN: --vqgan_workdir, or --vqgan_weights with --vqgan_config")
    p = from_workdir(workdir.value, spec) if workdir.value else from_hf(hf.value, spec)
    prompt_imgs = read_images(images.value, p.tokenizer.image_size)
    generated = p.continue_images(prompt_imgs, new_images.value, jax.random.key(seed.value), candidates=candidates.value,
                                  temperature=temperature.value, top_k=top_k.value, top_p=top_p.value)[0]
    from PIL import Image  # pylint: disable=g-import-not-at-top
    os.makedirs(os.path.dirname(os.path.abspath(out.value)), exist_ok=True)
    Image.fromarray(grid(prompt_imgs, generated)).save(out.value)
    print(f"{len(prompt_imgs)} prompt images -> {candidates.value} x {new_images.value} generated: {out.value}")

  cli.run(main, required=["images", "out"])


if __name__ == "__main__":
  cli_main()
