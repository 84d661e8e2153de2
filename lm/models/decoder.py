"""The decoder-only language model: pre-norm blocks of attention and MLP, configured by
ModelConfig into GPT-2 (learned positions, LayerNorm, GELU, biases) or Llama / Mistral (RoPE,
RMSNorm, SwiGLU, grouped-query attention, sliding window), tied or untied embeddings.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.models import layers

ACTIVATION = ('batch', 'length', 'embed')


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, cache: dict | None = None, index: jax.Array | int = 0):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    out_std = layers.INIT_STD / math.sqrt(2 * cfg.num_layers)  # GPT-2's residual scaling
    h_BxTxD = layers.norm(cfg.norm, cfg.norm_eps, dtype, 'attn_norm')(x_BxTxD)
    attended = layers.Attention(
        cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.use_bias,
        cfg.rope_theta if cfg.positions == 'rope' else 0.0, cfg.window, dtype, out_std,
        name='attn')(h_BxTxD, cache, index)
    h_BxTxD, cache = attended if cache is not None else (attended, None)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD + h_BxTxD, ACTIVATION)
    h_BxTxD = layers.norm(cfg.norm, cfg.norm_eps, dtype, 'mlp_norm')(x_BxTxD)
    if cfg.num_experts:
      mlp = layers.MoeMlp(cfg.num_experts, cfg.experts_per_token, cfg.mlp_dim, dtype, out_std,
                          name='moe')
    else:
      mlp = layers.Mlp(cfg.mlp, cfg.mlp_dim, cfg.use_bias, dtype, out_std, name='mlp')
    x_BxTxD = x_BxTxD + mlp(h_BxTxD)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ACTIVATION)
    return x_BxTxD if cache is None else (x_BxTxD, cache)


class Decoder(nn.Module):
  """tokens_BxT (int) -> logits_BxTxV (float32); with a cache (see `prefill`), also the cache."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, cache: dict | None = None):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    index = 0 if cache is None else cache['index']
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, name='embed',
                     embedding_init=layers.normal(('vocab', 'embed')))
    x_BxTxD = embed(tokens_BxT)
    if cfg.positions == 'learned':
      pos_embed = nn.Embed(cfg.max_len, cfg.d_model, dtype=dtype, name='pos_embed',
                           embedding_init=layers.normal((None, 'embed'), 0.01))
      x_BxTxD = x_BxTxD + pos_embed(index + jnp.arange(tokens_BxT.shape[1]))[None]
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ACTIVATION)
    new_layers = []
    for i in range(cfg.num_layers):
      block = Block(cfg, name=f'block_{i}')
      if cache is None:
        x_BxTxD = block(x_BxTxD)
      else:
        x_BxTxD, layer_cache = block(x_BxTxD, cache['layers'][i], index)
        new_layers.append(layer_cache)
    x_BxTxD = layers.norm(cfg.norm, cfg.norm_eps, dtype, 'final_norm')(x_BxTxD)
    if cfg.tie_embeddings:
      logits_BxTxV = embed.attend(x_BxTxD)
    else:
      logits_BxTxV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, name='head',
                              kernel_init=layers.normal(('embed', 'vocab')))(x_BxTxD)
    logits_BxTxV = nn.with_logical_constraint(logits_BxTxV.astype(jnp.float32),
                                              ('batch', 'length', 'vocab'))
    if cache is None:
      return logits_BxTxV
    return logits_BxTxV, {'index': index + tokens_BxT.shape[1], 'layers': new_layers}


# --- the decoding interface: init_cache, prefill, decode_step ------------------------------

def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> dict:
  """An empty cache for sequences of up to max_len positions (prompt included). A layer with a
  sliding window keeps `window` slots whatever max_len is."""
  dtype = jnp.dtype(cfg.dtype)
  return {'index': jnp.zeros((), jnp.int32),
          'layers': [layers.init_kv_cache(batch_size, max_len, cfg.kv_heads, cfg.head_dim,
                                          cfg.window, dtype) for _ in range(cfg.num_layers)]}


def prefill(cfg: ModelConfig, params, tokens_BxT: jax.Array,
            max_len: int) -> tuple[jax.Array, dict]:
  """Runs the prompt, returns its logits_BxTxV and the cache to continue from."""
  if tokens_BxT.shape[1] > max_len:
    raise ValueError(f'a prompt of {tokens_BxT.shape[1]} tokens does not fit max_len={max_len}')
  cache = init_cache(cfg, tokens_BxT.shape[0], max_len)
  return Decoder(cfg).apply({'params': params}, tokens_BxT, cache)


def decode_step(cfg: ModelConfig, params, token_B: jax.Array,
                cache: dict) -> tuple[jax.Array, dict]:
  """One new token per row at position cache['index']: logits_BxV and the updated cache."""
  logits_Bx1xV, cache = Decoder(cfg).apply({'params': params}, token_B[:, None], cache)
  return logits_Bx1xV[:, 0], cache


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that take part in a matmul per token: blocks and the output head (for a mixture
  of experts, the router and the experts each token uses)."""
  attention = 2 * cfg.d_model * cfg.d_model + 2 * cfg.d_model * cfg.kv_heads * cfg.head_dim
  mlp = (3 if cfg.mlp == 'swiglu' else 2) * cfg.d_model * cfg.mlp_dim
  if cfg.num_experts:  # the router, and the experts a token is sent to: active parameters
    mlp = cfg.d_model * cfg.num_experts + cfg.experts_per_token * mlp
  return cfg.num_layers * (attention + mlp) + cfg.d_model * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward plus backward FLOPs of one token: 6 per matmul weight, plus attention's
  scores and weighted values (2 matmuls of keys x Dh per query head, forward 2 FLOPs per
  multiply-add, backward twice that), over all keys a query may see (seq_len, or the window),
  as in PaLM's MFU: not halved for causality.
  """
  keys = min(seq_len, cfg.window) if cfg.window else seq_len
  return 6 * matmul_params(cfg) + 12 * cfg.num_layers * keys * cfg.num_heads * cfg.head_dim
