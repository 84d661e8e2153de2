"""Gradient accumulation: k microbatches a step give the step of the whole batch (losses and
parameters within 1e-5 relative over 5 steps) for the causal task, for instruction tuning with
uneven loss masks across microbatches, and for span corruption drawn over the whole batch."""
from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from lm import config as config_lib, models, objectives, parallel, train
from tests.sharded_check import small_config, span_case


def run_steps(c, loss_of, runs, accum_steps, vocab_size=259, prepare=None):
  """[(losses, final parameters)] of each run (a list of batches) from the same initial
  state, through one compiled step of `accum_steps` microbatches."""
  cfg = config_lib.parse(c, vocab_size=vocab_size, device_count=1)
  model = models.build(cfg.model)
  tx = train.make_optimizer(cfg.train, model)
  step_fn = train.make_train_step(loss_of(model), train.make_schedule(cfg.train), accum_steps,
                                  prepare)
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  results = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
    init_fn, _, _ = train.abstract_state(model, tx, 32, 0, mesh)
    step = jax.jit(step_fn, donate_argnums=0)
    for batches in runs:
      state, losses = init_fn(), []
      for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics['loss']))
      results.append((np.array(losses), jax.device_get(state.params)))
  return results


def assert_same_steps(a, b) -> None:
  """Losses within 1e-5 relative; each parameter within 1e-5 of its tensor's largest entry
  (Adam divides by the root of the second moment, so a gradient entry near 0 turns float32
  summation noise into a step of the learning rate's size: entrywise relative error is not
  the measure there)."""
  np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=3e-5 * np.abs(y).max()),
               a[1], b[1])


def clm(model):
  return functools.partial(objectives.clm_loss, apply_fn=model.apply)


@pytest.mark.slow
def test_four_microbatches_equal_one_batch_for_clm_and_uneven_sft_masks():
  rng = np.random.default_rng(0)
  c = small_config()
  tokens = lambda: rng.integers(0, 256, (8, 32)).astype(np.int32)
  plain = [{'inputs': tokens(), 'targets': tokens(), 'loss_mask': np.ones((8, 32), bool)}
           for _ in range(5)]
  # sft: assistant turns only, so microbatches hold very different counts of loss tokens
  # (rows 0-1 nearly all, the others a few): a mean per microbatch would weigh them wrongly.
  masked = []
  for batch in plain:
    share_B = np.array([0.95, 0.9, 0.1, 0.05, 0.2, 0.1, 0.05, 0.3])
    keep_BxT = rng.random((8, 32)) < share_B[:, None]
    masked.append({**batch, 'loss_mask': keep_BxT})
  fours, ones = (run_steps(c, clm, [plain, masked], k) for k in (4, 1))
  for four, one in zip(fours, ones):
    assert_same_steps(four, one)


@pytest.mark.slow
def test_four_microbatches_equal_one_batch_for_span_corruption():
  rng = np.random.default_rng(1)
  c = small_config('encdec')
  loss_of, batches, corrupt = span_case(rng, 5)
  (one,) = run_steps(c, loss_of, [batches], 1, vocab_size=370, prepare=corrupt)
  (four,) = run_steps(c, loss_of, [batches], 4, vocab_size=370, prepare=corrupt)
  assert_same_steps(four, one)


def test_a_run_with_grad_accum_steps_learns_as_one_without(config, tmp_path):
  """Through lm.main's loop: the same losses with train.grad_accum_steps=2."""
  config.train.update(steps=6, eval_every=100, checkpoint_every=100)
  plain = train.run(config, tmp_path / 'k1')
  config.train.grad_accum_steps = 2
  accumulated = train.run(config, tmp_path / 'k2')
  read = lambda w: [json.loads(l)['train/loss'] for l in (w / 'metrics.jsonl').read_text()
                    .splitlines() if 'train/loss' in l]
  np.testing.assert_allclose(read(tmp_path / 'k2'), read(tmp_path / 'k1'), rtol=1e-5)
  assert accumulated['val/bpb'] == pytest.approx(plain['val/bpb'], rel=1e-5)
