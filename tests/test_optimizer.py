"""The optimizers and schedules: the wsd schedule by hand, which parameters Muon takes (declared
where each is created, like weight decay) over which axes, one Muon step against a numpy check
of orthogonality and Adam's first step, Muon's momentum warmup, a Muon run that learns and
resumes, and the keys' mistakes."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib, models, train
from lm.config import ConfigError, TrainConfig
from lm.models.layers import common
from tests.conftest import load_config


def test_the_wsd_schedule_warms_up_holds_and_decays_linearly_by_hand():
  t = TrainConfig(steps=100, learning_rate=2.0, warmup_steps=10, min_lr_ratio=0.1,
                  schedule='wsd', decay_fraction=0.2)
  lr = train.make_schedule(t)
  expected = {0: 0.0, 5: 1.0, 10: 2.0, 50: 2.0, 80: 2.0, 90: 1.1, 95: 0.65, 100: 0.2}
  for step, value in expected.items():
    assert float(lr(step)) == pytest.approx(value, abs=1e-6), step
  cosine = train.make_schedule(TrainConfig(steps=100, learning_rate=2.0, warmup_steps=10,
                                           min_lr_ratio=0.1))
  # cosine from step 10 to 100: at step 40, 0.2 + 1.8 * (1 + cos(pi * 30 / 90)) / 2 = 1.55
  assert float(cosine(40)) == pytest.approx(1.55, abs=1e-6)
  assert float(train.make_schedule(t, peak=0.5)(50)) == pytest.approx(0.5)


def boxed(variant: dict):
  c = load_config()
  c.model.update({**dict(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                        max_len=16, mlp='swiglu', value_residual=False), **variant})
  c.data.seq_len = 16
  return models.abstract_params(models.build(config_lib.parse(c, vocab_size=300,
                                                              device_count=1).model))


def test_the_matrices_muon_takes_and_their_axes():
  dense = common.matrix_axes(boxed({}))
  assert dense['block_0/attn/query/kernel'] == ((0,), (1, 2))  # [D, H, Dh]: D in, H x Dh out
  assert dense['block_0/attn/key/kernel'] == ((0,), (1, 2))
  assert dense['block_0/attn/out/kernel'] == ((0, 1), (2,))  # [H, Dh, D]
  assert dense['block_0/mlp/gate/kernel'] == dense['block_0/mlp/down/kernel'] == ((0,), (1,))
  assert {name for name, axes in dense.items() if axes is None} == {
      'embed/embedding', 'final_norm/scale', 'block_0/attn_norm/scale',
      'block_0/mlp_norm/scale', 'block_1/attn_norm/scale', 'block_1/mlp_norm/scale'}
  moe = common.matrix_axes(boxed({'num_experts': 4}))
  assert moe['block_0/moe/up'] == ((1,), (2,))  # [E, D, F]: each expert its own matrix
  assert moe['block_0/moe/router'] is None
  scanned = common.matrix_axes(boxed({'scan_layers': True}))
  assert scanned['layers/block_0/attn/out/kernel'] == ((1, 2), (3,))  # the stacked axis apart
  mamba = common.matrix_axes(boxed({'layer_pattern': 'M', 'mlp_dim': 0, 'positions': 'none',
                                    'tie_embeddings': False}))
  assert mamba['block_0/mamba/in_proj/kernel'] == mamba['block_0/mamba/out_proj/kernel'] == (
      (0,), (1,))
  for own in ('x_proj/kernel', 'dt_kernel', 'A_log', 'D', 'conv_kernel'):
    assert mamba[f'block_0/mamba/{own}'] is None, own  # the scan's own: AdamW
  assert mamba['head/kernel'] is None


def test_a_muon_step_orthogonalises_the_matrices_and_adam_steps_the_rest():
  c = load_config()
  c.model.update(num_layers=1, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=16)
  c.data.seq_len = 16
  c.train.update(optimizer='muon', learning_rate=0.01, muon_learning_rate=0.1, warmup_steps=0,
                 weight_decay=0.0, grad_clip=0.0)
  cfg = config_lib.parse(c, vocab_size=300, device_count=1)
  model = models.build(cfg.model)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params'])
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  grads = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  tx = train.make_optimizer(cfg.train, model)
  updates, _ = tx.update(grads, tx.init(params), params)
  for name, (right, wrong) in {'query': ((32, 32), (128, 8)),  # [D, H, Dh]: D x (H Dh)
                                'out': ((32, 32), (4, 256))}.items():  # [H, Dh, D]: (H Dh) x D
    u = np.asarray(updates['block_0']['attn'][name]['kernel'])
    # Muon's update is -lr x an orthogonalised matrix (singular values about 1, within the
    # quintic iteration's 0.5-1.5) scaled by sqrt(max(1, outputs / inputs)), here 1
    singular = np.linalg.svd(u.reshape(right) / 0.1, compute_uv=False)
    assert 0.5 < singular.min() and singular.max() < 1.5, (name, singular)
    # grouped another way (the head axis on the other side) it is not orthogonal
    assert np.linalg.svd(u.reshape(wrong) / 0.1, compute_uv=False).max() > 1.5, name
  # the rest: Adam with Nesterov's momentum (optax's muon), whose first step is
  # -lr (b1 (1 - b1) / (1 - b1^2) + 1) g / |g| with the bias-corrected moments
  g, b1 = np.asarray(grads['embed']['embedding']), cfg.train.b1
  np.testing.assert_allclose(np.asarray(updates['embed']['embedding']),
                             -0.01 * (b1 * (1 - b1) / (1 - b1 ** 2) + 1) * np.sign(g), rtol=1e-4)


def test_muons_momentum_warms_up_from_0_85():
  momentum = train.muon_momentum(TrainConfig(muon_momentum=0.95, muon_momentum_warmup=100))
  assert [round(float(momentum(s)), 6) for s in (0, 50, 100, 200)] == [0.85, 0.9, 0.95, 0.95]
  assert float(train.muon_momentum(TrainConfig(muon_momentum=0.9))(0)) == pytest.approx(0.85)


def test_a_muon_wsd_run_learns_and_resumes(config, tmp_path):
  config.train.update(steps=12, optimizer='muon', schedule='wsd', decay_fraction=0.5,
                      muon_momentum_warmup=4, checkpoint_every=6, eval_every=6)
  train.run(config, tmp_path / 'run')
  lines = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  loss = {l['step']: l['train/loss'] for l in lines if 'train/loss' in l}
  assert loss[12] < loss[1] - 1.0, loss
  config.train.steps = 16  # resumes from step 12 with Muon's state
  result = train.run(config, tmp_path / 'run')
  assert np.isfinite(result['val/loss'])


@pytest.mark.parametrize('key,value,message', [
    ('schedule', 'linear', r"train.schedule='linear': choose one of \('cosine', 'wsd'\)"),
    ('decay_fraction', 0.0, r'train.decay_fraction=0.0: must be in \(0, 1\]'),
    ('optimizer', 'sgd', r"train.optimizer='sgd': choose one of \('adamw', 'muon'\)"),
    ('muon_momentum', 1.0, r'train.muon_momentum=1.0: must be in \[0, 1\)'),
])
def test_bad_optimizer_and_schedule_keys(key, value, message):
  c = load_config()
  c.train[key] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.parse(c, vocab_size=300, device_count=1)


def test_a_warmup_past_the_wsd_decay_is_refused():
  c = load_config()
  c.train.update(schedule='wsd', steps=100, warmup_steps=90, decay_fraction=0.2)
  with pytest.raises(ConfigError, match=r"train.warmup_steps=90: must end by the wsd decay's "
                                        r"first step, 80"):
    config_lib.parse(c, vocab_size=300, device_count=1)
