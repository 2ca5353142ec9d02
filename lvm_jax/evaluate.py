"""Evaluation: perplexity of target images per dataset and task, and task metrics by prompting.

  python -m lvm_jax.evaluate --workdir /tmp/lvm_demo/lvm --store /tmp/lvm_demo/store \\
      --dataset '*_held_out' --out /tmp/lvm_demo/eval.json [--demo_tasks]

Perplexity: for every sentence, the model reads the whole sentence once and the loss is taken
on the last image's tokens only (the answer given the prompt). Reported per (dataset, task) as
the corpus-level perplexity exp(sum NLL / sum tokens) and the per-example mean of each
sentence's perplexity: the release's eval averaged per batch, which weights examples unevenly.
Each (dataset, task) group is read up to --per_task sentences (the first ones in store order), so
every group is reported, on the same sentences every run.

Task metrics (--demo_tasks, on the built-in demo data's held-out split): the last image of each
sentence is generated from the ones before it and compared with the truth, next to a baseline
a model must beat: next-frame PSNR against copying the last prompt frame; in-context pairs and
inpainting PSNR, colorization MSE against copying the query image; segmentation mIoU of the
palette classes against the query's own colours; counting accuracy of a digit classifier
(logistic regression on held-out digits) against chance (0.1). Each also reports the score of
the VQGAN's own reconstruction of the true answer: the ceiling the tokenizer leaves.

What a workdir gets is its model family's EVALUATION (models/<model_name>.py): an LVM workdir the
above; a VQGAN workdir the tokenizer report of its EMA generator on held-out pictures (PSNR, SSIM,
codebook usage; lvm_jax/tokenizer_report.py, which takes any VQGAN and images); an AIM workdir, or an
ml-aim v1 safetensors file with the config of its size, attentive probes of its frozen trunk
(lvm_jax/probing.py):

  python -m lvm_jax.evaluate --workdir /tmp/aim_tiny [--probe_train JSON --probe_test JSON]
  python -m lvm_jax.evaluate --ml_aim model.safetensors --aim_config configs/aim_600m.py [...]

The console gets a table; --out gets the JSON: every number, whether higher or lower is better,
and where it comes from (an LVM's: workdir, checkpoint step, store, selection, sampling settings).
"""

import json
import os
import types
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx

from lvm_jax import cli, config as config_lib, progress, prompt
from lvm_jax.data import demo, store as store_lib
from lvm_jax.models import transformer

VIDEO = ("moving_crop", "rotating_crop", "zooming_crop", "moving_digit")
PAIRS = ("edges", "flip", "invert", "inpainting")
TASK_DATA_SEED = 1234  # the held-out demo sentences of the task metrics: the same ones for every model
TASK_IMAGES = 4  # images per sentence, as in the demo store
# A task's answer: the consensus (prompt.consensus: minimum Bayes risk under pixel MSE) of this many
# samples from the model's own distribution; the greedy answer is scored beside it.
TASK_SAMPLING = {"temperature": 1.0, "samples": 16}


def _answer_nll(graphdef, params, tokens_BL: jax.Array, answer: int) -> jax.Array:
  """Summed NLL of each row's last `answer` tokens."""
  logits = nnx.merge(graphdef, params)(tokens_BL)[:, :-1].astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens_BL[:, 1:, None], -1)[..., 0]
  return jnp.sum(nll[:, -answer:], axis=-1)


def first_per_group(store: store_lib.Store, dataset: Optional[str], task: Optional[str], per_task: int) -> np.ndarray:
  """Store indices of the first `per_task` sentences (in store order) of every selected (dataset,
  task) group: a cap per group, so that no group is crowded out by those stored before it, and the
  same sentences every run."""
  idx = store.indices(dataset, task)
  groups = store.meta[idx, :2]
  keep = [idx[np.all(groups == g, axis=1)][:per_task] for g in np.unique(groups, axis=0)]
  return np.sort(np.concatenate(keep)) if keep else idx


