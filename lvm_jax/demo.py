"""The README's main job: python -m lvm_jax.demo --workdir W, end to end on a CPU.

  demo tokenizer (shipped) -> demo visual sentences tokenized (W/store) -> tiny LVM (W/lvm)
  -> prompting on held-out sentences (W/prompts/*.png) -> W/eval.json

The tokenizer is the VQGAN of configs/vqgan_demo.py, trained by this project's train_vqgan on the
demo's train frames, and the LVM is configs/lvm_demo.py:long, then :continued and :focused,
trained by this project's trainer on a larger store of the same tasks; both ship in
lvm_jax/assets/ (the commands that made them are in its README.md). --from_scratch trains both
instead (W/vqgan ~20 minutes, W/lvm the 1000-step recipe of configs/lvm_demo.py, ~5 minutes on 2
cores). Each stage is the real entry point's function with the configs in configs/
(vqgan_demo.py, dataset_demo.py, lvm_demo.py), so every stage resumes: rerunning skips what is
done. The summary compares the LVM with what a model that learnt nothing would do (copy the last
frame, copy the query, chance) and with the tokenizer's ceiling. The LVM's answer to a task is
the consensus of 16 samples (evaluate.TASK_SAMPLING, prompt.consensus); its greedy answer is
scored beside it. `--quick` shortens every stage and trains a tokenizer and an LVM of a few steps
(for tests: the numbers are then meaningless).
"""

import json
import os

import jax
import numpy as np
from absl import flags, logging

from lvm_jax import cli, config as config_lib, evaluate, make_dataset, pictures, prompt, train, train_vqgan
from lvm_jax.data import demo as demo_data


def configs(workdir: str, quick: bool, from_scratch: bool = False) -> tuple:
  vq = config_lib.load_file("vqgan_demo" + (":test" if quick else ""))
  data = config_lib.load_file("dataset_demo" + (":test" if quick else ""))
  data.store = os.path.join(workdir, "store")
  if quick or from_scratch:  # else dataset_demo's: the shipped weights, the architecture as data
    data.vqgan = dict(workdir=os.path.join(workdir, "vqgan"), weights="", layout="diffusers")
  lvm = config_lib.load_file("lvm_demo")
  lvm.data.mixture.main.path = data.store
  lvm.vqgan = dict(data.vqgan)
  if quick:
    lvm.steps, lvm.optim.warmup, lvm.log_every = 6, 2, 2
  return vq, data, lvm


def demo(workdir: str, quick: bool = False, count: int = 64, from_scratch: bool = False) -> dict:
  # Absolute: the LVM workdir's config.json names the store and the VQGAN, and must mean them from
  # wherever prompt / evaluate later run.
  workdir = os.path.abspath(workdir)
  vq, data, lvm = configs(workdir, quick, from_scratch)
  shipped = not (quick or from_scratch)
  lvm_dir = demo_data.LVM if shipped else os.path.join(workdir, "lvm")
  if data.vqgan.get("workdir"):
    logging.info("demo [1/5]: the demo VQGAN on the demo's train frames (%s)", data.vqgan["workdir"])
    train_vqgan.train_vqgan(vq, data.vqgan["workdir"])
  else:
    logging.info("demo [1/5]: the shipped demo VQGAN (%s; --from_scratch trains it)", demo_data.TOKENIZER)
  logging.info("demo [2/5]: demo visual sentences -> token store (%s)", data.store)
  report = make_dataset.make_dataset(data)
  logging.info("demo: %d sentences, %d tokens in %s", report["sentences"], report["tokens"], data.store)
  if shipped:
    logging.info("demo [3/5]: the shipped demo LVM (%s; --from_scratch trains one)", lvm_dir)
    p = prompt.from_hf(lvm_dir, data.vqgan)
  else:
    logging.info("demo [3/5]: tiny LVM on the store (%s)", lvm_dir)
    train.train(lvm, lvm_dir)
    p = prompt.from_workdir(lvm_dir)
  logging.info("demo [4/5]: prompting held-out sentences (%s)", os.path.join(workdir, "prompts"))
  os.makedirs(os.path.join(workdir, "prompts"), exist_ok=True)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for task in demo_data.TASKS:
    # A held-out sentence drawn as the task metrics draw theirs.
    sents = demo_data.sentences(task, "held_out", 1, p.tokenizer.image_size, seed=evaluate.TASK_DATA_SEED,
                                images=evaluate.TASK_IMAGES)
    Image.fromarray(answers_picture(p, sents[0])).save(os.path.join(workdir, "prompts", f"{task}.png"))
  logging.info("demo [5/5]: evaluation (%s)", os.path.join(workdir, "eval.json"))
  # Every held-out task's perplexity (the store holds 64 sentences of each; the cap is per task).
  result = evaluate.lvm_report(p, lvm_dir, data.store, "*_held_out", None, per_task=64, count=count)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=1)
  summary(result, workdir)
  return result


