"""Run by test_parallel.py with 8 fake CPU devices: every family's train step on three meshes
of 8 devices equals 1 device, and greedy generation with a tensor axis of 2 gives the tokens of
1 device. Prints one JSON line per check. `train:gpt2,bert` runs those families' train checks
alone (the batches are drawn for all, so each family's check is the same either way).

Families: GPT-2 (learned positions, LayerNorm, GELU), Llama with grouped-query attention,
Mixtral-style MoE, Mamba, Mamba-2, a hybrid (Mamba, S4D, local and global attention), BERT, T5. Meshes:
(1, 1, 8) where the heads (and key/value heads) divide 8, else (1, 2, 4); (2, 2, 2); (8, 1, 1).
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn
import jax
import numpy as np

from lm import config as config_lib, models, objectives, parallel, sampling
from tests import sharded_check
from tests.sharded_check import causal_batches, small_config

V_DECODER, V_ENCDEC = 264, 376  # divisible by a tensor axis of 8


def clm(model):  # with a mixture of experts, its load-balancing loss at moe_aux_coef
  return functools.partial(objectives.clm_loss, apply_fn=model.apply)


def families(rng):
  """name -> (config, loss_of, batches, vocab, kernel path, prepare)."""
  gpt2 = small_config(num_heads=8, num_kv_heads=0, positions='learned', norm='layernorm',
                      mlp='gelu', use_bias=True)
  llama = small_config(num_heads=8, num_kv_heads=4, positions='rope', norm='rmsnorm',
                       mlp='swiglu', use_bias=False)
  moe = small_config(num_heads=8, num_kv_heads=4, positions='rope', norm='rmsnorm',
                     mlp='swiglu', use_bias=False, num_experts=4, experts_per_token=2)
  mamba = small_config(num_heads=8, num_kv_heads=0, layer_pattern='MM', mlp_dim=0, positions='none',
                       state_size=8, scan_chunk=8)
  mamba2 = small_config(num_heads=8, num_kv_heads=0, layer_pattern='DD', mlp_dim=0,
                        positions='none', state_size=8, scan_chunk=8, ssm_head_dim=16, ngroups=2)
  hybrid = small_config(num_heads=8, num_kv_heads=0, num_layers=4, layer_pattern='MSLG', window=8,
                        state_size=8, scan_chunk=8)
  bert = small_config('encoder', num_heads=8)
  t5 = small_config('encdec', num_heads=8)
  causal = causal_batches(rng)
  tokens = lambda: np.concatenate([np.full((8, 1), 256), rng.integers(0, 256, (8, 31))], 1)
  bert_batches = [{'tokens': tokens().astype(np.int32),
                   'segment_ids': (np.arange(32)[None] >= 16).repeat(8, 0).astype(np.int32),
                   'nsp_labels': rng.integers(0, 2, 8).astype(np.int32)} for _ in range(3)]
  bert_loss = lambda model: functools.partial(
      objectives.mlm_nsp_loss, apply_fn=model.apply, pad_id=258, mask_id=257, first_special=256,
      num_ordinary=256, rate=0.15)
  t5_loss, t5_batches, corrupt = sharded_check.span_case(rng)
  mlp_kernel = ('block_0', 'mlp', 'up', 'kernel')
  return {
      'gpt2': (gpt2, clm, causal, V_DECODER, mlp_kernel, None),
      'llama_gqa': (llama, clm, causal, V_DECODER, ('block_0', 'attn', 'key', 'kernel'), None),
      'moe': (moe, clm, causal, V_DECODER,
              ('block_0', 'moe', 'up'), None),
      'mamba': (mamba, clm, causal, V_DECODER, ('block_0', 'mamba', 'in_proj', 'kernel'), None),
      'mamba2': (mamba2, clm, causal, V_DECODER, ('block_0', 'mamba2', 'out_proj', 'kernel'),
                 None),
      'hybrid': (hybrid, clm, causal, V_DECODER, ('block_0', 'mamba', 'in_proj', 'kernel'), None),
      'bert': (bert, bert_loss, bert_batches, V_DECODER, mlp_kernel, None),
      't5': (t5, t5_loss, t5_batches, V_ENCDEC, ('encoder', 'block_0', 'mlp', 'up', 'kernel'),
             corrupt),
  }


def tensor_heavy_mesh(c) -> tuple[int, int, int]:
  heads, kv = c.model.num_heads, c.model.get('num_kv_heads', 0) or c.model.num_heads
  return (1, 1, 8) if heads % 8 == 0 and kv % 8 == 0 else (1, 2, 4)


def train_steps_on_meshes(rng, only: set[str] | None = None) -> None:
  """Each family's (or each of `only`'s) train steps on the meshes against 1 device."""
  for name, (c, loss_of, batches, vocab, kernel, prepare) in families(rng).items():
    if only is not None and name not in only:
      continue
    shapes = [(1, 1, 1), tensor_heavy_mesh(c), (2, 2, 2), (8, 1, 1)]
    runs = sharded_check.train_on_meshes(c, loss_of, batches, shapes, vocab, kernel, prepare)
    (losses_1, params_1, _), rest = runs[0], runs[1:]
    for shape, (losses, params, shards) in zip(shapes[1:], rest):
      diff = max(float(np.max(np.abs(a - b)))
                 for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_1)))
      print(json.dumps({'check': 'train', 'family': name, 'mesh': shape, 'losses_8': losses,
                        'losses_1': losses_1, 'max_param_diff': diff, 'kernel_shards': shards}),
            flush=True)


def generation_with_a_tensor_axis(rng) -> None:
  """Greedy tokens of the decoder, Mamba and T5 on mesh (1, 1, 2) and on 1 device."""
  cases = {'llama_gqa': small_config(num_heads=4, num_kv_heads=2, positions='rope',
                                     norm='rmsnorm', mlp='swiglu', use_bias=False),
           'mamba': small_config(layer_pattern='MM', mlp_dim=0, positions='none', state_size=8,
                                 scan_chunk=8),
           't5': small_config('encdec', tie_embeddings=False)}  # untied: a random tied head
  # repeats the start token
  for name, c in cases.items():
    vocab = V_ENCDEC if name == 't5' else V_DECODER
    cfg = config_lib.parse(c, vocab_size=vocab, device_count=1).model
    model = models.build(cfg)
    params = jax.jit(lambda: nn.meta.unbox(
        model.init(jax.random.PRNGKey(1), np.zeros((1, 8), np.int32))['params']))()
    # weights of 4x their initial scale: varied continuations, not one repeated token
    params = jax.tree.map(lambda x: 4 * x, params)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 9, 3, 7)]
    tokens = {}
    for label, shape, devices in (('1', (1, 1, 1), jax.devices()[:1]),
                                  ('tensor2', (1, 1, 2), jax.devices()[:2])):
      mesh = parallel.make_mesh(shape, devices)
      with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
        placed = jax.device_put(params, parallel.logical_shardings(models.abstract_params(model),
                                                                   mesh))
        shards = len(jax.tree.leaves(placed)[0].sharding.device_set)
        tokens[label] = sampling.generate(cfg, placed, prompts, max_new_tokens=12).tokens
    print(json.dumps({'check': 'generate', 'family': name, 'tokens_1': tokens['1'],
                      'tokens_tensor2': tokens['tensor2'], 'devices': shards}), flush=True)


def main():
  assert jax.device_count() == 8, jax.device_count()
  rng = np.random.default_rng(0)
  which = sys.argv[1] if len(sys.argv) > 1 else 'all'  # all | train | train:A,B | generate
  if which in ('all', 'train'):
    train_steps_on_meshes(rng)
  if which.startswith('train:'):  # some families: two processes can share the work
    train_steps_on_meshes(rng, set(which.split(':', 1)[1].split(',')))
  if which in ('all', 'generate'):
    generation_with_a_tensor_axis(rng)


if __name__ == '__main__':
  main()