def perplexity(lvm: transformer.Model, root: str, dataset: Optional[str] = None, task: Optional[str] = None,
               per_task: int = 64, batch: int = 8) -> dict:
  """{"dataset/task": {corpus_ppl, mean_ppl, sentences, tokens, better}} over the last image of up
  to `per_task` sentences of every (dataset, task) group that matches the patterns."""
  if per_task < 1:
    raise config_lib.ConfigError(f"per_task={per_task}: evaluate at least one sentence per (dataset, task)")
  store = store_lib.Store(root)
  tpi = store.manifest.tokens_per_image
  if store.manifest.vocab > lvm.cfg.vocab_size:  # ids past the head would read as NaN perplexity
    raise config_lib.ConfigError(f"{root} holds token ids up to {store.manifest.vocab - 1}, outside the model's "
                                 f"vocabulary of {lvm.cfg.vocab_size}: a store of another tokenizer?")
  graphdef, params = nnx.split(lvm)
  nll_fn = jax.jit(_answer_nll, static_argnums=(0, 3))
  groups: dict[str, list[float]] = {}
  by_length: dict[int, list[int]] = {}
  for i in first_per_group(store, dataset, task, per_task):
    by_length.setdefault(int(store.lengths[i]), []).append(int(i))
  total, done = sum(len(idx) for idx in by_length.values()), 0
  count = progress.Progress("perplexity", total, unit="sentence")
  for length, idx in by_length.items():  # equal lengths batch without padding
    for s in range(0, len(idx), batch):
      rows = [store[i] for i in idx[s:s + batch]]
      tokens = np.stack([r["tokens"].astype(np.int32) for r in rows])
      nll = np.asarray(nll_fn(graphdef, params, jnp.asarray(tokens), tpi))
      for r, v in zip(rows, nll):
        groups.setdefault(f"{r['dataset']}/{r['task']}", []).append(float(v))
      done += len(rows)
      if done * 10 // total > (done - len(rows)) * 10 // total:  # about every tenth
        count.log(done)
  return {k: {"corpus_ppl": float(np.exp(np.sum(v) / (len(v) * tpi))),
              "mean_ppl": float(np.mean(np.exp(np.array(v) / tpi))),
              "sentences": len(v), "tokens": len(v) * tpi, "better": "lower"} for k, v in sorted(groups.items())}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = np.mean(np.square(a.astype(np.float64) - b.astype(np.float64)))
  return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def hole(query_HW3: np.ndarray) -> np.ndarray:
  """bool [H, W]: the pixels an inpainting query masks (set to 0 in every channel, as the release)."""
  return np.all(query_HW3 == 0, axis=-1)


def filled(query_NHW3: np.ndarray) -> np.ndarray:
  """Inpainting's no-learning answer: each query with its hole painted the mean colour of the rest."""
  out = query_NHW3.copy()
  for q in out:
    h = hole(q)
    if h.any() and not h.all():
      q[h] = np.round(q[~h].mean(0)).astype(np.uint8)
  return out


def digit_classifier(size: int) -> Any:
  """Logistic regression on the demo's held-out digit images (never in the LVM's training data)."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  x, y = demo.digit_images("held_out", size)
  return LogisticRegression(max_iter=2000).fit(x.reshape(len(x), -1) / 255.0, y)


def _miou(pred: np.ndarray, truth: np.ndarray) -> float:
  """Mean IoU of palette classes (each pixel -> the nearest palette colour)."""
  cls = lambda im: np.argmin(((im[..., None, :].astype(np.int32) - demo.PALETTE[None, None]) ** 2).sum(-1), -1)
  p, t = cls(pred), cls(truth)
  ious = [np.mean((p == c) & (t == c)) / np.mean((p == c) | (t == c)) for c in np.unique(t)]
  return float(np.mean(ious))


def _scoring(task: str, query_NHW3: np.ndarray) -> tuple[str, Callable, np.ndarray, str]:
  """(metric name, score(answer, truth, query), the no-learning answers, what they are) of a
  generating task; a model must beat the no-learning answers."""
  if task == "inpainting":  # only the hole is the task: the rest of the answer is in the query
    def score(a: np.ndarray, t: np.ndarray, q: np.ndarray) -> float:
      h = hole(q)
      return psnr(a[h], t[h]) if h.any() else np.nan  # nothing masked: no score
    return "hole_psnr", score, filled(query_NHW3), "the hole filled with the query's mean colour"
  if task in VIDEO or task in PAIRS:  # pairs: [.., x, y]; the query x is the image before the answer
    return "psnr", lambda a, t, q: psnr(a, t), query_NHW3, "copy the last frame" if task in VIDEO else "copy the query"
  if task == "colorization":
    return "mse", lambda a, t, q: float(np.mean(np.square(a / 255.0 - t / 255.0))), query_NHW3, "the gray query"
  if task == "segmentation":
    return "miou", lambda a, t, q: _miou(a, t), query_NHW3, "the query's colours"
  raise ValueError(f"no scoring for demo task {task!r}")


def task_answers(prompter: Any, ids_BL: np.ndarray, key: jax.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Prompts as code ids [B, L] (prompter.encode) -> (the TASK_SAMPLING samples [B, C, S, S, 3], their
  consensus [B, S, S, 3]: the answer a task scores, the greedy answer [B, S, S, 3])."""
  drawn_BC = prompter.continue_ids(ids_BL, 1, key, temperature=TASK_SAMPLING["temperature"],
                                   candidates=TASK_SAMPLING["samples"])[:, :, 0]
  greedy_B = prompter.continue_ids(ids_BL, 1, key, temperature=0.0)[:, 0, 0]
  return drawn_BC, prompt.consensus(drawn_BC), greedy_B


