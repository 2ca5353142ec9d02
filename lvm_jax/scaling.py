"""Scaling: a ladder of LVM sizes on one token store and budget, held-out loss against parameters
and training FLOPs, with fitted power laws (the LVM paper's central figure).

  python -m lvm_jax.scaling --config scaling_demo --workdir W [--store S] [--quick]

The ladder config (configs/scaling_demo.py, configs/scaling_lvm.py) holds `train`, one training
config that every rung shares (data, budget, schedule, mesh), and `rungs`, each a name with the
model sizes and optimizer settings it changes. Rung R trains with lvm_jax.train into W/R (so it
resumes as any training run: rerunning skips finished rungs and continues the running one), then
gets its held-out loss: the mean next-token loss over all tokens of the first
train.eval_data.per_task sentences of every (dataset, task) matching train.eval_data.dataset,
under the model's own loss. Then W gets

  scaling.json  every number: each rung's sizes, parameters, tokens, training FLOPs, held-out
                loss (overall and per task); the fits; "better": "lower"
  scaling.md    the table, and the fits
  scaling.png   held-out loss against non-embedding parameters and against training FLOPs (log
                axes), each rung labeled, the fitted L = E + A * X^-alpha in the legend, and each
                rung's training-loss curve against the FLOPs spent

Parameters are counted without the token embedding and the output head (N, as Kaplan et al.):
those scale with the vocabulary, not with depth, and are a large share of small models, which
bends a power law in total parameters. scaling.json has both counts. Training FLOPs are the
model FLOPs the MFU counts (models/transformer.py: 6 x matmul parameters per token, the head
included, plus causal attention) times the steps. --quick trains each rung a few steps and
scores a few sentences (a smoke test: the numbers mean nothing).
"""

import json
import io
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from flax import nnx

from lvm_jax import cli, config as config_lib, evaluate, loop, models, progress, sharding, storage, train
from lvm_jax import workdir as workdir_lib
from lvm_jax.data import pipeline, store as store_lib
from lvm_jax.kernels import attention

RUNG_FIELDS = ("model", "optim")  # what a rung may change; the data and the budget stay shared
EMBEDDING = ("embed", "lm_head")  # top-level parameters left out of N
RESULT = "held_out.json"  # a rung's result, in its workdir: written last, so it marks the rung done
WHY_N = ("non-embedding parameters (token embedding and output head left out, as Kaplan et al.): they scale "
         "with the vocabulary, not the model, and are a large share of small models")


def rung_configs(ladder: Any) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(name, training config) of every rung: ladder.train with the rung's changes; one-line errors
  for a ladder that cannot give a fit or a rung that changes what must stay shared."""
  rungs = list(ladder.get("rungs", ()))
  config_lib.check(len(rungs) >= 3, f"rungs: {len(rungs)} given, a power law of 3 parameters needs 3 or more")
  out = []
  for i, r in enumerate(rungs):
    name = r.get("name", "")
    config_lib.check(bool(name) and "/" not in name and name not in [n for n, _ in out],
                     f"rungs[{i}].name={name!r}: every rung needs its own name (a folder of --workdir)")
    extra = set(r) - {"name", *RUNG_FIELDS}
    config_lib.check(not extra, f"rungs[{i}] ({name}) changes {sorted(extra)}: a rung may change only "
                     f"{RUNG_FIELDS}, the data and the budget are the ladder's")
    c = ml_collections.ConfigDict(ladder.train.to_dict())
    for field in RUNG_FIELDS:
      unknown = set(r.get(field, {})) - set(c[field])
      config_lib.check(not unknown, f"rungs[{i}] ({name}).{field}: unknown keys {sorted(unknown)}")
      c[field].update(r.get(field, {}))
    config_lib.check(c.model_name == "transformer", f"train.model_name={c.model_name!r}: the ladder scores "
                     "next-token loss on token stores, an LVM's ('transformer')")
    config_lib.validate(c)
    out.append((name, c))
  return out


def check_stores(c: Any) -> None:
  """One line when a store of the mixture is missing, saying how to make the demo's."""
  for name, spec in c.data.mixture.items():
    path = spec.get("path", "")
    if not path or storage.read_bytes(os.path.join(path, store_lib.MANIFEST)) is None:
      raise config_lib.ConfigError(
          f"no token store at train.data.mixture.{name}.path={path!r}: make the demo's with `python -m lvm_jax.demo` "
          "(it writes workdir/demo/store) or `python -m lvm_jax.make_dataset --config dataset_demo "
          "--config.store=workdir/demo/store`, or pass --store")


