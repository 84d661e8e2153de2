"""The decoder's recipe options against their definitions: squared-ReLU MLPs against numpy,
QK-norm's invariance to the scale of the query and key projections, zero-initialised output
projections (the blocks start as the identity), tanh logit soft-capping, the learned skip from
the embeddings to every block against the plain blocks composed by hand, the value residual
against a numpy forward pass, their checks and their refusal by lm.hf. Decoding with them: test_model's prefill/decode test ('options')."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib, hf, models
from lm.config import ConfigError
from lm.models import DecoderConfig, decoder
from lm.models.layers import common, mlp
from tests.conftest import load_config

CFG = DecoderConfig(vocab_size=259, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, max_len=16, positions='rope', norm='rmsnorm', mlp='swiglu',
                    use_bias=False)
TOKENS = jax.random.randint(jax.random.PRNGKey(3), (2, 12), 0, 256)


def init(cfg: DecoderConfig, seed: int = 0):
  model = models.build(cfg)
  return model, nn.meta.unbox(model.init(jax.random.PRNGKey(seed),
                                         jnp.zeros((1, 16), jnp.int32))['params'])


def test_relu2_mlp_is_down_of_squared_relu_of_up():
  layer = mlp.Mlp('relu2', 8, use_bias=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), x)['params'])
  up, down = params['up'], params['down']
  h = np.maximum(np.asarray(x) @ np.asarray(up['kernel']) + np.asarray(up['bias']), 0) ** 2
  np.testing.assert_allclose(layer.apply({'params': params}, x),
                             h @ np.asarray(down['kernel']) + np.asarray(down['bias']),
                             rtol=1e-5, atol=1e-6)


def scaled_qk(params, factor: float):
  out = jax.tree.map(lambda x: x, params)
  for block in ('block_0', 'block_1'):
    for name in ('query', 'key'):
      out[block]['attn'][name]['kernel'] = factor * params[block]['attn'][name]['kernel']
  return out


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
  model, params = init(dataclasses.replace(CFG, qk_norm=True, norm_eps=1e-12))  # exact
  assert params['block_0']['attn']['query_norm']['scale'].shape == (8,)  # a head's width
  logits = model.apply({'params': params}, TOKENS)
  np.testing.assert_allclose(model.apply({'params': scaled_qk(params, 7.0)}, TOKENS), logits,
                             atol=1e-4)
  plain, plain_params = init(CFG)  # without it the scale changes the attention
  assert not np.allclose(plain.apply({'params': scaled_qk(plain_params, 7.0)}, TOKENS),
                         plain.apply({'params': plain_params}, TOKENS), atol=1e-3)
  decays = common.decays(models.abstract_params(model))
  assert not decays['block_0/attn/query_norm/scale'] and decays['block_0/attn/query/kernel']


def test_zero_initialised_outputs_make_every_block_start_as_the_identity():
  model, params = init(dataclasses.replace(CFG, zero_init_out=True))
  for block in ('block_0', 'block_1'):
    assert not np.any(params[block]['attn']['out']['kernel'])
    assert not np.any(params[block]['mlp']['down']['kernel'])
    assert np.any(params[block]['mlp']['up']['kernel'])  # the rest as before
  embedding = np.asarray(params['embed']['embedding'])
  x = embedding[np.asarray(TOKENS)]
  x = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-5)  # the final RMS norm, scale 1
  np.testing.assert_allclose(model.apply({'params': params}, TOKENS), x @ embedding.T,
                             rtol=1e-4, atol=1e-5)


def test_logit_softcap_is_c_tanh_of_the_logits_over_c():
  plain, params = init(CFG)
  capped = models.build(dataclasses.replace(CFG, logit_softcap=0.05))
  logits = np.asarray(plain.apply({'params': params}, TOKENS))
  out = np.asarray(capped.apply({'params': params}, TOKENS))
  np.testing.assert_allclose(out, 0.05 * np.tanh(logits / 0.05), rtol=1e-5, atol=1e-7)
  assert np.abs(out).max() < 0.05 and np.abs(logits).max() > 0.05  # it did cap


def test_embed_skip_feeds_each_block_a_x_plus_b_embeddings():
  skip_cfg = dataclasses.replace(CFG, embed_skip=True)
  model, params = init(skip_cfg)
  plain, _ = init(CFG)
  plain_params = {k: v for k, v in params.items()}
  for block in ('block_0', 'block_1'):
    np.testing.assert_array_equal(params[block]['embed_skip'], [1.0, 0.0])  # starts as plain
    plain_params[block] = {k: v for k, v in params[block].items() if k != 'embed_skip'}
  np.testing.assert_allclose(model.apply({'params': params}, TOKENS),
                             plain.apply({'params': plain_params}, TOKENS), rtol=1e-5, atol=1e-6)
  gates = {'block_0': (0.5, 2.0), 'block_1': (-1.5, 0.75)}
  for block, (a, b) in gates.items():
    params[block] = {**params[block], 'embed_skip': jnp.array([a, b])}
  x0 = params['embed']['embedding'][TOKENS]  # the plain blocks, composed by hand
  x = x0
  for block, (a, b) in gates.items():
    x = decoder.Block(CFG, 'L').apply({'params': plain_params[block]}, a * x + b * x0)[0]
  x = x / jnp.sqrt(jnp.mean(x ** 2, -1, keepdims=True) + CFG.norm_eps)
  np.testing.assert_allclose(model.apply({'params': params}, TOKENS),
                             x @ params['embed']['embedding'].T, rtol=1e-4, atol=1e-5)
  decays = common.decays(models.abstract_params(model))
  assert not decays['block_0/embed_skip'] and decays['block_0/attn/query/kernel']
  assert common.matrix_axes(models.abstract_params(model))['block_1/embed_skip'] is None  # Adam


def test_options_hf_does_not_have_are_refused_and_a_negative_cap_is_an_error(tmp_path):
  for options in ({'qk_norm': True}, {'logit_softcap': 30.0}, {'embed_skip': True},
                  {'value_residual': True}):
    cfg = dataclasses.replace(CFG, **options)
    with pytest.raises(ConfigError):
      hf.save(cfg, init(cfg)[1], tmp_path / 'out')
  c = load_config()
  c.model.logit_softcap = -1.0
  with pytest.raises(ConfigError, match=r'model.logit_softcap=-1.0: give a cap above 0'):
    config_lib.parse(c, vocab_size=300, device_count=1)


def numpy_forward(cfg: DecoderConfig, params, tokens, value_gates: dict):
  """numpy: a tied, learned-position, RMSNorm, ReLU-squared, bias-free decoder whose attention
  layer l attends with a v_l + b v_0 ((a, b) = value_gates[l]; v_0 the first layer's values)."""
  p = jax.tree.map(np.asarray, params)
  rms = lambda x, scale: x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + cfg.norm_eps) * scale
  from tests.test_model import reference_attention
  x = p['embed']['embedding'][np.asarray(tokens)] + p['pos_embed']['embedding'][:tokens.shape[1]]
  first_v = None
  for layer in range(cfg.num_layers):
    block = p[f'block_{layer}']
    h = rms(x, block['attn_norm']['scale'])
    q, k, v = (np.einsum('btd,dhk->bthk', h, block['attn'][name]['kernel'])
               for name in ('query', 'key', 'value'))
    if first_v is None:
      first_v = v
    else:
      a, b = value_gates[layer]
      v = a * v + b * first_v
    x = x + np.einsum('bthk,hkd->btd', reference_attention(q, k, v), block['attn']['out']['kernel'])
    h = rms(x, block['mlp_norm']['scale'])
    x = x + (np.maximum(h @ block['mlp']['up']['kernel'], 0) ** 2) @ block['mlp']['down']['kernel']
  x = rms(x, p['final_norm']['scale'])
  return x @ p['embed']['embedding'].T


