"""Does AIM's objective track its probe? The AIM paper's Figure 4 (validation loss against probe
accuracy over pretraining) at laptop scale.

  python -m lvm_jax.aim_curve --workdir /tmp/aim_curve                                 # digits (aim_tiny)
  python -m lvm_jax.aim_curve --workdir /tmp/aim_clutter --config aim_tiny:clutter     # digits in clutter
  python -m lvm_jax.aim_curve --workdir /tmp/aim_quick --quick                         # seconds: a smoke test

Trains the config's AIM (train.py; a rerun resumes, and a finished run is only measured) with a
checkpoint every --every steps, all kept. Then, for the run's initial weights (step 0: the random
trunk) and every checkpoint: the validation loss (the trainer's eval/loss: the pretraining
objective on the config's eval_data, centre crops with fixed prefix lengths) and the accuracy of
an attentive probe of the frozen trunk on held-out labeled images (the config's data.source, with
labels, to train it; its eval_data.source to test it), at a fixed budget: the same probe steps,
learning rate, seed and labels for every checkpoint, all train labels and --per_class of them.
Next to them, what raw pixels give with the same labels: a logistic regression on the pixels, and
the same attentive probe, same budget, on each patch's normalized pixels and its sin-cos position
(the trunk's own input, so the probe has the same tokens to pool as it has from the trunk).

Writes into the workdir aim_curve.json (every number, settings and provenance), aim_curve.md (a
table per checkpoint) and aim_curve.png (probe accuracy against validation loss per checkpoint,
coloured by step, with the Pearson and Spearman correlations over the trained checkpoints, and the
random trunk and pixels as reference lines). Full length on 2 CPU cores: about 10 minutes.
"""

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging
from etils import epath
from flax import nnx

from lvm_jax import (checkpoint, cli, config as config_lib, load, loop, models, monitor, probing, progress, sharding,
                     train)
from lvm_jax.models import aim, probe

QUICK = dict(steps=4, every=2, probe_steps=16, per_class=2, max_images=80, eval_images=32)
POSITION_DIM = 16  # sin-cos channels appended to each patch's pixels (a multiple of 4)


def curve_config(c: ml_collections.ConfigDict, every: int, quick: bool) -> ml_collections.ConfigDict:
  """The config trained and measured: a checkpoint every `every` steps, all of them kept."""
  c = ml_collections.ConfigDict(c.to_dict())
  if config_lib.model_module(c).EVALUATION != "probe":
    raise config_lib.ConfigError(f"model_name={c.get('model_name')!r}: aim_curve needs an AIM config")
  if quick:
    c.steps, every = QUICK["steps"], QUICK["every"]
    c.optim.warmup, c.log_every, c.eval_data.images = 1, 1, QUICK["eval_images"]
  if not 0 < every <= c.steps:
    raise config_lib.ConfigError(f"--every={every}: need a checkpoint interval in [1, steps={c.steps}]")
  c.ckpt_every, c.eval_every, c.ckpt_keep = every, every, c.steps // every + 2
  return c


def _check_workdir(c: Any, workdir: str) -> None:
  """A workdir trained on other data or another model would be measured as if it were this one."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return
  old = json.loads(path.read_text())
  for key in ("model", "data"):
    if old.get(key) != json.loads(c.to_json())[key]:
      raise config_lib.ConfigError(f"{workdir} was trained with another {key} section than this config: "
                                   "use a new --workdir for it")


def _steps(workdir: str) -> list[int]:
  with checkpoint.Checkpointer(str(epath.Path(workdir) / "checkpoints"), keep=1, every=0, create=False) as ckpt:
    return sorted(ckpt.manager.all_steps())


def _weights(c: Any, workdir: str, step: int) -> tuple[Any, dict]:
  """(inference config, params) of a checkpoint, or at step 0 the weights the run started from:
  the trainer's own fresh state (drawn from config.seed, or what config.init_from names)."""
  family = config_lib.model_module(c)
  if step:
    cfg, params, _ = load.load_params(c, workdir, step)
    return cfg, params
  mesh = sharding.make_mesh(c.mesh)  # the devices the trainer uses
  with jax.set_mesh(mesh), sharding.axis_rules(c.rules):
    params = jax.device_get(loop.fresh(c, train.build(c, mesh))["params"])
  return family.inference(family.Config(**c.model)), params