def param_counts(c: Any) -> tuple[int, int]:
  """(all parameters, non-embedding parameters N) of a rung's model, from shapes only."""
  family = config_lib.model_module(c)
  params = nnx.to_pure_dict(nnx.state(models.abstract(family, family.Config(**c.model)), nnx.Param))
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  return size(params), size({k: v for k, v in params.items() if k not in EMBEDDING})


def _held_out_rows(c: Any, root: str) -> dict[str, list[np.ndarray]]:
  """{"dataset/task": token arrays} of the held-out sentences the ladder scores, cut to whole
  images within seq_len as training cuts them."""
  s = store_lib.Store(root)
  keep = (c.seq_len // c.tokens_per_image) * c.tokens_per_image
  groups: dict[str, list[np.ndarray]] = {}
  for i in evaluate.first_per_group(s, c.eval_data.dataset, None, c.eval_data.per_task):
    d, t = s.meta[i, :2]
    groups.setdefault(f"{s.datasets[d]}/{s.tasks[t]}", []).append(np.asarray(s.read(int(i)).result()[:keep]))
  return groups


def held_out_loss(c: Any, params: Any, mesh: jax.sharding.Mesh) -> dict:
  """Mean next-token loss (nats) over every token of the held-out sentences, overall and per
  group, by the family's training loss: one sentence a row, rows sharded as training batches."""
  family = config_lib.model_module(c)
  cfg = attention.for_platform(family.inference(family.Config(**c.model)), mesh.devices.flat[0].platform)
  graphdef, _ = nnx.split(models.abstract(family, cfg))
  sums_fn = jax.jit(lambda p, b: family.loss(nnx.merge(graphdef, p), b)[1])
  rows_sharding, B = loop.batch_sharding(c, mesh), c.global_batch
  place = lambda x: jax.make_array_from_callback(x.shape, rows_sharding, lambda index: x[index])
  sums = {}  # group -> [summed nll, targets, sentences], over every store of the mixture
  with jax.set_mesh(mesh), sharding.axis_rules(c.rules):
    for root in sorted({spec["path"] for spec in c.data.mixture.values()}):
      for group, rows in sorted(_held_out_rows(c, root).items()):
        acc = sums.setdefault(group, [0.0, 0.0, 0])
        for s in range(0, len(rows), B):
          packed = [pipeline.pack_row([r], c.seq_len) for r in rows[s:s + B]]
          packed += [pipeline.layout(*(np.zeros(c.seq_len),) * 3)] * (B - len(packed))  # padding: no targets
          out = sums_fn(params, {k: place(np.stack([p[k] for p in packed])) for k in pipeline.FIELDS})
          acc[0], acc[1] = acc[0] + float(out["loss"]), acc[1] + float(out["targets"])
        acc[2] += len(rows)
  per_group = {g: {"loss": nll / max(targets, 1.0), "targets": targets, "sentences": n}
               for g, (nll, targets, n) in sums.items()}
  if not per_group:
    raise config_lib.ConfigError(f"no held-out sentences match train.eval_data.dataset={c.eval_data.dataset!r} "
                                 f"in {sorted({s['path'] for s in c.data.mixture.values()})}")
  total = sum(targets for _, targets, _ in sums.values())
  return {"loss": sum(nll for nll, _, _ in sums.values()) / max(total, 1.0), "targets": total,
          "sentences": sum(n for _, _, n in sums.values()), "per_group": per_group}


def fit_power_law(x: Any, y: Any) -> dict:
  """L = E + A * x^-alpha by least squares in L: for each floor E on a grid over [0, min L),
  log(L - E) is linear in log x (slope -alpha, a closed-form line fit); the E whose curve has the
  smallest squared error in L wins, and a finer grid around it refines it. No optimiser to start
  or diverge."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  config_lib.check(len(x) == len(y) >= 3 and np.all(x > 0) and np.all(np.isfinite(y)) and np.all(y > 0),
                   f"a power-law fit needs 3 or more points with x > 0 and finite L > 0, got x={x}, L={y}")
  lx = np.log(x)
  dx = lx - lx.mean()

  def solve(e: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(squared error, A, alpha) of the best line for each floor in `e`."""
    ly = np.log(y[None, :] - e[:, None])
    slope = (ly * dx).sum(1) / (dx * dx).sum()
    log_a = ly.mean(1) - slope * lx.mean()
    sse = np.sum((e[:, None] + np.exp(log_a[:, None] + slope[:, None] * lx) - y) ** 2, axis=1)
    return sse, np.exp(log_a), -slope

  top = float(np.min(y))
  step = top / 2000
  grid = np.arange(2000) * step  # E < min L: every log is finite
  best = float(grid[int(np.argmin(solve(grid)[0]))])
  fine = np.linspace(max(best - step, 0.0), min(best + step, top - 1e-3 * step), 401)
  sse, a, alpha = solve(fine)
  k = int(np.argmin(sse))
  e, a, alpha = float(fine[k]), float(a[k]), float(alpha[k])
  return {"E": e, "A": a, "alpha": alpha, "rmse": float(np.sqrt(sse[k] / len(y))),
          "formula": f"L = {e:.3f} + {a:.4g} * X^{-alpha:.3f}"}


def predict(fit: dict, x: Any) -> np.ndarray:
  return fit["E"] + fit["A"] * np.asarray(x, np.float64) ** -fit["alpha"]


def _read_json(path: str) -> Any:
  data = storage.retry(lambda: storage.read_bytes(path), what=f"reading {path}")
  return None if data is None else json.loads(data)


def _write(path: str, data: bytes) -> None:
  if jax.process_index() == 0:  # one writer; every process ran the same steps
    storage.retry(lambda: storage.write_bytes(path, data), what=f"writing {path}")


def _join(workdir: str, *parts: str) -> str:
  return "/".join([workdir.rstrip("/"), *parts])  # gs:// paths too


def record_ladder(workdir: str, rungs: list) -> None:
  """W/ladder.json: every rung's training config at the first start. A later start with other
  settings is an error: its rungs would sit beside finished ones of another budget or store."""
  new = {name: json.loads(c.to_json()) for name, c in rungs}
  path = _join(workdir, "ladder.json")
  old = _read_json(path)
  if old is None:
    _write(path, json.dumps(new, indent=1).encode())
    return
  diff = workdir_lib.changes(old, new)
  config_lib.check(not diff, f"{workdir} holds a ladder of other settings ({'; '.join(diff[:3])}"
                   f"{'; ...' if len(diff) > 3 else ''}): use a new --workdir, or the settings that started it")


def train_rung(name: str, c: Any, workdir: str) -> dict | None:
  """Trains one rung (resuming it if it was stopped) and scores it; its result, or None when the
  run stopped before its last step (SIGTERM: the next start resumes it)."""
  family, rung_dir = config_lib.model_module(c), _join(workdir, name)
  began = time.perf_counter()
  state = train.train(ml_collections.ConfigDict(c.to_dict()), rung_dir)  # train() fills in paths in place
  if int(jax.device_get(state["step"])) < c.steps:
    return None
  with progress.phase(f"rung {name}: held-out loss"):
    scored = held_out_loss(c, state["params"], sharding.make_mesh(c.mesh))
  total, non_embedding = param_counts(c)
  result = {"name": name, "model": {k: c.model[k] for k in ("d_model", "ffn", "layers", "heads", "vocab_size")},
            "lr": c.optim.lr, "end_lr": c.optim.end_lr, "params": total, "non_embedding_params": non_embedding,
            "steps": c.steps, "tokens": c.steps * c.global_batch * c.seq_len,
            "flops_per_step": family.flops_per_step(c), "train_flops": family.flops_per_step(c) * c.steps,
            "held_out_loss": scored["loss"], "held_out": scored,
            "seconds": time.perf_counter() - began}  # of this start: a resumed rung's last part
  _write(_join(rung_dir, RESULT), json.dumps(result, indent=1).encode())
  return result


def shorten(ladder: Any) -> None:
  """--quick: a few steps and sentences per rung, to check that everything runs."""
  t = ladder.train
  t.steps, t.optim.warmup, t.log_every, t.ckpt_every = 4, 1, 1, 4
  t.eval_data.per_task = min(t.eval_data.per_task, 2)


def _unit(total: float) -> tuple[str, float]:
  """The FLOP unit the ladder's progress counts in: totals of hundreds or more."""
  return next(((u, s) for u, s in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)) if total / s >= 100),
              ("MFLOP", 1e6))


