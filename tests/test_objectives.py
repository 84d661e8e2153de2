"""Losses against numpy references and hand-computed values."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lm import objectives, tasks, train


def numpy_nll(logits, targets):
  logits = logits - logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]


def test_clm_loss_equals_numpy_cross_entropy_without_padding():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 6, (2, 5))
  targets[1, 3:] = 6  # padding
  apply_fn = lambda variables, inputs, with_aux: (jnp.asarray(logits), {})  # no aux losses
  batch = {'inputs': targets, 'targets': targets, 'loss_mask': targets != 6}
  loss, metrics = objectives.clm_loss({}, batch, None, apply_fn=apply_fn)
  nll = numpy_nll(logits.astype(np.float64), targets)
  np.testing.assert_allclose(loss, nll[targets != 6].mean(), rtol=1e-6)
  assert metrics['loss'] == loss


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab():
  vocab = 259
  token_bytes = np.array([1] * 256 + [0] * 3)
  targets = np.array([[1, 2, 256, 3, 258]])  # 3 text bytes, a special token, padding
  apply_fn = lambda variables, inputs: jnp.zeros((1, 5, vocab))
  batch = {'inputs': targets, 'targets': targets, 'loss_mask': targets != 258}
  sums = objectives.clm_eval_sums({}, batch, None, apply_fn=apply_fn,
                                  token_bytes_V=jnp.asarray(token_bytes))
  assert int(sums['tokens']) == 4 and int(sums['bytes']) == 3
  metrics = objectives.clm_eval_metrics({k: float(v) for k, v in sums.items()})
  np.testing.assert_allclose(metrics['loss'], math.log(vocab), rtol=1e-6)
  np.testing.assert_allclose(metrics['bpb'], math.log2(vocab), rtol=1e-6)


def test_compressor_baselines():
  text = b'def f(x):\n    return x\n' * 200
  result = tasks.compressed_bits_per_byte(text)
  assert set(result) == {'gzip -9', 'xz -9'}
  assert 0 < result['gzip -9'] < 0.5 and 0 < result['xz -9'] < 0.5


def test_schedule_warms_up_then_decays_to_the_floor():
  from tests.conftest import load_config
  from lm import config as config_lib
  c = load_config()
  c.train.update(steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1,
                 schedule='cosine')
  schedule = train.make_schedule(config_lib.parse(c, vocab_size=259, device_count=1).train)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(100)],
                             [0.0, 0.5, 1.0, 0.1], atol=1e-6)
  assert schedule(55) < schedule(30)
