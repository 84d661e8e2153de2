"""MLPs: dense (GELU, ReLU), gated (SwiGLU, GeGLU; gate and up as one matmul), and a mixture of
SwiGLU experts with its load-balancing loss."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models.layers.common import (DenseParams, INIT_STD, fused_projection, matrix, normal,
                                     zeros)


GATED = ('swiglu', 'geglu')  # MLP kinds of a gate and an up projection


def activation(mlp: str):
  """The nonlinearity of an MLP kind: GELU with the tanh approximation (`gelu`, GPT-2; and
  `geglu`'s gate, T5 v1.1), exact GELU (`gelu_exact`, BERT), ReLU (`relu`, the original
  transformer and T5), squared ReLU (`relu2`, Primer), or SiLU (`swiglu`'s gate)."""
  gelu = lambda x: jax.nn.gelu(x, approximate=True)
  return {'gelu': gelu, 'geglu': gelu, 'gelu_exact': lambda x: jax.nn.gelu(x, approximate=False),
          'relu': jax.nn.relu, 'relu2': lambda x: jnp.square(jax.nn.relu(x)),
          'swiglu': nn.silu}[mlp]


class Mlp(nn.Module):
  """`gelu`, `gelu_exact`, `relu`: Dense -> the activation -> Dense.
  `swiglu` (`geglu`): down(silu(gate(x)) * up(x)) as Llama (GELU for silu: T5 v1.1); gate and
  up run as one matmul (their kernels side by side), their parameters kept apart.
  The down kernel may come transposed, as `down/kernel_T` (decoder.decoding_params)."""
  kind: str
  mlp_dim: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  out_std: float = INIT_STD

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    def dense(features: int, axes: tuple[str, str], name: str, std: float = INIT_STD):
      return nn.Dense(features, dtype=self.dtype, use_bias=self.use_bias, name=name,
                      kernel_init=matrix(axes, std), bias_init=zeros(axes[1:]))
    if self.kind in GATED:
      d_model, f = x_BxTxD.shape[-1], self.mlp_dim
      h_BxTx2F = fused_projection(x_BxTxD, [
          DenseParams(f, self.use_bias, ('embed', 'mlp'), name=name)(d_model)
          for name in ('gate', 'up')], self.dtype)
      h_BxTxF = activation(self.kind)(h_BxTx2F[..., :f]) * h_BxTx2F[..., f:]
    else:
      h_BxTxF = activation(self.kind)(dense(self.mlp_dim, ('embed', 'mlp'), 'up')(x_BxTxD))
    h_BxTxF = nn.with_logical_constraint(h_BxTxF, ('batch', 'length', 'mlp'))
    down = self.get_variable('params', 'down')  # None while initialising
    if down is not None and 'kernel_T' in down:  # laid out for decoding one row on CPU
      y_BxTxD = jnp.einsum('btf,df->btd', h_BxTxF.astype(self.dtype),
                           down['kernel_T'].astype(self.dtype))
      return y_BxTxD + down['bias'].astype(self.dtype) if self.use_bias else y_BxTxD
    return dense(x_BxTxD.shape[-1], ('mlp', 'embed'), 'down', self.out_std)(h_BxTxF)


def grouped_matmul(xs_MxD: jax.Array, w_ExDxF: jax.Array, group_sizes_E: jax.Array,
                   block: int = 256) -> jax.Array:
  """Rows sorted by group times their group's matrix: what jax.lax.ragged_dot computes, as a
  batched matmul over blocks of rows (each group padded to whole blocks of `block` rows, at
  most E - 1 partial blocks of waste). XLA:CPU lowers ragged_dot to a masked matmul per group
  (E times the work); this is one dense batched matmul instead."""
  rows, num_groups = xs_MxD.shape[0], w_ExDxF.shape[0]
  block = max(8, min(block, rows // num_groups))  # few rows (decoding): small blocks
  num_blocks = rows // block + num_groups  # >= sum of ceil(size / block)
  blocks_E = (group_sizes_E + block - 1) // block
  first_block_E = jnp.cumsum(blocks_E) - blocks_E
  group_M = jnp.repeat(jnp.arange(num_groups), group_sizes_E, total_repeat_length=rows)
  offset_M = jnp.arange(rows) - (jnp.cumsum(group_sizes_E) - group_sizes_E)[group_M]
  slot_M = first_block_E[group_M] * block + offset_M
  xs_NxBxD = jnp.zeros((num_blocks * block, xs_MxD.shape[1]), xs_MxD.dtype).at[slot_M].set(
      xs_MxD).reshape(num_blocks, block, -1)
  group_N = jnp.minimum(jnp.searchsorted(jnp.cumsum(blocks_E), jnp.arange(num_blocks),
                                         side='right'), num_groups - 1)
  ys_NxBxF = jnp.einsum('nbd,ndf->nbf', xs_NxBxD, w_ExDxF[group_N])
  return ys_NxBxF.reshape(num_blocks * block, -1)[slot_M]


def dropless_experts(x_NxD: jax.Array, experts_NxK: jax.Array, weights_NxK: jax.Array,
                     gate_up_ExDx2F: jax.Array, down_ExFxD: jax.Array,
                     matmul=grouped_matmul) -> jax.Array:
  """y_NxD of SwiGLU experts that drop no assignment: the N * k assignments sorted by expert,
  each expert multiplying only its own rows through `matmul(rows_MxD, w_ExDxF, group_sizes_E)`
  (grouped_matmul; jax.lax.ragged_dot has the same contract), weighted back per token."""
  k, f = experts_NxK.shape[1], down_ExFxD.shape[1]
  order_M = jnp.argsort(experts_NxK.reshape(-1))  # M = N * k assignments, by expert
  group_sizes_E = jnp.bincount(experts_NxK.reshape(-1), length=down_ExFxD.shape[0]
                               ).astype(jnp.int32)
  h_Mx2F = matmul(x_NxD[order_M // k].astype(gate_up_ExDx2F.dtype), gate_up_ExDx2F,
                  group_sizes_E)
  ys_MxD = matmul(nn.silu(h_Mx2F[:, :f]) * h_Mx2F[:, f:], down_ExFxD, group_sizes_E)
  y_NxKxD = jnp.zeros_like(ys_MxD).at[order_M].set(ys_MxD).reshape(-1, k, x_NxD.shape[1])
  return jnp.einsum('nkd,nk->nd', y_NxKxD, weights_NxK.astype(y_NxKxD.dtype))


def capacity_slots(experts_NxK: jax.Array, num_experts: int, capacity: int
                   ) -> tuple[jax.Array, jax.Array]:
  """Each of the N * k assignments' slot in its expert's group of `capacity` rows, and whether
  it was kept: slot_KxN in [0, E * capacity], E * capacity for a dropped assignment, kept_KxN.
  An expert fills its rows by priority: every token's first choice before any second choice
  (GShard), and within a choice, earlier tokens first."""
  experts_M = experts_NxK.T.reshape(-1)  # M = k * N assignments, choice-major
  onehot_MxE = jax.nn.one_hot(experts_M, num_experts, dtype=jnp.int32)
  position_M = jnp.sum((jnp.cumsum(onehot_MxE, axis=0) - 1) * onehot_MxE, axis=1)
  kept_M = position_M < capacity
  slot_M = jnp.where(kept_M, experts_M * capacity + position_M, num_experts * capacity)
  k = experts_NxK.shape[1]
  return slot_M.reshape(k, -1), kept_M.reshape(k, -1)


class MoeMlp(nn.Module):
  """A mixture of SwiGLU experts, as Mixtral: a softmax router picks each token's top
  `experts_per_token` experts, their weights renormalised to sum to 1.
  - capacity_factor 0 (default): no token is dropped. The assignments are sorted by expert and
    each expert multiplies only its own tokens (`grouped_matmul`), so compute follows the
    active, not the total, parameters.
  - capacity_factor c > 0: each expert takes at most ceil(c * N * k / E) of the N tokens'
    assignments (`capacity_slots`: first choices first); an assignment past its expert's
    capacity is dropped (it adds nothing: a token whose choices are all dropped passes through
    the residual alone). The experts then run as one batched matmul over [E, capacity] rows.
  Returns y_BxTxD and its router statistics over the N tokens: the mean router probability of
  each expert and the share of assignments to it (float32 [E], for `load_balancing_loss`), and
  the share of assignments dropped (a float32 scalar; 0 without a capacity)."""
  num_experts: int
  experts_per_token: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  out_std: float = INIT_STD
  capacity_factor: float = 0.0

  def capacity(self, tokens: int) -> int:
    """Rows an expert takes: ceil(capacity_factor * tokens * k / E), at most all tokens."""
    share = self.capacity_factor * tokens * self.experts_per_token / self.num_experts
    return min(tokens, max(1, math.ceil(share)))

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    batch, length, d_model = x_BxTxD.shape
    e, k, f = self.num_experts, self.experts_per_token, self.mlp_dim
    x_NxD = x_BxTxD.reshape(-1, d_model)
    router_DxE = self.param('router', normal(('embed', 'experts')), (d_model, e))
    probs_NxE = jax.nn.softmax(x_NxD.astype(jnp.float32) @ router_DxE, axis=-1)
    weights_NxK, experts_NxK = jax.lax.top_k(probs_NxE, k)
    weights_NxK = weights_NxK / jnp.sum(weights_NxK, axis=-1, keepdims=True)
    gate_ExDxF = self.param('gate', matrix(('experts', 'embed', 'mlp')), (e, d_model, f))
    up_ExDxF = self.param('up', matrix(('experts', 'embed', 'mlp')), (e, d_model, f))
    down_ExFxD = self.param('down', matrix(('experts', 'mlp', 'embed'), self.out_std),
                            (e, f, d_model))
    cast = lambda w: w.astype(self.dtype)
    gate_up_ExDx2F = cast(jnp.concatenate([gate_ExDxF, up_ExDxF], axis=2))  # one pass, as Mlp
    if self.capacity_factor:
      y_NxD, dropped = self._with_capacity(x_NxD, experts_NxK, weights_NxK, gate_up_ExDx2F,
                                           cast(down_ExFxD))
    else:
      y_NxD = dropless_experts(x_NxD, experts_NxK, weights_NxK, gate_up_ExDx2F, cast(down_ExFxD))
      dropped = jnp.zeros((), jnp.float32)
    stats = (jnp.mean(probs_NxE, 0), jnp.mean(jax.nn.one_hot(experts_NxK, e).sum(axis=1), 0),
             dropped)
    return y_NxD.reshape(batch, length, d_model), stats

  def _with_capacity(self, x_NxD, experts_NxK, weights_NxK, gate_up_ExDx2F, down_ExFxD):
    """The experts over fixed groups of `capacity` rows: (y_NxD, the share dropped)."""
    tokens, d_model = x_NxD.shape
    e, k, c = self.num_experts, self.experts_per_token, self.capacity(tokens)
    f = down_ExFxD.shape[1]
    swiglu = lambda h: nn.silu(h[..., :f]) * h[..., f:]
    slot_KxN, kept_KxN = capacity_slots(experts_NxK, e, c)
    token_S = jnp.full((e * c + 1,), tokens, jnp.int32).at[slot_KxN.reshape(-1)].set(
        jnp.tile(jnp.arange(tokens, dtype=jnp.int32), k))[:-1]  # an empty slot: row `tokens`
    x_padded = jnp.concatenate([x_NxD, jnp.zeros((1, d_model), x_NxD.dtype)]).astype(self.dtype)
    xs_ExCxD = x_padded[token_S].reshape(e, c, d_model)
    h_ExCxF = swiglu(jnp.einsum('ecd,edf->ecf', xs_ExCxD, gate_up_ExDx2F))
    ys_SxD = jnp.einsum('ecf,efd->ecd', h_ExCxF, down_ExFxD).reshape(e * c, d_model)
    ys_SxD = jnp.concatenate([ys_SxD, jnp.zeros((1, d_model), ys_SxD.dtype)])  # the dropped slot
    y_KxNxD = ys_SxD[slot_KxN]
    y_NxD = jnp.einsum('knd,nk->nd', y_KxNxD, weights_NxK.astype(y_KxNxD.dtype))
    return y_NxD, 1.0 - jnp.mean(kept_KxN.astype(jnp.float32))


def load_balancing_loss(probs: list[jax.Array], shares: list[jax.Array]) -> jax.Array:
  """Switch/Mixtral auxiliary loss over all MoE layers' tokens together from each layer's
  MoeMlp statistics ([E], or [R, E] stacked by nn.scan; every layer sees the same tokens, so
  the mean over layers is the mean over all their tokens):
  E * sum_e (share of assignments to e) * (mean router probability of e); 1 * k when balanced.
  """
  flat = lambda xs: jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in xs])  # [L, E]
  probs_LxE, shares_LxE = flat(probs), flat(shares)
  return probs_LxE.shape[-1] * jnp.sum(jnp.mean(shares_LxE, 0) * jnp.mean(probs_LxE, 0))
