"""Layers shared by the model families. They know nothing of families, training or the mesh,
only logical axis names: `embed`, `mlp`, `heads`, `head_dim`, `vocab`, `batch`, `length`.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

INIT_STD = 0.02


def normal(axes: tuple[str | None, ...], std: float = INIT_STD):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def zeros(axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def norm(kind: str, eps: float, dtype, name: str) -> nn.Module:
  """`layernorm` (scale and bias) or `rmsnorm` (scale only), over the last axis."""
  scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',))
  if kind == 'rmsnorm':
    return nn.RMSNorm(epsilon=eps, dtype=dtype, scale_init=scale_init, name=name)
  return nn.LayerNorm(epsilon=eps, dtype=dtype, scale_init=scale_init,
                      bias_init=zeros(('embed',)), name=name)


def causal_mask(length: int) -> jax.Array:
  """[T, T] booleans: query t may attend to keys s <= t."""
  return jnp.tril(jnp.ones((length, length), bool))


def rope(x_BxTxHxDh: jax.Array, positions_T: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, in the half-split layout of Llama and Hugging Face: dimension
  i and i + Dh/2 form a pair rotated by position * theta^(-2i/Dh)."""
  half = x_BxTxHxDh.shape[-1] // 2
  freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2 / x_BxTxHxDh.shape[-1])
  angle_Tx1xF = (positions_T.astype(jnp.float32)[:, None] * freq_F)[:, None, :]
  cos, sin = jnp.cos(angle_Tx1xF), jnp.sin(angle_Tx1xF)
  x1, x2 = x_BxTxHxDh[..., :half].astype(jnp.float32), x_BxTxHxDh[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxDh.dtype)


def causal_attention(q_BxTxHxDh: jax.Array, k_BxTxKxDh: jax.Array, v_BxTxKxDh: jax.Array,
                     window: int = 0, block: int = 128) -> jax.Array:
  """Softmax(q k^T / sqrt(Dh)) v, causal, over query blocks of `block` rows.

  K key/value heads serve H = K * G query heads (grouped-query attention; K = H is multi-head,
  K = 1 multi-query): query head k * G + g reads key/value head k. With `window` > 0 a query
  at t sees keys t - window + 1 .. t only. Query block [i, i + block) scores only the keys it
  can see, [i - window + 1, i + block): key blocks wholly outside are skipped, not masked.
  """
  batch, length, heads, head_dim = q_BxTxHxDh.shape
  kv_heads = k_BxTxKxDh.shape[2]
  q_BxTxKxGxDh = q_BxTxHxDh.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  outs = []
  for start in range(0, length, block):
    end = min(start + block, length)
    lo = max(0, start - window + 1) if window else 0
    logits_BxKxGxQxS = jnp.einsum('bqkgd,bskd->bkgqs', q_BxTxKxGxDh[:, start:end],
                                  k_BxTxKxDh[:, lo:end],
                                  preferred_element_type=jnp.float32) * head_dim ** -0.5
    t_Qx1, s_1xS = jnp.arange(start, end)[:, None], jnp.arange(lo, end)[None, :]
    visible_QxS = (s_1xS <= t_Qx1) & ((t_Qx1 - s_1xS < window) if window else True)
    logits_BxKxGxQxS = jnp.where(visible_QxS, logits_BxKxGxQxS, jnp.finfo(jnp.float32).min)
    att_BxKxGxQxS = jax.nn.softmax(logits_BxKxGxQxS, axis=-1).astype(v_BxTxKxDh.dtype)
    outs.append(jnp.einsum('bkgqs,bskd->bqkgd', att_BxKxGxQxS, v_BxTxKxDh[:, lo:end]))
  return jnp.concatenate(outs, axis=1).reshape(batch, length, heads, head_dim)


class Attention(nn.Module):
  """Causal self-attention: multi-head, grouped-query or multi-query; optional RoPE and
  sliding window."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  use_bias: bool = True
  rope_theta: float = 0.0  # 0: no RoPE
  window: int = 0
  dtype: jnp.dtype = jnp.float32
  out_std: float = INIT_STD

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    d_model = x_BxTxD.shape[-1]

    def proj(heads: int, name: str) -> jax.Array:
      return nn.Einsum((d_model, heads, self.head_dim), 'btd,dhk->bthk', name=name,
                       dtype=self.dtype, use_bias=self.use_bias,
                       kernel_init=normal(('embed', 'heads', 'head_dim')),
                       bias_init=zeros(('heads', 'head_dim')))(x_BxTxD)
    q_BxTxHxDh = proj(self.num_heads, 'query')
    k_BxTxKxDh = proj(self.num_kv_heads, 'key')
    v_BxTxKxDh = proj(self.num_kv_heads, 'value')
    if self.rope_theta:
      positions_T = jnp.arange(x_BxTxD.shape[1])
      q_BxTxHxDh = rope(q_BxTxHxDh, positions_T, self.rope_theta)
      k_BxTxKxDh = rope(k_BxTxKxDh, positions_T, self.rope_theta)
    out_BxTxHxDh = causal_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, self.window)
    return nn.Einsum((self.num_heads, self.head_dim, d_model), 'bthk,hkd->btd', name='out',
                     dtype=self.dtype, use_bias=self.use_bias,
                     kernel_init=normal(('heads', 'head_dim', 'embed'), self.out_std),
                     bias_init=zeros(('embed',)))(out_BxTxHxDh.astype(self.dtype))


class Mlp(nn.Module):
  """`gelu`: Dense -> GELU (tanh approximation, as GPT-2) -> Dense.
  `swiglu`: down(silu(gate(x)) * up(x)), as Llama."""
  kind: str
  mlp_dim: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  out_std: float = INIT_STD

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    def dense(features: int, axes: tuple[str, str], name: str, std: float = INIT_STD):
      return nn.Dense(features, dtype=self.dtype, use_bias=self.use_bias, name=name,
                      kernel_init=normal(axes, std), bias_init=zeros(axes[1:]))
    h_BxTxF = dense(self.mlp_dim, ('embed', 'mlp'), 'up')(x_BxTxD)
    if self.kind == 'swiglu':
      h_BxTxF = nn.silu(dense(self.mlp_dim, ('embed', 'mlp'), 'gate')(x_BxTxD)) * h_BxTxF
    else:
      h_BxTxF = jax.nn.gelu(h_BxTxF, approximate=True)
    h_BxTxF = nn.with_logical_constraint(h_BxTxF, ('batch', 'length', 'mlp'))
    return dense(x_BxTxD.shape[-1], ('mlp', 'embed'), 'down', self.out_std)(h_BxTxF)