def _trunk(cfg: Any, params: dict) -> aim.Trunk:
  trunk = nnx.eval_shape(lambda: aim.Trunk(cfg, nnx.Rngs(0)))
  nnx.update(trunk, jax.tree.map(jnp.asarray, params["trunk"]))
  return trunk


def patch_pixels(images: np.ndarray, cfg: Any) -> np.ndarray:
  """float16 [N, patches, P + pos]: each patch's normalized pixels (the trunk's input) and its
  2D sin-cos position, as many channels as make the width divide among the probe's heads."""
  x = np.asarray(aim.patchify(aim.normalize(jnp.asarray(images)), cfg.patch))
  pos_dim = POSITION_DIM
  while (x.shape[-1] + pos_dim) % cfg.heads:
    pos_dim += 4
  grid = cfg.image_size // cfg.patch
  pos = np.broadcast_to(aim.sincos_2d(grid, pos_dim)[None], (len(x), grid * grid, pos_dim))
  return np.concatenate([x, pos], axis=-1).astype(np.float16)


class Probe:
  """The fixed budget: the same labels, steps, learning rate and seed for every set of features."""
  BATCH, LR, WEIGHT_DECAY = 64, 1e-3, 0.05  # probe.fit's defaults, passed explicitly as recorded

  def __init__(self, train_labels: np.ndarray, test_labels: np.ndarray, heads: int, steps: int,
               per_class: int, seed: int = 0):
    self.ytr, self.yte, self.heads, self.steps, self.seed = train_labels, test_labels, heads, steps, seed
    self.classes = int(max(train_labels.max(), test_labels.max())) + 1
    self.few, self.few_key = probing.few_per_class(train_labels, per_class, seed), f"{per_class}_per_class"

  def scores(self, train_feats: np.ndarray, test_feats: np.ndarray) -> dict[str, float]:
    """{all_labels, N_per_class}: held-out accuracy of a probe trained on all and on a few labels."""
    def fit(idx: Any, steps: int) -> float:
      p = probe.fit(train_feats[idx], self.ytr[idx], self.heads, self.classes, steps=steps, batch=self.BATCH,
                    lr=self.LR, weight_decay=self.WEIGHT_DECAY, seed=self.seed)
      return probe.accuracy(p, test_feats, self.yte)
    return {"all_labels": fit(slice(None), self.steps), self.few_key: fit(self.few, self.steps // 2)}

  def settings(self) -> dict:
    return {"steps_all_labels": self.steps, f"steps_{self.few_key}": self.steps // 2, "batch": self.BATCH,
            "lr": self.LR, "weight_decay": self.WEIGHT_DECAY, "schedule": "AdamW, cosine decay", "seed": self.seed,
            f"labels_{self.few_key}": len(self.few), "classes": self.classes}


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 0..n-1, tied values sharing their mean rank (Spearman's convention)."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x))
  ranks[order] = np.arange(len(x))
  for v in np.unique(x):
    ranks[x == v] = ranks[x == v].mean()
  return ranks


def correlation(x: Any, y: Any) -> dict:
  """Pearson's r and Spearman's rho of paired values; NaN where either side is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

  def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / denominator) if denominator > 0 else float("nan")
  return {"pearson": pearson(x, y), "spearman": pearson(_ranks(x), _ranks(y)), "n": len(x)}


def _references(p: Probe, xtr: np.ndarray, xte: np.ndarray, cfg: Any) -> dict:
  """What the pixels give with the probe's labels: logistic regressions and the attentive probe."""
  with progress.phase("pixel references: logistic regressions, attentive probes on patch pixels"):
    linear = {"all_labels": probing.linear_pixels(xtr, p.ytr, xte, p.yte),
              p.few_key: probing.linear_pixels(xtr[p.few], p.ytr[p.few], xte, p.yte)}
    patches = p.scores(patch_pixels(xtr, cfg), patch_pixels(xte, cfg))
  return {"linear_pixels": linear, "attentive_patch_pixels": patches}


def measure(c: Any, workdir: str, probe_steps: int, per_class: int, max_images: int) -> dict:
  """Validation loss and probe accuracies of step 0 and every checkpoint, and the references."""
  family, size = config_lib.model_module(c), c.model.image_size
  specs = {"train": dict(c.data.source), "test": dict(c.eval_data.source)}
  with progress.phase(f"loading up to {max_images} labeled images per split"):
    tr, te = (probing.labeled_images(dict(specs[k]), size, max_images) for k in ("train", "test"))
  cfg = family.inference(family.Config(**c.model))
  p = Probe(tr.labels, probing.align(tr, te), cfg.heads, probe_steps, per_class)  # test ids as train's
  layers = probing.default_layers(cfg.depth)
  val_loss = monitor.make(c, nnx.split(models.abstract(family, cfg))[0])[0]
  steps = [0] + [s for s in _steps(workdir) if s > 0]
  count, rows = progress.Progress("aim curve", len(steps), unit="checkpoint"), []
  for done, step in enumerate(steps):
    cfg, params = _weights(c, workdir, step)
    loss = val_loss({"params": jax.tree.map(jnp.asarray, params)}, step)["eval/loss"]
    trunk = _trunk(cfg, params)
    rows.append({"step": step, "val_loss": loss,
                 **p.scores(probing.features(trunk, tr.images, layers), probing.features(trunk, te.images, layers))})
    count.log(done + 1, ", ".join(f"{k} {v:.4g}" for k, v in rows[-1].items()))
  trained = rows[1:]
  return {"rows": rows, "references": _references(p, tr.images, te.images, cfg),
          "correlation": {k: correlation([r["val_loss"] for r in trained], [r[k] for r in trained])
                          for k in ("all_labels", p.few_key)},
          "chance": float(np.max(np.bincount(p.yte)) / len(p.yte)),
          "probe": {**p.settings(), "layers": list(layers), "train": specs["train"], "test": specs["test"],
                    "train_images": len(tr.labels), "test_images": len(te.labels),
                    "skipped_inputs": tr.skipped + te.skipped, "features": "mean of the layers' outputs, "
                    "bidirectional attention", "patch_pixels": "each patch's normalized pixels and "
                    f"at least {POSITION_DIM} sin-cos position channels"},
          "validation": {"source": specs["test"], "images": c.eval_data.images,
                         "loss": "the pretraining loss, centre crops, fixed prefix lengths (monitor.py)"}}


def _interval(accuracy: Any, n: int) -> Any:
  """Half-width of the normal 95% interval of an accuracy measured on n test images."""
  return 1.96 * np.sqrt(np.asarray(accuracy) * (1 - np.asarray(accuracy)) / n)


def table(report: dict) -> str:
  """aim_curve.md: a row per checkpoint, then the references and the correlations."""
  keys = [k for k in report["rows"][0] if k not in ("step", "val_loss")]
  p = report["probe"]
  lines = [f"# AIM: validation loss against probe accuracy ({report['config']})", "",
           f"Task: train {json.dumps(p['train'])}, test {json.dumps(p['test'])}; attentive probe, "
           f"{p['steps_all_labels']} steps on all {p['train_images']} labels, "
           f"{p[f'steps_{keys[1]}']} on {p[f'labels_{keys[1]}']}; {p['test_images']} test images.", "",
           "| step | val loss | " + " | ".join(f"probe acc ({k.replace('_', ' ')})" for k in keys) + " |",
           "|---:|---:|" + "---:|" * len(keys)]
  for r in report["rows"]:
    name = f"{r['step']} (random trunk)" if r["step"] == 0 else str(r["step"])
    lines.append(f"| {name} | {r['val_loss']:.4f} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
  for name, ref in report["references"].items():
    lines.append(f"| {name.replace('_', ' ')} | | " + " | ".join(f"{ref[k]:.4f}" for k in keys) + " |")
  lines.append("| chance | | " + " | ".join(f"{report['chance']:.4f}" for _ in keys) + " |")
  lines.append("")
  middle = float(np.median([r[keys[0]] for r in report["rows"]]))
  lines.append(f"- Sampling noise: with {p['test_images']} test images an accuracy near {middle:.2f} is known to "
               f"+-{_interval(middle, p['test_images']):.3f} (95%, binomial).")
  for k, v in report["correlation"].items():
    lines.append(f"- {k.replace('_', ' ')}: Pearson r = {v['pearson']:+.3f}, Spearman rho = {v['spearman']:+.3f} "
                 f"over the {v['n']} trained checkpoints (val loss vs probe accuracy; negative: lower loss, "
                 "better probe)")
  return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
  """aim_curve.png: a panel per label budget, probe accuracy against validation loss."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows, keys = report["rows"], list(report["correlation"])
  trained, random = rows[1:], rows[0]
  fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 5.2), constrained_layout=True, squeeze=False)
  for ax, key in zip(axes[0], keys):
    x, y = [r["val_loss"] for r in trained], [r[key] for r in trained]
    ax.errorbar(x, y, yerr=_interval(y, report["probe"]["test_images"]), color="0.75", lw=1, capsize=2,
                zorder=1)  # in step order, with each accuracy's 95% interval
    points = ax.scatter(x, y, c=[r["step"] for r in trained], cmap="viridis", s=36, zorder=2)
    for r in trained:
      ax.annotate(str(r["step"]), (r["val_loss"], r[key]), xytext=(4, 4), textcoords="offset points", fontsize=7)
    refs = report["references"]
    ax.axhline(random[key], ls="--", color="tab:red",
               label=f"random trunk (step 0, val loss {random['val_loss']:.3f}): {random[key]:.3f}")
    ax.axhline(refs["attentive_patch_pixels"][key], ls="-.", color="tab:orange",
               label=f"attentive probe on patch pixels: {refs['attentive_patch_pixels'][key]:.3f}")
    ax.axhline(refs["linear_pixels"][key], ls=":", color="tab:blue",
               label=f"logistic regression on pixels: {refs['linear_pixels'][key]:.3f}")
    ax.axhline(report["chance"], color="0.6", lw=0.8, label=f"chance (the commonest class): {report['chance']:.3f}")
    cor = report["correlation"][key]
    ax.set_title(f"{key.replace('_', ' ')}: Pearson r = {cor['pearson']:+.2f}, "
                 f"Spearman \u03c1 = {cor['spearman']:+.2f} ({cor['n']} checkpoints)", fontsize=10)
    ax.set_xlabel("validation loss (pretraining objective, held-out images)")
    ax.set_ylabel("attentive-probe accuracy (held-out images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # below: never on a point
  fig.colorbar(points, ax=axes[0].tolist(), label="training step")
  p = report["probe"]
  fig.suptitle(f"AIM {report['config']}: validation loss against attentive-probe accuracy over pretraining "
               f"({p['train_images']} train, {p['test_images']} held-out labeled images)", fontsize=11)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(c: Any, workdir: str, every: int, quick: bool = False, probe_steps: int = 1000, per_class: int = 10,
        max_images: int = 10_000, name: str = "") -> dict:
  """Trains (or resumes) with all checkpoints kept, measures them, writes aim_curve.{json,md,png}."""
  c = curve_config(c, every, quick)
  if quick:
    probe_steps, per_class, max_images = QUICK["probe_steps"], QUICK["per_class"], QUICK["max_images"]
  _check_workdir(c, workdir)
  start = time.perf_counter()
  train.train(c, workdir)
  trained = time.perf_counter()
  report = {"config": name or "the given config", "quick": quick, "workdir": os.path.abspath(workdir),
            "train_steps": c.steps, "every": c.ckpt_every, "seed": c.seed,
            "random_trunk": "step 0: the run's initial weights, drawn from jax.random.key(config.seed)",
            **measure(c, workdir, probe_steps, per_class, max_images)}
  report["seconds"] = {"train": trained - start, "measure": time.perf_counter() - trained}
  root = epath.Path(workdir)
  (root / "aim_curve.json").write_text(json.dumps(report, indent=1))
  (root / "aim_curve.md").write_text(table(report))
  plot(report, str(root / "aim_curve.png"))
  logging.info("wrote %s/aim_curve.{json,md,png}", report["workdir"])
  return report


def cli_main() -> None:
  config = cli.define_config()  # default: aim_tiny
  workdir = flags.DEFINE_string("workdir", None, "Training workdir; aim_curve.{json,md,png} are written into it.")
  every = flags.DEFINE_integer("every", 25, "Steps between checkpoints, each measured.")
  quick = flags.DEFINE_bool("quick", False, f"A smoke test in seconds: {QUICK}.")
  probe_steps = flags.DEFINE_integer("probe_steps", 1000, "Probe steps with all labels (half with --per_class).")
  per_class = flags.DEFINE_integer("per_class", 10, "Labels per class of the few-label probe.")
  max_images = flags.DEFINE_integer("max_images", 10_000, "Labeled images per split, at most.")

  def main(_):
    name = flags.FLAGS["config"].config_filename if config.value is not None else "aim_tiny"
    c = config.value if config.value is not None else config_lib.load_file("aim_tiny")
    report = run(c, workdir.value, every.value, quick.value, probe_steps.value, per_class.value,
                 max_images.value, name=os.path.basename(name).replace(".py", ""))
    print(table(report))

  cli.run(main, required=["workdir"])


if __name__ == "__main__":
  cli_main()
