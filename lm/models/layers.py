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
    logits_BxHxTxS = jnp.einsum('bthd,bshd->bhts', q_BxTxHxDh, k_BxSxHxDh,
                                preferred_element_type=jnp.float32) / jnp.sqrt(self.head_dim)
    length = x_BxTxD.shape[1]
    logits_BxHxTxS = jnp.where(causal_mask(length), logits_BxHxTxS, jnp.finfo(jnp.float32).min)
    att_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1).astype(self.dtype)
    out_BxTxHxDh = jnp.einsum('bhts,bshd->bthd', att_BxHxTxS, v_BxSxHxDh)
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
