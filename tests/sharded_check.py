"""Run by test_train.py with 8 fake CPU devices: three train steps of a decoder on a (data=2,
fsdp=4) mesh and on 1 device, from the same initial state and batches, and the one-line error
of a vocabulary that a tensor axis cannot split. Prints one JSON line. Also the helpers of
tests/sharded_families.py, which runs every family on more meshes (the encoder, the hybrid and
the encoder-decoder that this script ran before moved there).
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
  results, initial = [], None
  for shape in shapes:
    devices = jax.devices()[:1] if shape == (1, 1, 1) else jax.devices()
    mesh = parallel.make_mesh(shape, devices)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
      init_fn, _, shardings = train.abstract_state(model, tx, 32, 0, mesh)
      if initial is None:  # initialised once (on the first mesh), then laid out on each
        initial = jax.device_get(init_fn())
      state = jax.device_put(initial, shardings)
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
  c.train.update(batch_size=8, warmup_steps=1, steps=10, optimizer='adamw', schedule='cosine')
  return c


def span_case(rng, count: int = 3):
  """T5's span corruption on rows of 32 corrupted tokens (vocab 370: sentinels from 260):
  (loss_of(model), raw batches of 8 rows, prepare: the corruption drawn in the step)."""
  lengths = span_data.lengths(32, 0.15, 3.0)
  corrupt = functools.partial(span_task.corrupted, lengths=lengths,
                              sentinel_ids=tuple(range(260, 260 + lengths.spans)), eos_id=257)
  loss_of = lambda model: functools.partial(objectives.seq2seq_loss, apply_fn=model.apply,
                                            start_id=0)
  batches = [{'tokens': rng.integers(0, 256, (8, lengths.raw)).astype(np.int32)}
             for _ in range(count)]
  return loss_of, batches, corrupt


def causal_batches(rng, count: int = 3):
  return [{**{k: rng.integers(0, 256, (8, 32)).astype(np.int32) for k in ('inputs', 'targets')},
           'loss_mask': np.ones((8, 32), bool)} for _ in range(count)]


def main():
  rng = np.random.default_rng(0)
  clm = lambda model: functools.partial(objectives.clm_loss, apply_fn=model.apply)
  decoder = run_on_both_meshes(small_config(), clm, causal_batches(rng))
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
                    'max_param_diff': decoder[2]}))


if __name__ == '__main__':
  main()
