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


def layer_norm(dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                              ('embed',)),
                      bias_init=zeros(('embed',)))


def causal_mask(length: int) -> jax.Array:
  """[T, T] booleans: query t may attend to keys s <= t."""
  return jnp.tril(jnp.ones((length, length), bool))


def causal_attention(q_BxTxHxDh: jax.Array, k_BxTxHxDh: jax.Array, v_BxTxHxDh: jax.Array,
                     block: int = 128) -> jax.Array:
  """Softmax(q k^T / sqrt(Dh)) v with causal masking, over query blocks of `block` rows.

  Query block [i, i + block) only scores keys [0, i + block): the key blocks wholly in its
  future are skipped, not computed and masked, which saves up to half of the work.
  """
  length, scale = q_BxTxHxDh.shape[1], q_BxTxHxDh.shape[-1] ** -0.5
  outs = []
  for start in range(0, length, block):
    end = min(start + block, length)
    logits_BxHxQxS = jnp.einsum('bqhd,bshd->bhqs', q_BxTxHxDh[:, start:end], k_BxTxHxDh[:, :end],
                                preferred_element_type=jnp.float32) * scale
    mask_QxS = causal_mask(end)[start:end]
    logits_BxHxQxS = jnp.where(mask_QxS, logits_BxHxQxS, jnp.finfo(jnp.float32).min)
    att_BxHxQxS = jax.nn.softmax(logits_BxHxQxS, axis=-1).astype(v_BxTxHxDh.dtype)
    outs.append(jnp.einsum('bhqs,bshd->bqhd', att_BxHxQxS, v_BxTxHxDh[:, :end]))
  return jnp.concatenate(outs, axis=1)


class Attention(nn.Module):
  """Multi-head causal self-attention."""
  num_heads: int
  head_dim: int
  dtype: jnp.dtype = jnp.float32
  out_std: float = INIT_STD

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    d_model, shape = x_BxTxD.shape[-1], (x_BxTxD.shape[-1], self.num_heads, self.head_dim)
    proj = functools.partial(nn.Einsum, shape, 'btd,dhk->bthk', dtype=self.dtype,
                             kernel_init=normal(('embed', 'heads', 'head_dim')),
                             bias_init=zeros(('heads', 'head_dim')))
    q_BxTxHxDh = proj(name='query')(x_BxTxD)
    k_BxSxHxDh = proj(name='key')(x_BxTxD)
    v_BxSxHxDh = proj(name='value')(x_BxTxD)
    out_BxTxHxDh = causal_attention(q_BxTxHxDh, k_BxSxHxDh, v_BxSxHxDh).astype(self.dtype)
    return nn.Einsum((self.num_heads, self.head_dim, d_model), 'bthk,hkd->btd', name='out',
                     dtype=self.dtype, kernel_init=normal(('heads', 'head_dim', 'embed'),
                                                          self.out_std),
                     bias_init=zeros(('embed',)))(out_BxTxHxDh)


class GeluMlp(nn.Module):
  """Dense -> GELU (tanh approximation, as GPT-2) -> Dense."""
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  out_std: float = INIT_STD

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    h_BxTxF = nn.Dense(self.mlp_dim, dtype=self.dtype, name='up',
                       kernel_init=normal(('embed', 'mlp')), bias_init=zeros(('mlp',)))(x_BxTxD)
    h_BxTxF = nn.with_logical_constraint(jax.nn.gelu(h_BxTxF, approximate=True),
                                         ('batch', 'length', 'mlp'))
    return nn.Dense(x_BxTxD.shape[-1], dtype=self.dtype, name='down',
                    kernel_init=normal(('mlp', 'embed'), self.out_std),
                    bias_init=zeros(('embed',)))(h_BxTxF)