def answers_picture(p: prompt.Prompter, sentence_NHW3: np.ndarray, shown: int = 3) -> np.ndarray:
  """A labeled grid: the prompt and the true answer, then the answers the task metrics score (the
  consensus of the samples, the greedy one) and the first `shown` of the samples themselves."""
  ids_1L = p.encode(sentence_NHW3[None, :-1])
  drawn, consensus, greedy = (a[0] for a in evaluate.task_answers(p, ids_1L, jax.random.key(0)))
  first = [(f"prompt {i + 1}", img) for i, img in enumerate(sentence_NHW3[:-1])] + [("answer", sentence_NHW3[-1])]
  answers = [(f"consensus of {len(drawn)}", consensus), ("greedy", greedy)]
  return pictures.grid([first, answers + [(f"sample {i + 1}", img) for i, img in enumerate(drawn[:shown])]])


def summary(result: dict, workdir: str) -> None:
  ppl = [v["corpus_ppl"] for v in result["perplexity"].values()]
  print("\n" + evaluate.table(result))
  tasks = result.get("tasks", {})
  beaten = [t for t, m in tasks.items() if evaluate.beats_baseline(m)]
  greedy = [t for t, m in tasks.items() if evaluate.beats_baseline(m, "greedy")]
  room = [t for t, m in tasks.items() if evaluate.beats_baseline(m, "tokenizer_ceiling")]
  clearly = [t for t, m in tasks.items() if evaluate.clearly_beats(m)]
  print(f"\nthe LVM beats the no-learning baseline on {len(beaten)} of {len(tasks)} tasks ({len(clearly)} by more than "
        f"two standard errors; its greedy answers on {len(greedy)}); the tokenizer's ceiling "
        f"is above it on {len(room)}" + (f" (not beaten: {', '.join(sorted(set(tasks) - set(beaten)))})"
                                         if len(beaten) < len(tasks) else ""))
  print(f"held-out perplexity of the answer image: {np.median(ppl):.1f} (median over the {len(ppl)} tasks; "
        f"uniform over the 256 codes: 256)")
  print(f"prompt grids: {os.path.join(workdir, 'prompts')}/ (labeled: the prompt and the true answer, then the "
        f"consensus and greedy answers and 3 samples); all numbers: {os.path.join(workdir, 'eval.json')}")


def cli_main() -> None:
  workdir = flags.DEFINE_string("workdir", "workdir/demo", "Where the demo writes everything.")
  quick = flags.DEFINE_bool("quick", False, "Shorten every stage (a smoke test).")
  scratch = flags.DEFINE_bool("from_scratch", False, "Train the tokenizer and the LVM instead of using the shipped ones.")
  count = flags.DEFINE_integer("count", 64, "Held-out sentences per task for the task metrics.")
  cli.run(lambda _: demo(workdir.value, quick.value, count.value, scratch.value), required=[])


if __name__ == "__main__":
  cli_main()
