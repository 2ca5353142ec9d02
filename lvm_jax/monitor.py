"""What a training job evaluates and shows while it runs: config.eval_every and config.sample_every.

By the model family's EVALUATION (models/<model_name>.py), on data the run does not train on:

  perplexity (LVM)       eval/<dataset>/<task>/perplexity: the answer image's perplexity of up to
                         eval_data.per_task held-out sentences of each (dataset, task) of every
                         store of the mixture whose dataset matches eval_data.dataset (evaluate.py);
                         samples: the last image of one held-out sentence per task generated as
                         the demo's task metrics answer (the consensus of evaluate.TASK_SAMPLING
                         samples, and greedily), as labeled grids (prompt | answer | consensus |
                         greedy) in TensorBoard.
  probe (AIM)            eval/loss: the pretraining loss on eval_data.images held-out images
                         (centre crops, fixed prefix lengths): the AIM paper's key observable.
  reconstruction (VQGAN) eval/psnr of the EMA generator on held-out pictures; samples: labeled
                         original | reconstruction grids.

Both return host scalars (or write images) and read the state the step just produced; the loop
keeps their time out of the step time and the MFU.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from lvm_jax import config as config_lib, evaluate, metrics, pictures

Eval = Callable[[Any, int], dict]
Samples = Callable[[Any, int, metrics.Writer], None]


def make(c: Any, graphdef: Any) -> tuple[Optional[Eval], Optional[Samples]]:
  """(eval, samples) for a train.py run, each None when its interval is 0 or the family has none."""
  kind = config_lib.model_module(c).EVALUATION
  eval_fn = samples_fn = None
  if c.get("eval_every", 0):
    eval_fn = {"perplexity": _lvm_eval, "probe": _aim_eval}[kind](c, graphdef)
  if c.get("sample_every", 0) and kind == "perplexity":
    samples_fn = _lvm_samples(c, graphdef)
  return eval_fn, samples_fn


def _stores(c: Any) -> list[str]:
  return sorted({spec["path"] for spec in c.data.mixture.values()})


def _lvm_eval(c: Any, graphdef: Any) -> Eval:
  def run(state: Any, step: int) -> dict:
    lvm = nnx.merge(graphdef, state["params"])
    out = {}
    for root in _stores(c):
      groups = evaluate.perplexity(lvm, root, dataset=c.eval_data.dataset, per_task=c.eval_data.per_task)
      out.update({f"eval/{name}/perplexity": g["corpus_ppl"] for name, g in groups.items()})
    if not out:
      logging.warning("step %d: no held-out sentences match eval_data.dataset=%r in %s", step,
                      c.eval_data.dataset, _stores(c))
    return out
  return run


def _held_out_prompts(c: Any, count: int) -> list[tuple[str, np.ndarray]]:
  """(dataset/task, tokens) of the first held-out sentence of up to `count` (dataset, task) groups."""
  from lvm_jax.data import store as store_lib  # pylint: disable=g-import-not-at-top
  found = []
  for root in _stores(c):
    s = store_lib.Store(root)
    for i in evaluate.first_per_group(s, c.eval_data.dataset, None, 1)[:count - len(found)]:
      row = s[int(i)]  # only the sentences shown are read
      found.append((f"{row['dataset']}/{row['task']}", np.asarray(row["tokens"], np.int32)))
  return found


def _lvm_samples(c: Any, graphdef: Any) -> Samples:
  from lvm_jax import load, prompt  # pylint: disable=g-import-not-at-top
  from lvm_jax.models import tokenize  # pylint: disable=g-import-not-at-top
  model, image_size = load.load_vqgan(c.vqgan)
  tokenizer = tokenize.Tokenizer(model, image_size, batch_size=len(jax.local_devices()))
  tpi = c.tokens_per_image
  prompts = _held_out_prompts(c, c.eval_data.get("samples", 4))

  def run(state: Any, step: int, writer: metrics.Writer) -> None:
    p = prompt.Prompter(nnx.merge(graphdef, state["params"]), tokenizer)
    for name, tokens in prompts:
      images = tokenizer.decode(tokens.reshape(-1, tpi))  # what the model read, as pictures
      # The answers the demo's task metrics score: the consensus of the samples, and the greedy one.
      drawn, consensus, greedy = (a[0] for a in evaluate.task_answers(p, tokens[None, :-tpi], jax.random.key(step)))
      cells = [(f"prompt {i + 1}", im) for i, im in enumerate(images[:-1])] + [("answer", images[-1])]
      cells += [(f"consensus of {len(drawn)}", consensus), ("greedy", greedy)]
      writer.image(f"samples/{name}", pictures.grid([cells]), step)
  return run


def _aim_eval(c: Any, graphdef: Any) -> Eval:
  from lvm_jax.data import sources  # pylint: disable=g-import-not-at-top
  m, family = c.model, config_lib.model_module(c)
  source = sources.open_source({**dict(c.eval_data.source), "size": m.image_size, "mode": "center_crop"})
  keys = source.keys()[:c.eval_data.images]
  if not keys:
    raise config_lib.ConfigError(f"eval_data.source {dict(c.eval_data.source)} has no images")
  images = np.stack([source.load(k)[0] for k in keys])
  # Fixed prefix lengths, drawn as pretraining draws them: every evaluation scores the same task.
  prefix = np.asarray(family.sample_prefix(jax.random.key(0), len(images), family.Config(**m).patches), np.int32)
  loss = jax.jit(lambda params, batch: family.loss(nnx.merge(graphdef, params), batch))

  def run(state: Any, step: int) -> dict:
    total = count = 0.0
    for s in range(0, len(images), c.global_batch):
      _, sums = loss(state["params"], {"images": jnp.asarray(images[s:s + c.global_batch]),
                                       "prefix": jnp.asarray(prefix[s:s + c.global_batch])})
      total, count = total + float(sums["loss"]), count + float(sums["targets"])
    return {"eval/loss": total / max(count, 1.0)}
  return run