def test_value_residual_attends_with_a_v_plus_b_first_values_as_numpy_does():
  cfg = dataclasses.replace(CFG, num_layers=3, positions='learned', mlp='relu2',
                            value_residual=True)
  model, params = init(cfg)
  assert 'value_residual' not in params['block_0']['attn']  # the first layer's are its own
  for block in ('block_1', 'block_2'):
    np.testing.assert_array_equal(params[block]['attn']['value_residual'], [0.5, 0.5])
  gates = {1: (0.5, 0.5), 2: (0.5, 0.5)}
  np.testing.assert_allclose(model.apply({'params': params}, TOKENS),
                             numpy_forward(cfg, params, TOKENS, gates), rtol=1e-4, atol=1e-4)
  gates = {1: (1.5, -0.75), 2: (0.25, 2.0)}
  for layer, gate in gates.items():
    params[f'block_{layer}']['attn']['value_residual'] = jnp.array(gate)
  logits = model.apply({'params': params}, TOKENS)
  np.testing.assert_allclose(logits, numpy_forward(cfg, params, TOKENS, gates),
                             rtol=1e-4, atol=1e-4)
  assert not np.allclose(logits, numpy_forward(cfg, params, TOKENS, {1: (1, 0), 2: (1, 0)}),
                         atol=1e-2)  # the values did mix
  decays = common.decays(models.abstract_params(model))
  assert not decays['block_1/attn/value_residual'] and decays['block_1/attn/value/kernel']
  assert common.matrix_axes(models.abstract_params(model))['block_2/attn/value_residual'] is None


def test_value_residual_is_refused_with_scanned_attention_and_is_nothing_without_attention():
  c = load_config()
  c.model.update(value_residual=True, scan_layers=True)
  with pytest.raises(ConfigError, match=r'model.value_residual=True: .*model.scan_layers=False'):
    config_lib.parse(c, vocab_size=300, device_count=1)
  scan_only = dataclasses.replace(CFG, layer_pattern='S', positions='none')
  shared = dataclasses.replace(scan_only, value_residual=True)
  _, params = init(scan_only)
  _, shared_params = init(shared)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, shared_params)  # no gates
  np.testing.assert_array_equal(models.build(shared).apply({'params': params}, TOKENS),
                                models.build(scan_only).apply({'params': params}, TOKENS))
  c = load_config()
  c.model.update(value_residual=True, scan_layers=True, layer_pattern='M', positions='none')
  config_lib.parse(c, vocab_size=300, device_count=1)  # scanned, but no attention: accepted