def task_metrics(prompter: Any, tasks: tuple[str, ...], count: int, key: jax.Array, images: int = 4) -> dict:
  """Generate the last image of `count` held-out demo sentences per task; metric vs baseline."""
  out, tracker = {}, progress.Progress("demo tasks", len(tasks), unit="task")
  for done, task in enumerate(tasks):
    tracker.log(done, f"now {task}")
    sents = demo.sentences(task, "held_out", count, prompter.tokenizer.image_size, seed=TASK_DATA_SEED, images=images)
    key, sub = jax.random.split(key)
    _, gen, greedy = task_answers(prompter, prompter.encode(sents[:, :-1]), sub)
    truth, query = sents[:, -1], sents[:, -2]
    # What the tokenizer alone keeps of the truth: no generated image can score better.
    recon = prompter.tokenizer.decode(prompter.tokenizer.encode(truth))
    if task == "counting":  # does the classifier read the digit of the true next image in the generated one?
      clf = digit_classifier(gen.shape[1])
      classify = lambda x: clf.predict(x.reshape(len(x), -1) / 255.0)
      digits = classify(truth)
      right = lambda x: (classify(x) == digits).astype(np.float64)
      model, chance = right(gen), np.full(len(gen), 0.1)
      out[task] = {"metric": "accuracy", "better": "higher", "model": float(np.mean(model)),
                   "greedy": float(np.mean(right(greedy))), "baseline": 0.1, "baseline_is": "chance",
                   "tokenizer_ceiling": float(np.mean(right(recon))), **margin(model, chance, "higher")}
      continue
    name, score, base, base_is = _scoring(task, query)
    per = lambda xs: np.array([score(a, t, q) for a, t, q in zip(xs, truth, query)], np.float64)
    better, model, baseline = "lower" if name == "mse" else "higher", per(gen), per(base)
    out[task] = {"metric": name, "better": better, "model": float(np.nanmean(model)),
                 "greedy": float(np.nanmean(per(greedy))), "baseline": float(np.nanmean(baseline)),
                 "baseline_is": base_is, "tokenizer_ceiling": float(np.nanmean(per(recon))),
                 **margin(model, baseline, better)}
  return out


def margin(model_N: np.ndarray, baseline_N: np.ndarray, better: str) -> dict:
  """How far the model's per-sentence scores beat the baseline's on the same sentences (positive:
  better), and the standard error of that mean paired difference: a win by less than about two
  standard errors could be the draw of sentences and samples."""
  d = (model_N - baseline_N) * (1.0 if better == "higher" else -1.0)
  d = d[~np.isnan(d)]
  se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
  return {"margin": float(np.mean(d)) if len(d) else float("nan"), "margin_se": se}


def clearly_beats(m: dict) -> bool:
  """Whether the model beats the baseline by more than two standard errors of the paired difference
  (False for a report written before margins were)."""
  return "margin" in m and m["margin"] > 2 * m["margin_se"]