def scaling(ladder: Any, workdir: str, quick: bool = False) -> dict | None:
  """Trains and scores every rung not yet done, then writes scaling.json / .md / .png; the
  report, or None when a rung was stopped (rerun the same command to go on)."""
  if quick:
    shorten(ladder)
  rungs = rung_configs(ladder)
  for _, c in rungs:
    with c.unlocked():
      workdir_lib.absolute_paths(c)  # ladder.json and every rung name the store from anywhere
  check_stores(rungs[0][1])
  record_ladder(workdir, rungs)
  flops = [config_lib.model_module(c).flops_per_step(c) * c.steps for _, c in rungs]
  unit, scale = _unit(sum(flops))
  results = [_read_json(_join(workdir, name, RESULT)) for name, _ in rungs]
  spent = sum(f for f, r in zip(flops, results) if r is not None)
  chrono = progress.Progress("scaling", round(sum(flops) / scale), unit=unit, start=round(spent / scale))
  for i, (name, c) in enumerate(rungs):
    what = f"rung {i + 1}/{len(rungs)} {name} ({_count(param_counts(c)[1])} non-embedding params)"
    if results[i] is not None:
      logging.info("%s: done before, held-out loss %.4f", what, results[i]["held_out_loss"])
      continue
    chrono.log(round(spent / scale), f"{what} starts")
    results[i] = train_rung(name, c, workdir)
    if results[i] is None:
      logging.info("%s stopped before its last step: rerun the same command to go on", what)
      return None
    spent += flops[i]
    chrono.log(round(spent / scale), f"{what} done, held-out loss {results[i]['held_out_loss']:.4f}")
  report = make_report(rungs[0][1], results, quick)
  write_outputs(workdir, report)
  return report


