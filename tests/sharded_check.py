"""Run by test_train.py with 8 fake CPU devices: three train steps of a decoder and of an
encoder (BERT) on a (data=2, fsdp=4) mesh, and of a hybrid decoder (Mamba, S4D, local and
global attention) and of an encoder-decoder (T5, span corruption drawn in the loss) on a
(data=2, fsdp=2, tensor=2) mesh, and each on a 1-device mesh, from the same initial state and
batches.
Prints one JSON line with both loss curves and the largest parameter difference.
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

from lm import config as config_lib, models, objectives, parallel, train
from lm.data import span as span_data
from lm.tasks import span as span_task
from tests.conftest import load_config, tiny_config


def train_on_meshes(c, loss_of, batches, shapes, vocab_size=259,
                    kernel=('block_0', 'mlp', 'up', 'kernel'), prepare=None):
  """Three train steps from the same initial state and batches on each mesh shape (of all 8
  devices, or (1, 1, 1): 1 device): [(losses, final parameters, shards of a kernel)]."""
  cfg = config_lib.parse(c, vocab_size=vocab_size, device_count=8)
  model = models.build(cfg.model)
  tx = train.make_optimizer(cfg.train, model)
  step_fn = train.make_train_step(loss_of(model), train.make_schedule(cfg.train),
                                  prepare=prepare)
  results = []
  for shape in shapes:
    devices = jax.devices()[:1] if shape == (1, 1, 1) else jax.devices()
    mesh = parallel.make_mesh(shape, devices)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
      init_fn, _, shardings = train.abstract_state(model, tx, 32, 0, mesh)
      state = init_fn()
      sharding = {k: parallel.batch_sharding(mesh, v.ndim) for k, v in batches[0].items()}
      step = jax.jit(step_fn, in_shardings=(shardings, sharding),
                     out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
      losses = []
      for batch in batches:
        state, metrics = step(state, parallel.global_batch(batch, sharding))
        losses.append(float(metrics['loss']))
    leaf = functools.reduce(lambda tree, key: tree[key], kernel, state.params)
    results.append((losses, jax.device_get(state.params),
                    len({str(s.index) for s in leaf.addressable_shards})))
  return results


def run_on_both_meshes(c, loss_of, batches, shape=(2, 4, 1), vocab_size=259,
                       kernel=('block_0', 'mlp', 'up', 'kernel'), prepare=None):
  """Three train steps on a mesh of 8 devices and on 1 device: (losses of each, the largest
  final parameter difference, the number of shards of a kernel)."""
  (losses_8, params_8, shards), (losses_1, params_1, _) = train_on_meshes(
      c, loss_of, batches, [shape, (1, 1, 1)], vocab_size, kernel, prepare)
  diff = max(float(np.max(np.abs(a - b)))
             for a, b in zip(jax.tree.leaves(params_8), jax.tree.leaves(params_1)))
  return losses_8, losses_1, diff, shards


def small_config(name: str = 'decoder', **model):
  """A config of 2 layers of width 64 (or `model`'s keys), windows of 32, batch 8."""
  c = load_config(name)
  c.model.update({**dict(num_layers=2, d_model=64, num_heads=4, mlp_dim=128, max_len=32), **model})
  c.data.update(seq_len=32)
  c.train.update(batch_size=8, warmup_steps=1, steps=10)
  return c


def causal_batches(rng, count: int = 3):
  return [{**{k: rng.integers(0, 256, (8, 32)).astype(np.int32) for k in ('inputs', 'targets')},
           'loss_mask': np.ones((8, 32), bool)} for _ in range(count)]


def main():
  rng = np.random.default_rng(0)
  clm = lambda model: functools.partial(objectives.clm_loss, apply_fn=model.apply)
  decoder = run_on_both_meshes(small_config(), clm, causal_batches(rng))
  c = small_config('encoder')  # BERT: masks drawn in the loss, NSP labels a [B] array
  tokens = lambda: np.concatenate([np.full((8, 1), 256), rng.integers(0, 256, (8, 31))], 1)
  batches = [{'tokens': tokens().astype(np.int32),
              'segment_ids': (np.arange(32)[None] >= 16).repeat(8, 0).astype(np.int32),
              'nsp_labels': rng.integers(0, 2, 8).astype(np.int32)} for _ in range(3)]
  encoder = run_on_both_meshes(
      c, lambda model: functools.partial(objectives.mlm_nsp_loss, apply_fn=model.apply,
                                         pad_id=258, mask_id=257, first_special=256,
                                         num_ordinary=256, rate=0.15), batches)
  # a hybrid: Mamba, S4D, local and global attention, over a tensor axis
  c = small_config(num_layers=4, layer_pattern='MSLG', window=8, state_size=8, scan_chunk=8)
  hybrid = run_on_both_meshes(c, clm, causal_batches(rng), shape=(2, 2, 2), vocab_size=260)
  # an encoder-decoder, its rows corrupted by span corruption inside the loss
  c = small_config('encdec')
  lengths = span_data.lengths(32, 0.15, 3.0)
  corrupt = functools.partial(span_task.corrupted, lengths=lengths,
                              sentinel_ids=tuple(range(260, 260 + lengths.spans)), eos_id=257)
  encdec = run_on_both_meshes(
      c, lambda model: functools.partial(objectives.seq2seq_loss, apply_fn=model.apply,
                                         start_id=0),
      [{'tokens': rng.integers(0, 256, (8, lengths.raw)).astype(np.int32)} for _ in range(3)],
      shape=(2, 2, 2), vocab_size=370, kernel=('encoder', 'block_0', 'mlp', 'up', 'kernel'),
      prepare=corrupt)
  # The byte vocabulary of 369 cannot split over tensor=2: a clear error, nothing written.
  workdir, corpus = Path(sys.argv[1]), Path(sys.argv[2])
  c = tiny_config(corpus, workdir.parent / 'cache')
  c.mesh.shape = (2, 2, 2)
  try:
    train.setup(c, workdir)
    uneven_error = ''
  except config_lib.ConfigError as e:
    uneven_error = str(e)
  print(json.dumps({'uneven_error': uneven_error, 'devices': jax.device_count(),
                    'param_shards': decoder[3], 'losses_8': decoder[0], 'losses_1': decoder[1],
                    'max_param_diff': decoder[2], 'encoder_losses_8': encoder[0],
                    'encoder_losses_1': encoder[1], 'encoder_max_param_diff': encoder[2],
                    'hybrid_losses_8': hybrid[0], 'hybrid_losses_1': hybrid[1],
                    'hybrid_max_param_diff': hybrid[2], 'hybrid_param_shards': hybrid[3],
                    'encdec_losses_8': encdec[0], 'encdec_losses_1': encdec[1],
                    'encdec_max_param_diff': encdec[2], 'encdec_param_shards': encdec[3]}))


if __name__ == '__main__':
  main()