def lvm_report(p: Any, workdir: str, root: str, dataset: Optional[str], task: Optional[str], per_task: int,
               count: int = 0, seed: int = 0) -> dict:
  """An LVM's eval.json: where its numbers come from (workdir, checkpoint step, store, selection),
  the answer perplexity per (dataset, task), and with count > 0 the demo tasks' metrics for
  `count` held-out sentences each, next to the settings that generated them."""
  where = lambda path: path if "://" in path else os.path.abspath(path)
  report = {"workdir": where(workdir), "step": p.step, "store": where(root),
            "perplexity_settings": {"dataset": dataset, "task": task, "per_task": per_task,
                                    "selection": "the first per_task of each (dataset, task), in store order"},
            "perplexity": perplexity(p.lvm, root, dataset, task, per_task)}
  if count:
    report["task_settings"] = {"split": "held_out", "count": count, "images": TASK_IMAGES,
                               "data_seed": TASK_DATA_SEED, "sampling_seed": seed, **TASK_SAMPLING}
    report["tasks"] = task_metrics(p, demo.TASKS, count, jax.random.key(seed), TASK_IMAGES)
  return report


def _source_flag(text: Optional[str], default: dict) -> dict:
  if not text:
    return default
  try:
    spec = json.loads(text)
  except json.JSONDecodeError as e:
    raise config_lib.ConfigError(f"probe source {text!r}: not JSON ({e})") from None
  if not isinstance(spec, dict):
    raise config_lib.ConfigError(f"probe source {text!r}: expected a JSON object with a 'kind'")
  return spec


def reconstructor(graphdef: Any) -> Any:
  """jit(weights, images in [0, 1]) -> the VQGAN's reconstructions, for a generator graph."""
  return jax.jit(lambda weights, x: (lambda m: m.decode(m.encode(x)))(nnx.merge(graphdef, weights)))


def reconstruction(reconstruct: Any, weights: Any, images: np.ndarray) -> tuple[float, np.ndarray]:
  """PSNR (dB, the mean over images, as the tokenizer report has it) of a VQGAN's reconstructions
  of uint8 images, and the reconstructions (floats in [0, 1])."""
  from lvm_jax import tokenizer_report  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(images, jnp.float32) / 255.0
  recon = np.asarray(reconstruct(weights, x))
  return float(jnp.mean(tokenizer_report.psnr(x, recon))), recon


