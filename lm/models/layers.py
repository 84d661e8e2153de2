"""Layers shared by the model families. They know nothing of families, training or the mesh,
only logical axis names: `embed`, `mlp`, `heads`, `head_dim`, `vocab`, `experts`, `batch`,
`length`.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INIT_STD = 0.02

REMAT_POLICIES = {'full': None,  # keep only each block's input
                  'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def block_matmul_params(d_model: int, kv_width: int, mlp: str, mlp_dim: int) -> int:
  """Weights of one attention + dense MLP block that take part in a matmul per token:
  query and output D x D, key and value D x kv_width, MLP 2 (3 for SwiGLU) x D x F."""
  return 2 * d_model * (d_model + kv_width) + (3 if mlp == 'swiglu' else 2) * d_model * mlp_dim


def attention_flops_per_token(keys: int, num_heads: int, head_dim: int) -> int:
  """Training FLOPs of one query's scores and weighted values over `keys` keys: 2 matmuls of
  keys x Dh per head, 2 FLOPs a multiply-add forward and twice that backward (12 in all)."""
  return 12 * keys * num_heads * head_dim


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


def rope(x_BxTxHxDh: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, in the half-split layout of Llama and Hugging Face: dimension
  i and i + Dh/2 form a pair rotated by position * theta^(-2i/Dh). `positions` is [T] or, a
  position per row, [B, T]."""
  half = x_BxTxHxDh.shape[-1] // 2
  freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2 / x_BxTxHxDh.shape[-1])
  angle_Tx1xF = (positions.astype(jnp.float32)[..., None] * freq_F)[..., None, :]
  cos, sin = jnp.cos(angle_Tx1xF), jnp.sin(angle_Tx1xF)
  x1, x2 = x_BxTxHxDh[..., :half].astype(jnp.float32), x_BxTxHxDh[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxDh.dtype)


def visible(t: jax.Array, s: jax.Array, window: int | None) -> jax.Array:
  """Whether a query at position t sees the key at position s: s <= t, within the window."""
  return (s <= t) & ((t - s < window) if window is not None else True)


def attention(q_BxTxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array, *,
              causal: bool = True, window: int | None = None,
              key_valid_BxS: jax.Array | None = None, block: int = 128) -> jax.Array:
  """Softmax(q k^T / sqrt(Dh)) v over query blocks of `block` rows; causal (query t sees keys
  s <= t) or bidirectional (every key).

  K key/value heads serve H = K * G query heads (grouped-query attention; K = H is multi-head,
  K = 1 multi-query): query head k * G + g reads key/value head k. With a `window` (causal
  only) a query at t sees keys t - window + 1 .. t only. A causal query block [i, i + block)
  scores only the keys it can see, [i - window + 1, i + block): key blocks wholly outside are
  skipped, not masked. `key_valid_BxS` False marks padding keys, which no query sees.
  """
  batch, length, heads, head_dim = q_BxTxHxDh.shape
  kv_heads = k_BxSxKxDh.shape[2]
  q_BxTxKxGxDh = q_BxTxHxDh.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  outs = []
  for start in range(0, length, block):
    end = min(start + block, length)
    lo = max(0, start - window + 1) if causal and window is not None else 0
    hi = end if causal else k_BxSxKxDh.shape[1]
    logits_BxKxGxQxS = jnp.einsum('bqkgd,bskd->bkgqs', q_BxTxKxGxDh[:, start:end],
                                  k_BxSxKxDh[:, lo:hi],
                                  preferred_element_type=jnp.float32) * head_dim ** -0.5
    keys_S = jnp.arange(lo, hi)
    mask = (visible(jnp.arange(start, end)[:, None], keys_S[None, :], window)[None, None, None]
            if causal else None)
    if key_valid_BxS is not None:
      valid_Bx1x1x1xS = key_valid_BxS[:, None, None, None, lo:hi]
      mask = valid_Bx1x1x1xS if mask is None else mask & valid_Bx1x1x1xS
    if mask is not None:
      logits_BxKxGxQxS = jnp.where(mask, logits_BxKxGxQxS, jnp.finfo(jnp.float32).min)
    att_BxKxGxQxS = jax.nn.softmax(logits_BxKxGxQxS, axis=-1).astype(v_BxSxKxDh.dtype)
    outs.append(jnp.einsum('bkgqs,bskd->bqkgd', att_BxKxGxQxS, v_BxSxKxDh[:, lo:hi]))
  return jnp.concatenate(outs, axis=1).reshape(batch, length, heads, head_dim)


