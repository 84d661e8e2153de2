"""The GPT decoder: causality, logical axes, FLOP count, and parity with Hugging Face GPT-2."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import models
from lm.config import ModelConfig
from lm.models import decoder, layers
from lm.train import is_matrix

CFG = ModelConfig(vocab_size=259, num_layers=2, d_model=32, num_heads=4, mlp_dim=64, max_len=16)


def init(cfg: ModelConfig = CFG, seed: int = 0):
  model = models.build(cfg)
  boxed = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, cfg.max_len), jnp.int32))['params']
  return model, boxed


@pytest.mark.parametrize('tie', [True, False])
def test_changing_a_token_leaves_earlier_logits_unchanged(tie):
  cfg = ModelConfig(**{**CFG.__dict__, 'tie_embeddings': tie})
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
  cfg = ModelConfig(**{**CFG.__dict__, 'dtype': 'bfloat16'})
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


def to_gpt2(params, cfg: ModelConfig):
  """Our parameters in GPT-2's layout (Conv1D weights are [in, out])."""
  p = jax.tree.map(np.asarray, nn.meta.unbox(params))
  d = cfg.d_model
  sd = {'transformer.wte.weight': p['embed']['embedding'],
        'transformer.wpe.weight': p['pos_embed']['embedding'],
        'transformer.ln_f.weight': p['LayerNorm_0']['scale'],
        'transformer.ln_f.bias': p['LayerNorm_0']['bias']}
  for i in range(cfg.num_layers):
    b, h = p[f'block_{i}'], f'transformer.h.{i}.'
    att = b['Attention_0']
    sd[h + 'attn.c_attn.weight'] = np.concatenate(
        [att[n]['kernel'].reshape(d, d) for n in ('query', 'key', 'value')], axis=1)
    sd[h + 'attn.c_attn.bias'] = np.concatenate(
        [att[n]['bias'].reshape(d) for n in ('query', 'key', 'value')])
    sd[h + 'attn.c_proj.weight'] = att['out']['kernel'].reshape(d, d)
    sd[h + 'attn.c_proj.bias'] = att['out']['bias']
    for n, ln in (('ln_1', 'LayerNorm_0'), ('ln_2', 'LayerNorm_1')):
      sd[h + n + '.weight'], sd[h + n + '.bias'] = b[ln]['scale'], b[ln]['bias']
    mlp = b['GeluMlp_0']
    sd[h + 'mlp.c_fc.weight'], sd[h + 'mlp.c_fc.bias'] = mlp['up']['kernel'], mlp['up']['bias']
    sd[h + 'mlp.c_proj.weight'] = mlp['down']['kernel']
    sd[h + 'mlp.c_proj.bias'] = mlp['down']['bias']
  return sd


def test_logits_equal_hugging_face_gpt2_with_the_same_weights():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  cfg = ModelConfig(**{**CFG.__dict__, 'num_layers': 3})
  model, boxed = init(cfg, seed=3)
  # Random, not-small weights everywhere, so every parameter matters to the logits.
  leaves, tree = jax.tree.flatten(nn.meta.unbox(boxed))
  keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
  params = tree.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model,
      n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_dim,
      activation_function='gelu_new', layer_norm_epsilon=1e-5, tie_word_embeddings=True))
  state = {k: torch.tensor(v) for k, v in to_gpt2(params, cfg).items()}
  missing, unexpected = hf.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= {'lm_head.weight'}
  hf.tie_weights()
  hf.eval()
  tokens = np.random.default_rng(0).integers(0, 259, (2, 16))
  with torch.no_grad():
    expected = hf(torch.tensor(tokens)).logits.numpy()
  logits = model.apply({'params': params}, jnp.asarray(tokens))
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize('length,block', [(10, 4), (8, 8), (5, 128)])
def test_blockwise_causal_attention_equals_a_numpy_reference(length, block):
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, length, 3, 4)).astype(np.float32) for _ in range(3))
  logits = np.einsum('bthd,bshd->bhts', q, k) / 2.0
  logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  expected = np.einsum('bhts,bshd->bthd', weights / weights.sum(-1, keepdims=True), v)
  out = layers.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), block=block)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