def make_report(c: Any, results: list[dict], quick: bool) -> dict:
  """scaling.json: every rung's numbers, the fits, and what each number is."""
  loss = [r["held_out_loss"] for r in results]
  return {
      "what": "held-out loss: mean next-token loss (nats per token) over all tokens of the held-out sentences, "
              "after every rung trained on the same tokens",
      "better": "lower", "quick": quick,
      "stores": sorted({spec["path"] for spec in c.data.mixture.values()}),
      "held_out": {"dataset": c.eval_data.dataset, "per_task": c.eval_data.per_task,
                   "selection": "the first per_task sentences of each (dataset, task), in store order"},
      "budget": {"steps": c.steps, "global_batch": c.global_batch, "seq_len": c.seq_len,
                 "tokens": c.steps * c.global_batch * c.seq_len},
      "params_plotted": "non_embedding_params", "why": WHY_N,
      "train_flops": "model FLOPs of training (6 x matmul parameters per token, output head included, plus causal "
                     "attention; no recompute) x steps x tokens per step, as the MFU counts them",
      "fits": {"non_embedding_params": fit_power_law([r["non_embedding_params"] for r in results], loss),
               "train_flops": fit_power_law([r["train_flops"] for r in results], loss)},
      "rungs": results,
  }


def _count(x: float) -> str:
  for factor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if x >= factor:
      return f"{x / factor:.3g}{suffix}"
  return f"{x:.3g}"


def table(report: dict) -> str:
  """scaling.md: one row per rung, then the fits."""
  b, fits, held_out = report["budget"], report["fits"], report["held_out"]
  lines = [f"# LVM scaling: held-out loss (nats/token, lower is better){' [--quick: meaningless]' * report['quick']}",
           "", f"Every rung: {b['steps']} steps of {b['global_batch']} x {b['seq_len']} tokens "
           f"({_count(b['tokens'])} tokens) on {', '.join(report['stores'])}; scored on every token of the first "
           f"{held_out['per_task']} sentences of each {held_out['dataset']} (dataset, task).", "",
           "| rung | d_model | layers | heads | ffn | peak lr | N (non-embedding) | params (all) | training FLOPs "
           "| held-out loss |", "|" + " --- |" * 10]
  for r in report["rungs"]:
    m = r["model"]
    lines.append(f"| {r['name']} | {m['d_model']} | {m['layers']} | {m['heads']} | {m['ffn']} | {r['lr']:.3g} | "
                 f"{r['non_embedding_params']:,} | {r['params']:,} | {r['train_flops']:.3g} | "
                 f"{r['held_out_loss']:.4f} |")
  lines += ["", "Fits, L = E + A * X^-alpha (least squares in L):", ""]
  for key, name in (("non_embedding_params", "N"), ("train_flops", "training FLOPs C")):
    f = fits[key]
    lines.append(f"- X = {name}: E = {f['E']:.3f}, A = {f['A']:.4g}, alpha = {f['alpha']:.3f} (rmse {f['rmse']:.4f})")
  return "\n".join(lines) + "\n"