def _aim_trunk(c: Any, workdir: Optional[str], ml_aim: Optional[str]) -> Any:
  """The AIM trunk of a training workdir, or of an ml-aim v1 safetensors file."""
  from lvm_jax import convert, load  # pylint: disable=g-import-not-at-top
  from lvm_jax.convert import aim_torch  # pylint: disable=g-import-not-at-top
  family = config_lib.model_module(c)
  if not ml_aim:
    cfg, params, _ = load.load_params(c, workdir)
    trunk, weights = nnx.eval_shape(lambda: family.Trunk(cfg, nnx.Rngs(0))), params["trunk"]
  else:
    trunk = nnx.eval_shape(lambda: family.Trunk(family.inference(family.Config(**c.model)), nnx.Rngs(0)))
    try:
      weights, _ = aim_torch.from_ml_aim(convert.load_float32(ml_aim))
    except Exception as e:  # pylint: disable=broad-except  # missing, not safetensors, not ml-aim v1
      raise config_lib.ConfigError(f"--ml_aim {ml_aim}: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from None
    shapes = jax.tree.map(np.shape, nnx.to_pure_dict(nnx.state(trunk, nnx.Param)))
    if shapes != jax.tree.map(np.shape, weights):
      raise config_lib.ConfigError(f"--ml_aim {ml_aim}: its trunk does not have the shapes of the given --aim_config")
  nnx.update(trunk, jax.tree.map(jnp.asarray, weights))
  return trunk


def _probe_report(c: Any, o: Any) -> dict:
  """Attentive probes of a frozen AIM trunk (lvm_jax/probing.py)."""
  from lvm_jax import probing  # pylint: disable=g-import-not-at-top
  trunk = _aim_trunk(c, o.workdir, o.ml_aim)
  depth = trunk.cfg.depth
  try:
    layers = tuple(int(i) for i in o.probe_layers) if o.probe_layers else tuple(range(max(0, depth - 6), depth))
  except ValueError:
    raise config_lib.ConfigError(f"--probe_layers={','.join(o.probe_layers)}: expected block numbers") from None
  splits = [_source_flag(text, default) for text, default in zip((o.probe_train, o.probe_test), probing.DIGITS)]
  report = probing.run(trunk, layers, *splits, steps=o.probe_steps, max_images=o.probe_max_images)
  return {"probe": {**report, "better": "higher"}}  # its scores are accuracies


def _perplexity_report(c: Any, o: Any) -> dict:
  """Answer perplexity on a token store, and (--demo_tasks) the demo's tasks by prompting."""
  from lvm_jax import load, prompt  # pylint: disable=g-import-not-at-top
  # The training command's relative store path means the same from any directory.
  root = o.store or load.resolve(c.data.mixture.main.path, o.workdir, "data.mixture.main.path",
                                 f" in {o.workdir}/config.json")
  with progress.phase(f"loading the LVM of {o.workdir} and its VQGAN"):
    p = prompt.from_workdir(o.workdir, o.vqgan_spec())
  return lvm_report(p, o.workdir, root, o.dataset, o.task, o.per_task, o.count if o.demo_tasks else 0)


def _reconstruction_report(c: Any, o: Any) -> dict:
  """A VQGAN workdir's EMA generator on the held-out images its training evaluates on: the
  tokenizer report (PSNR, SSIM, LPIPS when the training's weights file is there, codebook usage)."""
  from lvm_jax import tokenizer_report  # pylint: disable=g-import-not-at-top
  return {"reconstruction": tokenizer_report.workdir_report(c, o.workdir)}


REPORTS = {"perplexity": _perplexity_report, "probe": _probe_report, "reconstruction": _reconstruction_report}


def _perplexity_table(report: dict) -> list[str]:
  lines = [f"answer-image perplexity (lower is better) of step {report['step']} of {report['workdir']} on "
           f"{report['store']}, at most {report['perplexity_settings']['per_task']} sentences per group",
           f"{'dataset/task':40s} {'corpus ppl':>10s} {'mean ppl':>9s} {'sentences':>9s}"]
  lines += [f"{k:40s} {v['corpus_ppl']:10.2f} {v['mean_ppl']:9.2f} {v['sentences']:9d}"
            for k, v in report["perplexity"].items()]
  return lines


def beats_baseline(m: dict, who: str = "model") -> bool:
  """Whether a task metric's `who` ("model", "greedy" or "tokenizer_ceiling") is better than its baseline."""
  return m[who] > m["baseline"] if m["better"] == "higher" else m[who] < m["baseline"]


def _task_table(report: dict) -> list[str]:
  s = report["task_settings"]
  lines = [f"demo tasks: {s['count']} {s['split']} sentences each; model = the consensus of {s['samples']} samples "
           f"(temperature {s['temperature']}), greedy = the argmax answer; ceiling = the VQGAN's reconstruction of "
           "the answer; margin = how much better than the baseline the model is, +- the standard error of the "
           "paired difference",
           f"{'task':14s} {'metric':8s} {'better':6s} {'model':>8s} {'greedy':>8s} {'baseline':>8s} {'ceiling':>8s} "
           f"{'margin':>16s}  baseline is"]
  for task, m in report["tasks"].items():
    beats = " (beaten" + (", clearly)" if clearly_beats(m) else ")") if beats_baseline(m) else ""
    spread = f"{m['margin']:+.3f} +- {m['margin_se']:.3f}" if "margin" in m else "-"
    lines.append(f"{task:14s} {m['metric']:8s} {m['better']:6s} {m['model']:8.3f} {m['greedy']:8.3f} "
                 f"{m['baseline']:8.3f} {m['tokenizer_ceiling']:8.3f} {spread:>16s}  {m['baseline_is']}{beats}")
  return lines


def _scalars(prefix: str, section: dict) -> list[str]:
  lines = []
  for k, v in section.items():
    if isinstance(v, dict):
      lines += _scalars(f"{prefix}{k}.", v)
    else:
      lines.append(f"{prefix}{k}: {v:.4g}" if isinstance(v, float) else f"{prefix}{k}: {v}")
  return lines


def table(report: dict) -> str:
  """The console's summary of a report (the JSON holds everything): a line per perplexity group and
  per task; the numbers of a probe report as name: value; a reconstruction report as its own table."""
  lines = _perplexity_table(report) if "perplexity" in report else []
  lines += ([""] + _task_table(report)) if "tasks" in report else []
  lines += _scalars("probe ", report.get("probe", {}))
  if "reconstruction" in report:
    from lvm_jax import tokenizer_report  # pylint: disable=g-import-not-at-top
    lines += tokenizer_report.table(report["reconstruction"]).splitlines()
  return "\n".join(lines)


def cli_main() -> None:
  workdir = flags.DEFINE_string("workdir", None, "Training workdir (LVM, AIM or VQGAN).")
  flags.DEFINE_string("store", None, "Token store for perplexity (default: the config's main mixture path).")
  flags.DEFINE_string("dataset", None, "Dataset name pattern, e.g. '*_held_out'.")
  flags.DEFINE_string("task", None, "Task name pattern.")
  flags.DEFINE_integer("per_task", 64, "Perplexity: sentences per (dataset, task), the first ones in store order.")
  flags.DEFINE_bool("demo_tasks", False, "Also prompt the demo's held-out tasks.")
  flags.DEFINE_list("probe_layers", None, "AIM: blocks whose outputs the probe averages (default: the last "
                    "min(6, depth)).")
  flags.DEFINE_integer("probe_steps", 2000, "AIM: probe training steps (batch 64).")
  flags.DEFINE_string("probe_train", None, "AIM: labeled source to train the probe on, as JSON, e.g. "
                      "'{\"kind\": \"image_folder\", \"root\": \"/data/train\", \"labels_from_dirs\": true}' "
                      "(default: the demo's digits, train split).")
  flags.DEFINE_string("probe_test", None, "AIM: labeled source to test on (default: the held-out digits).")
  flags.DEFINE_integer("probe_max_images", 10_000, "AIM: images per split, at most.")
  ml_aim = flags.DEFINE_string("ml_aim", None, "Instead of --workdir: an ml-aim v1 safetensors file (e.g. "
                               "apple/aim-600M's model.safetensors) whose trunk is probed; needs --aim_config.")
  aim_config = flags.DEFINE_string("aim_config", None, "With --ml_aim: the config of its size, e.g. "
                                   "configs/aim_600m.py.")
  flags.DEFINE_integer("count", 32, "Held-out sentences per demo task.")
  out = flags.DEFINE_string("out", None, "JSON output path: every number, with its settings and provenance (the "
                            "console shows a table).")
  vqgan_spec = prompt.define_vqgan_flags()  # LVM: another VQGAN than the workdir's, named by the user

  def main(_):
    if bool(workdir.value) == bool(ml_aim.value) or bool(ml_aim.value) != bool(aim_config.value):
      raise config_lib.ConfigError("give --workdir (LVM, AIM or VQGAN), or --ml_aim with --aim_config")
    c = config_lib.load_file(aim_config.value) if ml_aim.value else config_lib.load_from_workdir(workdir.value)
    evaluation = config_lib.model_module(c).EVALUATION
    if ml_aim.value and evaluation != "probe":
      raise config_lib.ConfigError(f"--aim_config {aim_config.value}: not an AIM config "
                                   f"(model_name={c.get('model_name')!r})")
    if evaluation not in REPORTS:
      raise config_lib.ConfigError(f"model_name={c.get('model_name')!r} has no evaluation here")
    options = types.SimpleNamespace(**{name: flags.FLAGS[name].value for name in flags.FLAGS},
                                    vqgan_spec=vqgan_spec)
    report = REPORTS[evaluation](c, options)
    if out.value:
      with open(out.value, "w") as f:
        json.dump(report, f, indent=1)
      logging.info("wrote %s", out.value)
    print(table(report))

  cli.run(main, required=[])


if __name__ == "__main__":
  cli_main()
