"""AIM export: a PyTorch transcription of ml-aim v1's trunk (and attentive head), written here,
loads the exported state dict and gives the same features and logits (fp32, 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvm_jax.convert import aim_torch
from lvm_jax.models import aim, probe

torch = pytest.importorskip("torch")
nn = torch.nn

CFG = aim.Config(width=64, depth=2, heads=4, patch=4, image_size=16, head_width=32, head_depth=1, head_mlp=64)


class Block(nn.Module):
  def __init__(self, d: int, heads: int):
    super().__init__()
    self.heads = heads
    self.norm_1, self.norm_2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
    self.attn = nn.Module()
    self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
    self.mlp = nn.Module()
    self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

  def forward(self, x):
    B, N, C = x.shape
    qkv = self.attn.qkv(self.norm_1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
    out = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    x = x + self.attn.proj(out.transpose(1, 2).reshape(B, N, C))
    return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.norm_2(x))))


class Reference(nn.Module):
  """ml-aim v1 names and math: patch conv + LN, column-first sin-cos, blocks, post-trunk norm,
  and the attentive head over the mean of chosen blocks' raw outputs."""

  def __init__(self, cfg: aim.Config, layers: tuple):
    super().__init__()
    d, self.layers = cfg.width, layers
    self.preprocessor = nn.Module()
    self.preprocessor.patchifier = nn.Module()
    self.preprocessor.patchifier.proj = nn.Conv2d(3, d, cfg.patch, cfg.patch)
    self.preprocessor.patchifier.norm = nn.LayerNorm(d, eps=1e-6)
    self.trunk = nn.Module()
    self.trunk.blocks = nn.ModuleList([Block(d, cfg.heads) for _ in range(cfg.depth)])
    self.trunk.post_trunk_norm = nn.LayerNorm(d, eps=1e-6)
    self.head = nn.Module()
    self.head.bn = nn.BatchNorm1d(d, affine=False, eps=1e-6)
    self.head.cls_token = nn.Parameter(torch.zeros(1, 1, d))
    self.head.k, self.head.v = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
    self.head.linear = nn.Linear(d, 10, bias=False)
    self.heads, self.grid = cfg.heads, cfg.image_size // cfg.patch

  def forward(self, x):
    x = self.preprocessor.patchifier.proj(x).flatten(2).transpose(1, 2)
    x = self.preprocessor.patchifier.norm(x) + torch.from_numpy(aim.sincos_2d(self.grid, x.shape[-1]))[None]
    feats = []
    for block in self.trunk.blocks:
      x = block(x)
      feats.append(x)
    pooled = torch.stack([feats[i] for i in self.layers]).mean(0)
    B, N, C = pooled.shape
    h = self.head.bn(pooled.transpose(1, 2)).transpose(1, 2)
    q = self.head.cls_token.expand(B, -1, -1).reshape(B, 1, self.heads, C // self.heads).transpose(1, 2)
    k = self.head.k(h).reshape(B, N, self.heads, C // self.heads).transpose(1, 2)
    v = self.head.v(h).reshape(B, N, self.heads, C // self.heads).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, C).mean(1)
    return self.trunk.post_trunk_norm(x), self.head.linear(out)


def test_export_matches_a_pytorch_transcription_of_ml_aim(tmp_path):
  model = aim.Model(CFG, rngs=nnx.Rngs(0))
  p = probe.AttentiveProbe(CFG.width, CFG.heads, 10, rngs=nnx.Rngs(1))
  images = jax.random.uniform(jax.random.key(2), (3, 16, 16, 3))
  layers = (0, 1)
  for _ in range(3):  # move the running statistics away from (0, 1)
    p(model.trunk(images, layers=layers)[1] * 3.0 + 1.0, train=True)
  state = aim_torch.to_ml_aim(nnx.to_pure_dict(nnx.state(model.trunk, nnx.Param)),
                              nnx.to_pure_dict(nnx.state(p, nnx.Param)))
  state.update(aim_torch.probe_buffers(nnx.to_pure_dict(nnx.state(p))))
  aim_torch.save_safetensors(state, str(tmp_path / "aim.safetensors"))
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  ref = Reference(CFG, layers).eval()
  missing, unexpected = ref.load_state_dict(load_file(str(tmp_path / "aim.safetensors")), strict=False)
  assert not unexpected and not missing, (missing, unexpected)
  with torch.no_grad():
    normed_ref, logits_ref = ref(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2))
  with jax.default_matmul_precision("highest"):
    normed, feats = model.trunk(images, layers=layers)
    logits = p(feats, train=False)
  np.testing.assert_allclose(np.asarray(normed), normed_ref.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(logits), logits_ref.numpy(), atol=1e-4, rtol=1e-4)
  assert jnp.abs(logits).max() > 1e-3  # not a vacuous comparison of zeros

