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
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    out_std = layers.INIT_STD / math.sqrt(2 * cfg.num_layers)  # GPT-2's residual scaling
    h_BxTxD = layers.norm(cfg.norm, cfg.norm_eps, dtype, 'attn_norm')(x_BxTxD)
    x_BxTxD = x_BxTxD + layers.Attention(
        cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.use_bias,
        cfg.rope_theta if cfg.positions == 'rope' else 0.0, cfg.window, dtype, out_std,
        name='attn')(h_BxTxD)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ACTIVATION)
    h_BxTxD = layers.norm(cfg.norm, cfg.norm_eps, dtype, 'mlp_norm')(x_BxTxD)
    x_BxTxD = x_BxTxD + layers.Mlp(cfg.mlp, cfg.mlp_dim, cfg.use_bias, dtype, out_std,
                                   name='mlp')(h_BxTxD)
    return nn.with_logical_constraint(x_BxTxD, ACTIVATION)


class Decoder(nn.Module):
  """tokens_BxT (int) -> logits_BxTxV (float32)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, name='embed',
                     embedding_init=layers.normal(('vocab', 'embed')))
    x_BxTxD = embed(tokens_BxT)
    if cfg.positions == 'learned':
      pos_embed = nn.Embed(cfg.max_len, cfg.d_model, dtype=dtype, name='pos_embed',
                           embedding_init=layers.normal((None, 'embed'), 0.01))
      x_BxTxD = x_BxTxD + pos_embed(jnp.arange(tokens_BxT.shape[1]))[None]
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ACTIVATION)
    for i in range(cfg.num_layers):
      x_BxTxD = Block(cfg, name=f'block_{i}')(x_BxTxD)
    x_BxTxD = layers.norm(cfg.norm, cfg.norm_eps, dtype, 'final_norm')(x_BxTxD)
    if cfg.tie_embeddings:
      logits_BxTxV = embed.attend(x_BxTxD)
    else:
      logits_BxTxV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, name='head',
                              kernel_init=layers.normal(('embed', 'vocab')))(x_BxTxD)
    return nn.with_logical_constraint(logits_BxTxV.astype(jnp.float32),
                                      ('batch', 'length', 'vocab'))


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that take part in a matmul per token: blocks and the output head."""
  attention = 2 * cfg.d_model * cfg.d_model + 2 * cfg.d_model * cfg.kv_heads * cfg.head_dim
  mlp = (3 if cfg.mlp == 'swiglu' else 2) * cfg.d_model * cfg.mlp_dim
  return cfg.num_layers * (attention + mlp) + cfg.d_model * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward plus backward FLOPs of one token: 6 per matmul weight, plus attention's
  scores and weighted values (2 matmuls of keys x Dh per query head, forward 2 FLOPs per
  multiply-add, backward twice that), over all keys a query may see (seq_len, or the window),
  as in PaLM's MFU: not halved for causality.
  """
  keys = min(seq_len, cfg.window) if cfg.window else seq_len
  return 6 * matmul_params(cfg) + 12 * cfg.num_layers * keys * cfg.num_heads * cfg.head_dim