def _curve(workdir: str, name: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, training loss) a rung logged, its metrics.jsonl rows in order."""
  data = storage.retry(lambda: storage.read_bytes(_join(workdir, name, "metrics.jsonl")), what="reading metrics")
  rows = [json.loads(line) for line in (data or b"").decode().splitlines() if line.strip()]
  rows = [r for r in rows if "loss" in r]
  return np.array([r["step"] for r in rows], np.float64), np.array([r["loss"] for r in rows], np.float64)


def write_outputs(workdir: str, report: dict) -> None:
  """scaling.json and scaling.md first: a missing matplotlib costs only the plot."""
  _write(_join(workdir, "scaling.json"), json.dumps(report, indent=1).encode())
  _write(_join(workdir, "scaling.md"), table(report).encode())
  curves = {r["name"]: _curve(workdir, r["name"]) for r in report["rungs"]}
  _write(_join(workdir, "scaling.png"), plot(report, curves))
  logging.info("wrote %s/scaling.{json,md,png}", workdir)


def _running_mean(y: np.ndarray, window: int) -> np.ndarray:
  """Mean of up to `window` rows ending at each one: batch-to-batch noise off the training curve."""
  c = np.cumsum(np.concatenate([[0.0], y]))
  n = np.minimum(np.arange(1, len(y) + 1), window)
  return (c[1:] - c[np.arange(1, len(y) + 1) - n]) / n


def plot(report: dict, curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
  """PNG: held-out loss against N and against training FLOPs, log x, rungs labeled, the fits."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only, no display
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  rungs = report["rungs"]
  colors = plt.get_cmap("viridis")(np.linspace(0.05, 0.85, len(rungs)))
  loss = np.array([r["held_out_loss"] for r in rungs])
  fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
  panels = (("non_embedding_params", "N", "non-embedding parameters N"),
            ("train_flops", "C", "training FLOPs C (model FLOPs, 6ND + attention)"))
  for ax, (key, symbol, label) in zip(axes, panels):
    x, fit = np.array([r[key] for r in rungs], np.float64), report["fits"][key]
    grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 200)
    ax.plot(grid, predict(fit, grid), "k--", lw=1.2, label=f"fit: L = {fit['E']:.3f} + {fit['A']:.3g} "
            f"$\\cdot$ {symbol}$^{{{-fit['alpha']:.3f}}}$")
    for r, xi, yi, color in zip(rungs, x, loss, colors):
      ax.scatter([xi], [yi], color=color, edgecolor="black", s=50, zorder=3)
      ax.annotate(f"{r['name']} ({_count(r['non_embedding_params'])})", (xi, yi), textcoords="offset points",
                  xytext=(6, 6), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.grid(True, which="both", alpha=0.3)
  for r, color in zip(rungs, colors):  # the whole run of each rung, on the FLOPs axis
    steps, train_loss = curves.get(r["name"], (np.zeros(0), np.zeros(0)))
    if len(steps):
      axes[1].plot(steps * r["flops_per_step"], _running_mean(train_loss, 8), color=color, alpha=0.45, lw=1)
  axes[1].plot([], [], color="gray", alpha=0.6, lw=1, label="training loss (train split, running mean of 8 logs)")
  spread = max(float(np.ptp(loss)), 0.05)
  axes[0].set_ylim(loss.min() - 0.6 * spread, loss.max() + 0.6 * spread)  # curves start far above: clip them
  axes[0].set_ylabel("held-out loss (nats/token, lower is better)")
  for ax in axes:
    ax.legend(loc="best", fontsize=9)
  b = report["budget"]
  fig.suptitle(f"LVM scaling{' (--quick: meaningless numbers)' * report['quick']}: {len(rungs)} sizes, each "
               f"{b['steps']} steps x {b['global_batch']} x {b['seq_len']} tokens ({_count(b['tokens'])}); held-out "
               f"loss over all tokens of {report['held_out']['dataset']}", fontsize=10)
  fig.tight_layout()
  out = io.BytesIO()
  fig.savefig(out, format="png", dpi=130)
  plt.close(fig)
  return out.getvalue()


def cli_main() -> None:
  config = cli.define_config()
  workdir = flags.DEFINE_string("workdir", None, "Each rung trains in WORKDIR/<rung>; scaling.{json,md,png} go here.")
  store = flags.DEFINE_string("store", None, "Token store every rung trains and is scored on (default: the "
                              "ladder's train.data.mixture.main.path).")
  quick = flags.DEFINE_bool("quick", False, "A few steps and sentences per rung: checks that everything runs; "
                            "the numbers mean nothing.")

  def main(_):
    ladder = config.value
    if store.value:
      if "main" not in ladder.train.data.get("mixture", {}):
        raise config_lib.ConfigError("--store replaces train.data.mixture.main.path, which this ladder has not")
      ladder.train.data.mixture.main.path = store.value
    report = scaling(ladder, workdir.value, quick.value)
    if report is not None:
      print("\n" + table(report))
      print(f"plot: {_join(workdir.value, 'scaling.png')}; every number: {_join(workdir.value, 'scaling.json')}")

  cli.run(main, required=["config", "workdir"])


if __name__ == "__main__":
  cli_main()