class Attention(nn.Module):
  """Self-attention, causal (decoders) or bidirectional (encoders): multi-head, grouped-query
  or multi-query; optional RoPE and (causal) sliding window. Query, key and value run as one
  matmul (their kernels side by side, the parameters kept apart): a decode step of the
  sampling benchmark's model at batch 8 takes about 10% less time than with three."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  use_bias: bool = True
  rope_theta: float = 0.0  # 0: no RoPE
  window: int | None = None
  dtype: jnp.dtype = jnp.float32
  out_std: float = INIT_STD
  causal: bool = True

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, cache: dict | None = None, index: jax.Array | int = 0,
               start_B: jax.Array | None = None, key_valid_BxT: jax.Array | None = None
               ) -> jax.Array | tuple[jax.Array, dict]:
    """Training: x_BxTxD -> y_BxTxD; key_valid_BxT False marks padding. Decoding (with a
    `cache` from `init_kv_cache`): the T new columns start at column `index` of the rows;
    T > 1 is a prefill into an empty cache, T = 1 a decode step. Row b is left-padded up to
    column start_B[b]: its positions count from there and its padding is never attended.
    Returns (y_BxTxD, cache)."""
    d_model, length = x_BxTxD.shape[-1], x_BxTxD.shape[1]

    h, k = self.num_heads, self.num_kv_heads
    qkv_BxTxH2KxDh = fused_projection(x_BxTxD, [
        DenseParams((heads, self.head_dim), self.use_bias, ('embed', 'heads', 'head_dim'),
                    name=name)(d_model)
        for heads, name in ((h, 'query'), (k, 'key'), (k, 'value'))], self.dtype)
    q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh = jnp.split(qkv_BxTxH2KxDh, [h, h + k], axis=2)
    columns_T = index + jnp.arange(length)
    if self.rope_theta:
      positions = columns_T if start_B is None else columns_T - start_B[:, None]
      q_BxTxHxDh = rope(q_BxTxHxDh, positions, self.rope_theta)
      k_BxTxKxDh = rope(k_BxTxKxDh, positions, self.rope_theta)
    if cache is not None and length == 1:
      cache = write_kv_cache(cache, k_BxTxKxDh, v_BxTxKxDh, columns_T)
      out_BxTxHxDh = cached_attention(q_BxTxHxDh, cache, columns_T[0], self.window, start_B)
    else:
      if start_B is not None:  # left padding
        key_valid_BxT = columns_T[None] >= start_B[:, None]
      out_BxTxHxDh = attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, causal=self.causal,
                               window=self.window, key_valid_BxS=key_valid_BxT)
      if cache is not None:
        cache = write_kv_cache(cache, k_BxTxKxDh, v_BxTxKxDh, columns_T)
    y_BxTxD = nn.Einsum((self.num_heads, self.head_dim, d_model), 'bthk,hkd->btd', name='out',
                        dtype=self.dtype, use_bias=self.use_bias,
                        kernel_init=normal(('heads', 'head_dim', 'embed'), self.out_std),
                        bias_init=zeros(('embed',)))(out_BxTxHxDh.astype(self.dtype))
    return y_BxTxD if cache is None else (y_BxTxD, cache)


def init_kv_cache(batch: int, max_len: int, kv_heads: int, head_dim: int,
                  window: int | None = None, dtype=jnp.float32) -> dict:
  """Keys and values of up to max_len columns, each a tuple of blocks of slots (`block_sizes`),
  [B * K, block, Dh] (row b's key/value head k at b * K + k): a decode step reads the filled
  blocks whole, with no copy. (XLA:CPU copies any slice of an array before a matmul reads
  it: with one [B * K, S, Dh] array, the copies of the filled prefix cost more than the
  attention; and stored [B, K, ...], a batch of 1 was reshaped for the matmul and the cache
  copied three times a step.) With a window, a rolling buffer of `window` slots (column p in
  slot p % window), so memory does not grow with the sequence. `pos` holds the column in each
  slot, -1 while empty."""
  slots = min(max_len, window) if window is not None else max_len
  blocks = lambda: tuple(jnp.zeros((batch * kv_heads, size, head_dim), dtype)
                         for size in block_sizes(slots))
  return {'k': blocks(), 'v': blocks(), 'pos': jnp.full((slots,), -1, jnp.int32)}


CACHE_BLOCK = 64  # a cache's blocks are (a multiple of) this many slots


def block_sizes(slots: int, most: int = 8) -> list[int]:
  """The sizes of a cache's blocks: CACHE_BLOCK slots, or a multiple of it so that there are
  at most `most` blocks, the last one what is left."""
  block = max(CACHE_BLOCK, -(-slots // most // CACHE_BLOCK) * CACHE_BLOCK)
  return [min(block, slots - start) for start in range(0, slots, block)]


def write_kv_cache(cache: dict, k_BxTxKxDh: jax.Array, v_BxTxKxDh: jax.Array,
                   positions_T: jax.Array) -> dict:
  slots = cache['pos'].shape[0]
  sizes = [block.shape[1] for block in cache['k']]
  batch, length, kv_heads, head_dim = k_BxTxKxDh.shape
  rows = lambda x_BxTxKxDh, c: x_BxTxKxDh.transpose(0, 2, 1, 3).reshape(
      batch * kv_heads, length, head_dim).astype(c[0].dtype)
  k_NxTxDh, v_NxTxDh = rows(k_BxTxKxDh, cache['k']), rows(v_BxTxKxDh, cache['v'])
  if length == 1:  # a decode step: in place, one slot of each block
    slot = positions_T[0] % slots

    def write(blocks, x_Nx1xDh):  # (a block other than the slot's rewrites its old value)
      out = []
      for start, block in zip(np.cumsum([0] + sizes[:-1]), blocks):
        at = jnp.clip(slot - start, 0, block.shape[1] - 1)
        mine = (slot >= start) & (slot < start + block.shape[1])
        old_Nx1xDh = jax.lax.dynamic_slice_in_dim(block, at, 1, 1)
        out.append(jax.lax.dynamic_update_slice_in_dim(
            block, jnp.where(mine, x_Nx1xDh, old_Nx1xDh), at, 1))
      return tuple(out)
    return {**cache, 'k': write(cache['k'], k_NxTxDh), 'v': write(cache['v'], v_NxTxDh),
            'pos': jax.lax.dynamic_update_slice_in_dim(
                cache['pos'], positions_T.astype(jnp.int32), slot, 0)}
  keep = min(slots, length)  # a prefill longer than the window keeps its last `slots` columns
  where_T = positions_T[-keep:] % slots

  def write(blocks, x_NxTxDh):  # a prefill: once, so the blocks are joined and split again
    joined = jnp.concatenate(blocks, axis=1).at[:, where_T].set(x_NxTxDh[:, -keep:])
    return tuple(jnp.split(joined, np.cumsum(sizes)[:-1], axis=1))
  return {**cache, 'k': write(cache['k'], k_NxTxDh), 'v': write(cache['v'], v_NxTxDh),
          'pos': cache['pos'].at[where_T].set(positions_T[-keep:].astype(jnp.int32))}


def cached_attention(q_Bx1xHxDh: jax.Array, cache: dict, t: jax.Array,
                     window: int | None = None, start_B: jax.Array | None = None):
  """The query at column t over the cached keys it may see (from column start_B[b] on).

  Only the filled blocks of the cache are read (a jax.lax.switch on their number): a full
  cache holds column p in slot p, so the blocks past slot t are still empty. On the sampling
  benchmark (272 slots in blocks of 64), against one [B * K, S, Dh] array whose filled prefix
  was sliced: a decode step at batch 8 -9% (median of 10 interleaved runs), 4 beams -3%,
  batch 1 +3% (the per-block writes)."""
  sizes = [block.shape[1] for block in cache['k']]
  branch = jnp.sum(t >= np.cumsum(sizes)[:-1])  # the block of slot t (past the last: full)
  return jax.lax.switch(  # one block (a short cache): called directly, no conditional
      branch, [functools.partial(attention_over_blocks, n, window=window)
               for n in range(1, len(sizes) + 1)],
      q_Bx1xHxDh, cache, t, start_B)


def attention_over_blocks(n: int, q_Bx1xHxDh: jax.Array, cache: dict, t: jax.Array,
                          start_B: jax.Array | None, window: int | None) -> jax.Array:
  """cached_attention over the cache's first n blocks: a matmul per block, one softmax.

  With cache['beam_row'] [P, R, S] (beam search, decoder.reorder_beams), the B = P * R rows
  are P prompts' R beams each, and beam j of prompt p finds slot s in row beam_row[p, j, s] of
  its prompt's rows, so that reordering the beams moves no key or value. Each cache row is
  then read once, by the R queries of its group (a matmul of R rows where a plain cache has
  one), and each beam keeps the logits of its own rows."""
  batch, _, heads, head_dim = q_Bx1xHxDh.shape
  ks, vs = cache['k'][:n], cache['v'][:n]
  slots = sum(k.shape[1] for k in ks)
  pos_S = cache['pos'][:slots]
  kv_heads = ks[0].shape[0] // batch
  group = cache['beam_row'].shape[1] if 'beam_row' in cache else 1
  prompts, g = batch // group, heads // kv_heads
  # Row (p, r, k) of the cache (prompt p, its beam r, kv head k) meets the queries of every
  # beam j of prompt p on kv head k: [P * R * K, J * G, Dh] with J = R.
  q_PxJxKxGxDh = q_Bx1xHxDh.reshape(prompts, group, kv_heads, g, head_dim)
  q_PxKxJGxDh = q_PxJxKxGxDh.transpose(0, 2, 1, 3, 4).reshape(
      prompts, 1, kv_heads, group * g, head_dim)
  q_NxMxDh = jnp.broadcast_to(q_PxKxJGxDh, (prompts, group, kv_heads, group * g, head_dim)
                              ).reshape(batch * kv_heads, group * g, head_dim)
  logits_NxMxS = jnp.concatenate([  # (keys as the matmul's left side: faster on CPU)
      jnp.einsum('nsd,nmd->nsm', k_NxSxDh, q_NxMxDh, preferred_element_type=jnp.float32)
      for k_NxSxDh in ks], axis=1).transpose(0, 2, 1)
  # -> [P, J, K, G, R, S]: a softmax over each beam's (row, slot) pairs.
  logits = logits_NxMxS.reshape(prompts, group, kv_heads, group, g, slots).transpose(
      0, 3, 2, 4, 1, 5)
  seen_S = (pos_S >= 0) & visible(t, pos_S, window)  # -1: empty
  seen = seen_S[None, None, None, None, None]
  if start_B is not None:
    seen = seen & (pos_S >= start_B.reshape(prompts, group, 1, 1, 1, 1))
  if group > 1:  # a beam's slot is read from one row of its group
    row_PxJxS = cache['beam_row'][..., :slots]
    seen = seen & (row_PxJxS[:, :, None, None, None] == jnp.arange(group)[:, None])
  logits = jnp.where(seen, logits * head_dim ** -0.5, jnp.finfo(jnp.float32).min)
  att = jax.nn.softmax(logits.reshape(prompts, group, kv_heads, g, group * slots), axis=-1)
  att_NxMxS = att.reshape(prompts, group, kv_heads, g, group, slots).transpose(
      0, 4, 2, 1, 3, 5).reshape(batch * kv_heads, group * g, slots).astype(vs[0].dtype)
  att_per_block = jnp.split(att_NxMxS, np.cumsum([v.shape[1] for v in vs])[:-1], axis=-1)
  out_NxMxDh = sum(jnp.einsum('nms,nsd->nmd', a_NxMxS, v_NxSxDh)
                   for a_NxMxS, v_NxSxDh in zip(att_per_block, vs))
  out_PxRxKxJxGxDh = out_NxMxDh.reshape(prompts, group, kv_heads, group, g, head_dim)
  return out_PxRxKxJxGxDh.sum(axis=1).transpose(0, 2, 1, 3, 4).reshape(
      batch, 1, heads, head_dim)


class DenseParams(nn.Module):
  """The parameters of a projection to `features` (an int, or a shape as nn.Einsum's):
  `kernel` [in_features, *features] and `bias` [*features], for a caller that fuses several
  projections of one input into one matmul. `axes` names the kernel's axes."""
  features: int | tuple[int, ...]
  use_bias: bool
  axes: tuple[str, ...]

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    kernel = self.param('kernel', normal(self.axes), (in_features, *features))
    bias = self.param('bias', zeros(self.axes[1:]), features) if self.use_bias else None
    return kernel, bias


def fused_projection(x_BxTxD: jax.Array, params: list[tuple[jax.Array, jax.Array | None]],
                     dtype) -> jax.Array:
  """x times several projections' kernels ([D, *features] each, from DenseParams) side by side
  on their first feature axis, in one matmul, plus their biases: [B, T, sum of features[0],
  *features[1:]]."""
  kernel = jnp.concatenate([kernel for kernel, _ in params], axis=1).astype(dtype)
  y = jnp.einsum('btd,d...->bt...', x_BxTxD.astype(dtype), kernel)
  if params[0][1] is not None:
    y = y + jnp.concatenate([bias for _, bias in params]).astype(dtype)
  return y


def activation(mlp: str):
  """The nonlinearity of an MLP kind: GELU with the tanh approximation (`gelu`, GPT-2), exact
  GELU (`gelu_exact`, BERT), or SiLU (`swiglu`'s gate)."""
  return {'gelu': lambda x: jax.nn.gelu(x, approximate=True),
          'gelu_exact': lambda x: jax.nn.gelu(x, approximate=False), 'swiglu': nn.silu}[mlp]


class Mlp(nn.Module):
  """`gelu`, `gelu_exact`: Dense -> GELU (tanh approximation as GPT-2, or exact as BERT) ->
  Dense.
  `swiglu`: down(silu(gate(x)) * up(x)), as Llama; gate and up run as one matmul (their
  kernels side by side: about 20% faster on CPU than two), their parameters kept apart.
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
                      kernel_init=normal(axes, std), bias_init=zeros(axes[1:]))
    if self.kind == 'swiglu':
      d_model, f = x_BxTxD.shape[-1], self.mlp_dim
      h_BxTx2F = fused_projection(x_BxTxD, [
          DenseParams(f, self.use_bias, ('embed', 'mlp'), name=name)(d_model)
          for name in ('gate', 'up')], self.dtype)
      h_BxTxF = nn.silu(h_BxTx2F[..., :f]) * h_BxTx2F[..., f:]
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
  (E times the work, ~10x slower here); this is one dense batched matmul instead."""
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


class MoeMlp(nn.Module):
  """A mixture of SwiGLU experts, as Mixtral: a softmax router picks each token's top
  `experts_per_token` experts, their weights renormalised to sum to 1; no token is dropped.
  The assignments are sorted by expert and each expert multiplies only its own tokens
  (`grouped_matmul`), so compute follows the active, not the total, parameters.
  Sows `router_probs` and `expert_mask` ([N, E]) for `load_balancing_loss`."""
  num_experts: int
  experts_per_token: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  out_std: float = INIT_STD

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    batch, length, d_model = x_BxTxD.shape
    e, k, f = self.num_experts, self.experts_per_token, self.mlp_dim
    x_NxD = x_BxTxD.reshape(-1, d_model)
    router_DxE = self.param('router', normal(('embed', 'experts')), (d_model, e))
    probs_NxE = jax.nn.softmax(x_NxD.astype(jnp.float32) @ router_DxE, axis=-1)
    weights_NxK, experts_NxK = jax.lax.top_k(probs_NxE, k)
    weights_NxK = weights_NxK / jnp.sum(weights_NxK, axis=-1, keepdims=True)
    self.sow('intermediates', 'router_probs', probs_NxE)
    self.sow('intermediates', 'expert_mask', jax.nn.one_hot(experts_NxK, e).sum(axis=1))
    gate_ExDxF = self.param('gate', normal(('experts', 'embed', 'mlp')), (e, d_model, f))
    up_ExDxF = self.param('up', normal(('experts', 'embed', 'mlp')), (e, d_model, f))
    down_ExFxD = self.param('down', normal(('experts', 'mlp', 'embed'), self.out_std),
                            (e, f, d_model))
    order_M = jnp.argsort(experts_NxK.reshape(-1))  # M = N * k assignments, by expert
    group_sizes_E = jnp.bincount(experts_NxK.reshape(-1), length=e).astype(jnp.int32)
    xs_MxD = x_NxD[order_M // k].astype(self.dtype)
    cast = lambda w: w.astype(self.dtype)
    h_Mx2F = grouped_matmul(xs_MxD, cast(jnp.concatenate([gate_ExDxF, up_ExDxF], axis=2)),
                            group_sizes_E)  # gate and up in one pass, as in Mlp
    h_MxF = nn.silu(h_Mx2F[:, :f]) * h_Mx2F[:, f:]
    ys_MxD = grouped_matmul(h_MxF, cast(down_ExFxD), group_sizes_E)
    y_NxKxD = jnp.zeros_like(ys_MxD).at[order_M].set(ys_MxD).reshape(-1, k, d_model)
    y_NxD = jnp.einsum('nkd,nk->nd', y_NxKxD, weights_NxK.astype(y_NxKxD.dtype))
    return y_NxD.reshape(batch, length, d_model)


def load_balancing_loss(router_probs: list[jax.Array], expert_masks: list[jax.Array]):
  """Switch/Mixtral auxiliary loss over all MoE layers' tokens together:
  E * sum_e (share of assignments to e) * (mean router probability of e); 1 * k when balanced.
  """
  flat = lambda xs: jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in xs])  # scan: [L, N, E]
  probs_NxE, mask_NxE = flat(router_probs), flat(expert_masks)
  return probs_NxE.shape[-1] * jnp.sum(jnp.mean(mask_NxE, 0) * jnp.mean(probs_NxE, 0))
