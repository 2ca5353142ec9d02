"""FLOP accounting and the metrics writer."""

import json

from lvm_jax import metrics
from lvm_jax.models import transformer
from tests.conftest import load_config


def test_train_flops_are_six_per_matmul_param_plus_causal_attention():
  c = load_config("lvm_7b")
  cfg = transformer.Config(**c.model)
  matmul_params = transformer.count_params(cfg) - cfg.vocab_size * cfg.d_model - cfg.d_model * (2 * cfg.layers + 1)
  expected = 6 * matmul_params + 6 * cfg.layers * c.seq_len * cfg.d_model
  assert metrics.train_flops_per_token(cfg, c.seq_len) == expected


def test_writer_drops_rows_past_the_resumed_step(tmp_path):
  with metrics.Writer(str(tmp_path)) as w:
    for step in (1, 2, 3):
      w.write(step, {"loss": 1.0 / step})
  with metrics.Writer(str(tmp_path), resume_step=2) as w:
    w.write(3, {"loss": 0.5})
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.5)]
