"""The README's main job: python -m lvm_jax.demo --workdir W, end to end on a CPU.

  built-in pictures -> tiny VQGAN (W/vqgan) -> demo visual sentences tokenized (W/store)
  -> tiny LVM (W/lvm) -> prompting on held-out sentences (W/prompts/*.png) -> W/eval.json

Each stage is the real entry point's function with the configs in configs/ (vqgan_tiny.py,
dataset_demo.py, lvm_demo.py), so every stage resumes: rerunning skips what is done. The
summary compares the LVM with what a model that learnt nothing would do: held-out perplexity
against the 256 codes, next-frame PSNR against copying the last frame, counting against chance.
`--quick` shortens every stage (for tests: the numbers are then meaningless).
"""

import json
import os

import jax
import numpy as np
from absl import flags

from lvm_jax import cli, config as config_lib, evaluate, make_dataset, prompt, train, train_vqgan
from lvm_jax.data import demo as demo_data

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def configs(workdir: str, quick: bool) -> tuple:
  vq = config_lib.load_file(os.path.join(_CONFIGS, "vqgan_tiny.py") + (":test" if quick else ""))
  data = config_lib.load_file(os.path.join(_CONFIGS, "dataset_demo.py") + (":test" if quick else ""))
  data.store = os.path.join(workdir, "store")
  data.vqgan = dict(config=os.path.join(_CONFIGS, "vqgan_tiny.py"), workdir=os.path.join(workdir, "vqgan"),
                    weights="", layout="diffusers")
  lvm = config_lib.load_file(os.path.join(_CONFIGS, "lvm_demo.py"))
  lvm.data.mixture.main.path = data.store
  lvm.vqgan = dict(data.vqgan)
  if quick:
    vq.steps, vq.gan.start = 20, 10
    lvm.steps, lvm.optim.warmup, lvm.log_every = 6, 2, 2
  return vq, data, lvm


def demo(workdir: str, quick: bool = False, count: int = 16) -> dict:
  # Absolute: the LVM workdir's config.json names the store and the VQGAN, and must mean them from
  # wherever prompt / evaluate later run.
  workdir = os.path.abspath(workdir)
  vq, data, lvm = configs(workdir, quick)
  print("[1/5] tiny VQGAN on built-in pictures", flush=True)
  train_vqgan.train_vqgan(vq, os.path.join(workdir, "vqgan"))
  print("[2/5] demo visual sentences -> token store", flush=True)
  report = make_dataset.make_dataset(data, show_progress=False)
  print(f"      {report['sentences']} sentences, {report['tokens']} tokens in {data.store}", flush=True)
  print("[3/5] tiny LVM on the store", flush=True)
  train.train(lvm, os.path.join(workdir, "lvm"))
  print("[4/5] prompting held-out sentences", flush=True)
  p = prompt.from_workdir(os.path.join(workdir, "lvm"))
  os.makedirs(os.path.join(workdir, "prompts"), exist_ok=True)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for task in demo_data.TASKS:
    sents = demo_data.sentences(task, "held_out", 1, p.tokenizer.image_size, seed=1234, images=4)
    gen = p.continue_images(sents[0, :-1], 1, jax.random.key(0), candidates=3, top_k=10)[0]
    Image.fromarray(prompt.grid(sents[0], gen)).save(os.path.join(workdir, "prompts", f"{task}.png"))
  print("[5/5] evaluation", flush=True)
  result = {"perplexity": evaluate.perplexity(p.lvm, data.store, dataset="*_held_out", max_sentences=256),
            "tasks": evaluate.task_metrics(p, demo_data.TASKS, count, jax.random.key(0))}
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=1)
  summary(result, workdir)
  return result


def summary(result: dict, workdir: str) -> None:
  ppl = [v["corpus_ppl"] for v in result["perplexity"].values()]
  print(f"\nheld-out perplexity of the answer image: {np.median(ppl):.1f} (median over tasks; "
        f"uniform over the 256 codes: 256)")
  print(f"{'task':14s} {'metric':8s} {'LVM':>7s} {'baseline':>9s} {'tokenizer':>9s}  baseline")
  for task, m in result["tasks"].items():
    better = m["model"] < m["baseline"] if m["metric"] == "mse" else m["model"] > m["baseline"]
    print(f"{task:14s} {m['metric']:8s} {m['model']:7.3f} {m['baseline']:9.3f} {m['tokenizer_ceiling']:9.3f}  "
          f"{m['baseline_is']}{'  (LVM beats it)' if better else ''}")
  print("tokenizer = the VQGAN's reconstruction of the true answer: the best any generated image can do")
  print(f"\nprompt grids: {os.path.join(workdir, 'prompts')}/ (prompt and true answer | 3 sampled answers); "
        f"all numbers: {os.path.join(workdir, 'eval.json')}")


def cli_main() -> None:
  workdir = flags.DEFINE_string("workdir", "workdir/demo", "Where the demo writes everything.")
  quick = flags.DEFINE_bool("quick", False, "Shorten every stage (a smoke test).")
  cli.run(lambda _: demo(workdir.value, quick.value), required=[])


if __name__ == "__main__":
  cli_main()
