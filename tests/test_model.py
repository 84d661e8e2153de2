"""The decoder: causality, logical axes, FLOP counts, attention variants (GQA, window, RoPE).
Parity with Hugging Face models is in test_hf.py."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import models
from lm.models import DecoderConfig
from lm.models import decoder
from lm.models.layers import attention, common, kv_cache, mlp

CFG = DecoderConfig(vocab_size=259, num_layers=2, d_model=32, num_heads=4, mlp_dim=64, max_len=16)


def is_matrix(path: tuple) -> bool:
  """Kernels, embeddings and expert weights, by the parameter's name (a bias or a norm scale
  may have 2 dims too): the independent reference for counts and for weight decay."""
  return getattr(path[-1], 'key', None) in ('kernel', 'embedding', 'router', 'gate', 'up', 'down')


def init(cfg: DecoderConfig = CFG, seed: int = 0):
  model = models.build(cfg)
  boxed = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, cfg.max_len), jnp.int32))['params']
  return model, boxed


@pytest.mark.parametrize('tie', [True, False])
def test_changing_a_token_leaves_earlier_logits_unchanged(tie):
  cfg = dataclasses.replace(CFG, **{'tie_embeddings': tie})
  model, params = init(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 256)
  apply = jax.jit(model.apply)
  base = apply({'params': params}, tokens)
  for t in (0, 7, 14):
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % 256)
    logits = apply({'params': params}, changed)
    np.testing.assert_array_equal(logits[:, :t + 1], base[:, :t + 1])
    assert not np.allclose(logits[:, t + 1:], base[:, t + 1:])


def test_every_parameter_has_a_logical_axis_per_dimension():
  _, boxed = init()
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(p, nn.Partitioned) for p in leaves)
  for p in leaves:
    assert len(p.names) == p.value.ndim


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = dataclasses.replace(CFG, **{'dtype': 'bfloat16'})
  model, params = init(cfg)
  assert {p.dtype for p in jax.tree.leaves(nn.meta.unbox(params))} == {jnp.dtype('float32')}
  tokens = jnp.arange(16)[None] % 256
  logits = model.apply({'params': params}, tokens)
  reference = init()[0].apply({'params': params}, tokens)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, reference, atol=0.05)


def test_flop_count_matches_the_parameters_and_a_hand_count():
  _, boxed = init()
  params = nn.meta.unbox(boxed)
  kernels = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                if is_matrix(path) and 'pos_embed' not in jax.tree_util.keystr(path))
  assert decoder.matmul_params(CFG) == kernels  # the tied embedding is the output head
  # By hand: per layer 4*32*32 + 2*32*64 = 8192; head 32*259 = 8288;
  # 6 * (2*8192 + 8288) = 148032; attention 12 * 2 layers * 16 keys * 32 = 12288.
  assert decoder.train_flops_per_token(CFG, 16) == 148032 + 12288


@pytest.mark.parametrize('length,block', [(10, 4), (8, 8), (5, 128)])
def test_blockwise_causal_attention_equals_a_numpy_reference(length, block):
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, length, 3, 4)).astype(np.float32) for _ in range(3))
  expected = reference_attention(q, k, v)
  out = attention.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), block=block)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def reference_attention(q, k, v, window=None):
  """numpy: multi-head attention with k and v repeated over each group of query heads."""
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  t = np.arange(q.shape[1])
  visible = (t[None] <= t[:, None]) & ((t[:, None] - t[None] < window) if window is not None else True)
  logits = np.where(visible, np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1]), -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum('bhts,bshd->bthd', weights / weights.sum(-1, keepdims=True), v)


@pytest.mark.parametrize('kv_heads,window,block', [(4, None, 4), (2, None, 4), (1, None, 8), (2, 3, 4),
                                                   (4, 5, 2), (1, 1, 4)])
def test_grouped_query_and_sliding_window_attention_equal_a_numpy_reference(kv_heads, window,
                                                                            block):
  rng = np.random.default_rng(0)
  q = rng.standard_normal((2, 11, 4, 8)).astype(np.float32)
  k, v = (rng.standard_normal((2, 11, kv_heads, 8)).astype(np.float32) for _ in range(2))
  out = attention.attention(*map(jnp.asarray, (q, k, v)), window=window, block=block)
  np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v, window), atol=1e-5)


@pytest.mark.parametrize('kv_heads,window', [(4, None), (2, None), (1, 3), (2, 5)])
def test_the_accelerators_fused_attention_equals_a_numpy_reference(kv_heads, window):
  """The GPU/TPU path (jax.nn.dot_product_attention, here its XLA implementation on CPU):
  causal, grouped-query, sliding window."""
  rng = np.random.default_rng(0)
  q = rng.standard_normal((2, 11, 4, 8)).astype(np.float32)
  k, v = (rng.standard_normal((2, 11, kv_heads, 8)).astype(np.float32) for _ in range(2))
  out = attention.fused_attention(*map(jnp.asarray, (q, k, v)), window=window,
                                  implementation='xla')
  np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v, window), atol=1e-5)


def test_fused_attention_equals_the_blocked_one_with_padding_segments_and_a_bias():
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 9, 4, 8)), jnp.float32) for _ in range(3))
  valid_BxS = jnp.asarray(np.arange(9)[None] >= np.array([[0], [3]]))  # row 1 left-padded
  segments_BxT = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 3, 3], [1, 1, 1, 1, 1, 2, 2, 2, 2]])
  bias_HxTxS = jnp.asarray(rng.standard_normal((4, 9, 9)), jnp.float32)
  cases = [dict(causal=False, key_valid_BxS=valid_BxS),  # an encoder over padding
           dict(causal=True, segment_ids_BxT=segments_BxT),  # packed rows
           dict(causal=False, bias_HxTxS=bias_HxTxS, scaled=False),  # T5's encoder
           dict(causal=True, window=4, key_valid_BxS=valid_BxS)]
  for case in cases:
    fused = attention.fused_attention(q, k, v, implementation='xla', **case)
    blocked = attention.blocked_attention(q, k, v, block=4, **case)
    rows = slice(None) if 'key_valid_BxS' not in case or not case['causal'] else slice(3, None)
    np.testing.assert_allclose(np.asarray(fused)[:, rows], np.asarray(blocked)[:, rows],
                               atol=1e-5, err_msg=str(sorted(case)))


def test_a_query_is_unaffected_by_keys_before_its_window():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 12, 2, 4)), jnp.float32) for _ in range(3))
  window, t = 4, 9
  base = attention.attention(q, k, v, window=window, block=4)
  early = slice(0, t - window + 1)  # keys 0 .. t - window: outside the window of t
  moved = attention.attention(q, k.at[:, early].add(5.0), v.at[:, early].add(5.0),
                           window=window, block=4)
  np.testing.assert_array_equal(moved[:, t:], base[:, t:])
  assert not np.allclose(moved[:, t - 1], base[:, t - 1])


def test_gqa_with_as_many_kv_heads_as_heads_is_multi_head_attention():
  cfg = dataclasses.replace(CFG, **{'positions': 'rope', 'norm': 'rmsnorm', 'mlp': 'swiglu'})
  explicit = dataclasses.replace(cfg, **{'num_kv_heads': cfg.num_heads})
  model, params = init(cfg)
  tokens = jnp.arange(16)[None] % 256
  np.testing.assert_array_equal(model.apply({'params': params}, tokens),
                                models.build(explicit).apply({'params': params}, tokens))


def test_rope_rotates_pairs_by_position():
  x = jnp.ones((1, 3, 1, 4))
  out = common.rope(x, jnp.arange(3), theta=100.0)
  # Pair (0, 2) turns by t radians, pair (1, 3) by t / 10 (= t * 100^(-2/4)).
  for t in range(3):
    for i, angle in ((0, t), (1, t / 10)):
      c, s = np.cos(angle), np.sin(angle)
      np.testing.assert_allclose(out[0, t, 0, [i, i + 2]], [c - s, s + c], atol=1e-6)


def test_llama_style_counts_by_hand():
  cfg = DecoderConfig(vocab_size=100, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, max_len=16, positions='rope', norm='rmsnorm', mlp='swiglu',
                    use_bias=False, window=8, tie_embeddings=False)
  _, boxed = init(cfg)
  kernels = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(boxed))
                if is_matrix(path) and 'embed' not in jax.tree_util.keystr(path))
  # Per layer: q and out 32*32 each, k and v 32*(2*8) each, gate/up/down 32*64 each:
  # 2048 + 1024 + 6144 = 9216; head 32*100 = 3200.
  assert decoder.matmul_params(cfg) == kernels == 2 * 9216 + 3200
  # Attention over min(16, window 8) keys: 12 * 2 layers * 8 * 32 = 6144.
  assert decoder.train_flops_per_token(cfg, 16) == 6 * (2 * 9216 + 3200) + 6144


LLAMA = dict(positions='rope', norm='rmsnorm', mlp='swiglu', use_bias=False, num_kv_heads=2)
VARIANTS = {
    'gpt2': {},
    'llama-gqa': dict(positions='rope', norm='rmsnorm', mlp='swiglu', use_bias=False,
                      num_kv_heads=2, tie_embeddings=False),
    'mistral-window': dict(positions='rope', norm='rmsnorm', mlp='swiglu', use_bias=False,
                           num_kv_heads=1, window=3),
    'mixtral-window': dict(positions='rope', norm='rmsnorm', mlp='swiglu', use_bias=False,
                           num_kv_heads=2, window=4, num_experts=4, experts_per_token=2),
    'local-global': dict(LLAMA, num_layers=3, window=3, layer_pattern='LLG'),
    'scanned-local-global': dict(LLAMA, num_layers=4, window=3, layer_pattern='GL',
                                 scan_layers=True),
    'options': dict(LLAMA, mlp='relu2', qk_norm=True, logit_softcap=3.0,  # issue 30's keys
                    embed_skip=True),
    'value-residual': dict(LLAMA, num_layers=3, window=3, layer_pattern='LLG',
                           value_residual=True),
}


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_prefill_then_decode_steps_equal_the_full_forward(variant):
  cfg = dataclasses.replace(CFG, **{**VARIANTS[variant]})
  model, boxed = init(cfg, seed=2)
  params = nn.meta.unbox(boxed)
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 14), 0, 256)
  full = model.apply({'params': params}, tokens)
  prompt = 5  # longer than the window: the rolling cache wraps during prefill and decoding
  logits, cache = decoder.prefill(cfg, params, tokens[:, :prompt], max_len=16)
  np.testing.assert_allclose(logits, full[:, :prompt], atol=1e-5)
  step = jax.jit(lambda token, cache: decoder.decode_step(cfg, params, token, cache))
  for t in range(prompt, tokens.shape[1]):
    logits_t, cache = step(tokens[:, t], cache)
    np.testing.assert_allclose(logits_t, full[:, t], atol=1e-5)
  # A window's cache does not grow with the sequence; a global layer's holds max_len.
  period_windows = cfg.layer_windows[:cfg.period] if cfg.scan_layers else cfg.layer_windows
  for layer_cache, window in zip(cache['layers'], period_windows):
    assert layer_cache.pos.shape[-1] == (16 if window is None else window)


def test_block_sizes_by_hand():
  assert kv_cache.block_sizes(16) == [16]
  assert kv_cache.block_sizes(272) == [64, 64, 64, 64, 16]
  assert kv_cache.block_sizes(2048) == [256] * 8  # at most 8 blocks
  assert kv_cache.block_sizes(2049) == [320] * 6 + [129]


@pytest.mark.parametrize('variant', ['gpt2', 'llama-gqa', 'mistral-window'])
def test_decode_steps_reading_cache_blocks_equal_the_full_forward(variant, monkeypatch):
  # Blocks of 4 slots: a cache of 16 is read in 1, 2, 3 then 4 blocks as it fills, so the
  # decode steps below write into every block and cross every branch (a window of 3 keeps 3
  # slots: one block, which the rolling buffer overwrites).
  monkeypatch.setattr(kv_cache, 'CACHE_BLOCK', 4)
  assert kv_cache.block_sizes(16) == [4, 4, 4, 4]
  cfg = dataclasses.replace(CFG, **{**VARIANTS[variant]})
  model, boxed = init(cfg, seed=3)
  params = nn.meta.unbox(boxed)
  tokens = jax.random.randint(jax.random.PRNGKey(6), (3, 16), 0, 256)
  full = model.apply({'params': params}, tokens)
  lengths = jnp.array([2, 1, 2])  # left padding: rows start at columns 0, 1 and 0
  tokens = tokens.at[1, 0].set(0)
  logits, cache = decoder.prefill(cfg, params, tokens[:, :2], max_len=16, lengths_B=lengths)
  step = jax.jit(lambda token, cache: decoder.decode_step(cfg, params, token, cache))
  for t in range(2, 16):
    logits_t, cache = step(tokens[:, t], cache)
    np.testing.assert_allclose(np.asarray(logits_t)[[0, 2]], np.asarray(full)[[0, 2], t],
                               atol=1e-5)


def test_moe_equals_a_dense_loop_over_each_tokens_chosen_experts():
  cfg = dataclasses.replace(CFG, **{**VARIANTS['mixtral-window']})
  moe = mlp.MoeMlp(cfg.num_experts, cfg.experts_per_token, cfg.mlp_dim)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, cfg.d_model))
  p = nn.meta.unbox(moe.init(jax.random.PRNGKey(1), x)['params'])
  out = np.asarray(moe.apply({'params': p}, x)[0]).reshape(-1, cfg.d_model)  # (y, stats)
  silu = lambda z: z / (1 + np.exp(-z))
  for n, token in enumerate(np.asarray(x).reshape(-1, cfg.d_model)):
    probs = np.exp(token @ p['router'])
    probs /= probs.sum()
    top = np.argsort(-probs)[:2]
    expected = sum(probs[e] / probs[top].sum()
                   * (silu(token @ p['gate'][e]) * (token @ p['up'][e])) @ p['down'][e]
                   for e in top)
    np.testing.assert_allclose(out[n], expected, atol=1e-5)


@pytest.mark.parametrize('capacity_factor', [0.5, 1.0, 2.0])
def test_moe_with_a_capacity_drops_assignments_past_it_first_choices_first_as_numpy_does(
    capacity_factor):
  """A numpy loop: each expert keeps the first ceil(c N k / E) of its assignments, every
  token's first choice before any second choice, earlier tokens first; a dropped assignment adds
  nothing, and the dropped share is reported. At c = E / k no assignment can be dropped."""
  cfg = dataclasses.replace(CFG, **{**VARIANTS['mixtral-window']})
  e, k = cfg.num_experts, cfg.experts_per_token
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, cfg.d_model))
  moe = mlp.MoeMlp(e, k, cfg.mlp_dim, capacity_factor=capacity_factor)
  p = nn.meta.unbox(moe.init(jax.random.PRNGKey(1), x)['params'])
  y, (_, _, dropped) = moe.apply({'params': p}, x)
  tokens = np.asarray(x).reshape(-1, cfg.d_model)
  capacity = min(len(tokens), int(np.ceil(capacity_factor * len(tokens) * k / e)))
  silu = lambda z: z / (1 + np.exp(-z))
  probs = np.exp(tokens @ p['router'])
  probs /= probs.sum(-1, keepdims=True)
  top_NxK = np.argsort(-probs, axis=-1)[:, :k]
  taken, expected, kept = np.zeros(e, int), np.zeros_like(tokens), 0
  for choice in range(k):
    for n, token in enumerate(tokens):
      expert = top_NxK[n, choice]
      if taken[expert] < capacity:
        taken[expert] += 1
        kept += 1
        weight = probs[n, expert] / probs[n, top_NxK[n]].sum()
        expected[n] += weight * (silu(token @ p['gate'][expert]) * (token @ p['up'][expert])
                                 ) @ p['down'][expert]
  np.testing.assert_allclose(np.asarray(y).reshape(-1, cfg.d_model), expected, atol=1e-5)
  np.testing.assert_allclose(float(dropped), 1 - kept / (len(tokens) * k), atol=1e-6)
  if capacity_factor == 2.0:  # E / k: each expert may take every token
    assert float(dropped) == 0
    no_drop = mlp.MoeMlp(e, k, cfg.mlp_dim).apply({'params': p}, x)[0]
    np.testing.assert_allclose(y, no_drop, atol=1e-5)
  else:
    assert float(dropped) > 0


def test_a_capacity_logs_the_dropped_share_over_the_layers_and_is_for_training_only():
  from lm import objectives
  cfg = dataclasses.replace(CFG, **{**LLAMA, 'num_layers': 2, 'num_experts': 4,
                                   'experts_per_token': 2, 'moe_capacity_factor': 0.5})
  _, boxed = init(cfg)
  params = nn.meta.unbox(boxed)
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(6), (2, 16), 0, 256))
  batch = {'inputs': tokens, 'targets': tokens, 'loss_mask': np.ones(tokens.shape, bool)}
  model = models.build(cfg)
  loss, metrics = objectives.clm_loss(params, batch, None, apply_fn=model.apply)
  _, state = model.apply({'params': params}, tokens, with_aux=True, mutable='intermediates',
                         capture_intermediates=lambda m, _: isinstance(m, mlp.MoeMlp))
  layers = [state['intermediates'][f'block_{i}']['moe']['__call__'][0][1][2] for i in range(2)]
  np.testing.assert_allclose(float(metrics['moe_dropped']), np.mean(layers), atol=1e-6)
  assert 0 < float(metrics['moe_dropped']) < 1
  np.testing.assert_allclose(float(loss), float(metrics['nll']) + 0.01 * float(metrics['moe_aux']),
                             rtol=1e-6)
  _, no_capacity = objectives.clm_loss(params, batch, None, apply_fn=models.build(
      dataclasses.replace(cfg, moe_capacity_factor=0.0)).apply)
  assert 'moe_dropped' not in no_capacity
  # evaluation and decoding (no with_aux) drop nothing: the model without a capacity
  dropless = models.build(dataclasses.replace(cfg, moe_capacity_factor=0.0))
  np.testing.assert_array_equal(model.apply({'params': params}, tokens),
                                dropless.apply({'params': params}, tokens))


def test_moe_counts_active_parameters():
  dense = DecoderConfig(vocab_size=100, num_layers=2, d_model=32, num_heads=4, mlp_dim=64,
                      positions='rope', norm='rmsnorm', mlp='swiglu', use_bias=False)
  moe = dataclasses.replace(dense, **{'num_experts': 8, 'experts_per_token': 2})
  # Per layer the router adds 32*8 and the two active experts double the MLP's 3*32*64.
  assert decoder.matmul_params(moe) - decoder.matmul_params(dense) == 2 * (32 * 8 + 3 * 32 * 64)


def test_a_layer_pattern_gives_each_layer_its_window_and_flops():
  cfg = dataclasses.replace(CFG, **{**LLAMA, 'num_layers': 5, 'window': 4,
                       'layer_pattern': 'LLG'})
  assert cfg.layer_windows == (4, 4, None, 4, 4)
  full = dataclasses.replace(cfg, **{'window': None, 'layer_pattern': ''})
  # Attention FLOPs: 12 * H * Dh per key; local layers see 4 of 16 keys: 12 less per layer.
  saved = decoder.train_flops_per_token(full, 16) - decoder.train_flops_per_token(cfg, 16)
  assert saved == 12 * 32 * 4 * (16 - 4)
  _, boxed = init(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 16), 0, 256)
  params = nn.meta.unbox(boxed)
  # Layer 2 is global: it differs from an all-local model only because it sees more keys.
  local = dataclasses.replace(cfg, **{'layer_pattern': ''})
  assert not np.allclose(models.build(cfg).apply({'params': params}, tokens),
                         models.build(local).apply({'params': params}, tokens))


REMAT_SCAN = {
    'remat-full': dict(remat='full'),
    'remat-dots': dict(remat='dots'),
    'scan': dict(scan_layers=True),
    'scan-remat-pattern': dict(scan_layers=True, remat='full', window=3, layer_pattern='LG'),
    'scan-moe': dict(scan_layers=True, num_experts=4, experts_per_token=2),
    'scan-embed-skip': dict(scan_layers=True, embed_skip=True),
}


@pytest.mark.parametrize('variant', list(REMAT_SCAN))
def test_remat_and_scan_give_the_plain_models_outputs_and_gradients(variant):
  plain = dataclasses.replace(CFG, **{**LLAMA, 'num_layers': 4,
                         **{k: v for k, v in REMAT_SCAN[variant].items()
                            if k not in ('remat', 'scan_layers')}})
  cfg = dataclasses.replace(plain, **{**REMAT_SCAN[variant]})
  _, boxed = init(plain, seed=4)
  params = nn.meta.unbox(boxed)
  moved = models.layout_for(cfg, params)
  _, scanned_boxed = init(cfg)  # the layouts agree, shapes and logical axes included
  assert jax.tree.map(np.shape, nn.meta.unbox(scanned_boxed)) == jax.tree.map(np.shape, moved)
  tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 16), 0, 256)

  def loss(cfg, params):
    logits, aux_losses = models.build(cfg).apply({'params': params}, tokens[:, :-1],
                                                 with_aux=True)
    nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
    aux = aux_losses['moe_aux'][0] if aux_losses else 0.0  # the experts' load balancing
    return nll + 0.01 * aux, logits

  (want, want_logits), want_grads = jax.value_and_grad(lambda p: loss(plain, p), has_aux=True)(
      params)
  (got, got_logits), got_grads = jax.jit(jax.value_and_grad(
      lambda p: loss(cfg, p), has_aux=True))(moved)
  np.testing.assert_allclose(got_logits, want_logits, atol=2e-5)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  if cfg.scan_layers:
    got_grads = models.plain_layout(cfg, got_grads)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=2e-6), got_grads, want_grads)
  if cfg.scan_layers:
    jax.tree.map(np.testing.assert_array_equal, models.plain_layout(cfg, moved), params)


@pytest.mark.parametrize('variant', ['gpt2', 'mistral-window', 'scanned-local-global'])
def test_left_padded_rows_decode_as_each_row_alone(variant):
  cfg = dataclasses.replace(CFG, **{**VARIANTS[variant]})
  _, boxed = init(cfg, seed=3)
  params = nn.meta.unbox(boxed)
  tokens = jax.random.randint(jax.random.PRNGKey(8), (2, 10), 0, 256)
  lengths = [2, 6]  # row 0 is padded by 4 columns (of token 0: they must not matter)
  padded = jnp.stack([jnp.pad(tokens[0, :2], (4, 0)), tokens[1, :6]])
  prefill = jax.jit(lambda t, n: decoder.prefill(cfg, params, t, max_len=16, lengths_B=n))
  step = jax.jit(lambda t, c: decoder.decode_step(cfg, params, t, c))
  logits, cache = prefill(padded, jnp.array(lengths))
  steps = [logits[:, -1]]
  for t in range(3):  # then both rows continue with their own next tokens
    logits_t, cache = step(tokens[jnp.arange(2), jnp.array(lengths) + t], cache)
    steps.append(logits_t)
  for b, n in enumerate(lengths):
    alone, alone_cache = decoder.prefill(cfg, params, tokens[b:b + 1, :n], max_len=16)
    np.testing.assert_allclose(logits[b, -n:], alone[0], atol=2e-5)
    alone = alone[:, -1]
    for t in range(4):
      np.testing.assert_allclose(steps[t][b], alone[0], atol=2e-5)
      alone, alone_cache = step(tokens[b:b + 1, n + t], alone_cache)


@pytest.mark.parametrize('sizes', [[5, 0, 17, 2], [0, 0, 24, 0], [1, 1, 1, 1], [40, 3, 0, 21]])
def test_grouped_matmul_equals_a_numpy_loop_over_groups(sizes):
  rng = np.random.default_rng(len(sizes) + sum(sizes))
  xs = rng.standard_normal((sum(sizes), 6)).astype(np.float32)
  w = rng.standard_normal((4, 6, 3)).astype(np.float32)
  expected = np.concatenate([xs[sum(sizes[:e]):sum(sizes[:e + 1])] @ w[e] for e in range(4)])
  for block in (4, 256):
    got = mlp.grouped_matmul(jnp.asarray(xs), jnp.asarray(w), jnp.asarray(sizes), block)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize('name,overrides', [
    ('gpt2', {}),  # biases, LayerNorm (scale and bias), learned positions, tied head
    ('llama-moe', dict(positions='rope', norm='rmsnorm', mlp='swiglu', use_bias=False,
                       num_experts=4, tie_embeddings=False)),  # experts and router, a head
    ('llama-scanned', dict(positions='rope', norm='rmsnorm', mlp='swiglu', use_bias=False,
                           scan_layers=True)),  # stacked parameters under layers/
    ('bert', dict(post_norm=True, num_segments=2, mlp='gelu_exact')),
])
def test_weight_decay_reaches_exactly_the_declared_parameters(name, overrides):
  from lm import train
  from lm.config import ModelConfig, TrainConfig
  common = {f.name: getattr(CFG, f.name) for f in dataclasses.fields(ModelConfig) if f.init}
  cls = models.EncoderConfig if name == 'bert' else DecoderConfig
  cfg = cls(**{**common, **overrides})
  model, boxed = init(cfg)
  params = nn.meta.unbox(boxed)
  lr, wd = 0.1, 0.5
  tx = train.make_optimizer(TrainConfig(learning_rate=lr, warmup_steps=0, weight_decay=wd), model)
  # With zero gradients, AdamW's update is -lr * wd * p where it decays, and 0 elsewhere.
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  decayed, kept = set(), set()
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    p = params
    for k in path:
      p = p[k.key]
    if np.any(u != 0):
      np.testing.assert_allclose(u, -lr * wd * p, rtol=1e-6)
      decayed.add(jax.tree_util.keystr(path))
    else:
      kept.add(jax.tree_util.keystr(path))
  matrices = {jax.tree_util.keystr(path) for path, _ in
              jax.tree_util.tree_leaves_with_path(params) if is_matrix(path)}
  assert decayed == matrices and kept and not kept & matrices, name
  assert all(k.endswith(("['bias']", "['scale']", "['mlm_bias']")) for k in kept), kept
