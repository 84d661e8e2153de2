"""Self-attention, causal or bidirectional: multi-head, grouped-query or multi-query, with RoPE,
a sliding window, a padding mask and an additive position bias (T5's); causal attention skips
the key blocks wholly in a query block's future. A decode step reads its keys and values from
lm.models.layers.kv_cache. Cross-attention: queries of one sequence over the keys and values
of another (an encoder's output), which can be projected once and kept for decoding."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm import backend
from lm.models.layers.common import (DenseParams, INIT_STD, fused_projection, matrix, normal,
                                     no_decay, rope, visible, zeros)
from lm.models.layers.kv_cache import KVCache, cached_attention, write_kv_cache


def attention(q_BxTxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array, *,
              causal: bool = True, window: int | None = None,
              key_valid_BxS: jax.Array | None = None, segment_ids_BxT: jax.Array | None = None,
              bias_HxTxS: jax.Array | None = None, scaled: bool = True,
              block: int = 128) -> jax.Array:
  """Attention (see blocked_attention for the contract). On GPU and TPU through
  jax.nn.dot_product_attention (fused_attention: cuDNN's kernels on GPU where they apply, XLA's
  otherwise); on CPU the blocked form, which skips the key blocks a causal query block cannot
  see."""
  kwargs = dict(causal=causal, window=window, key_valid_BxS=key_valid_BxS,
                segment_ids_BxT=segment_ids_BxT, bias_HxTxS=bias_HxTxS, scaled=scaled)
  if backend.fused_attention():
    return fused_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, **kwargs)
  return blocked_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, **kwargs, block=block)


def fused_attention(q_BxTxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array, *,
                    causal: bool = True, window: int | None = None,
                    key_valid_BxS: jax.Array | None = None,
                    segment_ids_BxT: jax.Array | None = None,
                    bias_HxTxS: jax.Array | None = None, scaled: bool = True,
                    implementation: str | None = None) -> jax.Array:
  """blocked_attention's contract through jax.nn.dot_product_attention: the causal mask and
  the window as its `is_causal` and `local_window_size`, padding and segments as a boolean
  mask, T5's bias as its bias; `implementation` None lets JAX pick cuDNN where it can."""
  mask_Bx1xTxS = None
  if key_valid_BxS is not None:
    mask_Bx1xTxS = key_valid_BxS[:, None, None, :]
  if segment_ids_BxT is not None:
    same_Bx1xTxS = segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]
    mask_Bx1xTxS = same_Bx1xTxS if mask_Bx1xTxS is None else mask_Bx1xTxS & same_Bx1xTxS
  out = jax.nn.dot_product_attention(
      q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh,
      bias=None if bias_HxTxS is None else bias_HxTxS[None].astype(q_BxTxHxDh.dtype),
      mask=mask_Bx1xTxS, scale=None if scaled else 1.0, is_causal=causal,
      local_window_size=(window - 1, 0) if causal and window is not None else None,
      implementation=implementation)
  return out.astype(q_BxTxHxDh.dtype)


def blocked_attention(q_BxTxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array, *,
                      causal: bool = True, window: int | None = None,
                      key_valid_BxS: jax.Array | None = None,
                      segment_ids_BxT: jax.Array | None = None,
                      bias_HxTxS: jax.Array | None = None, scaled: bool = True,
                      block: int = 128) -> jax.Array:
  """Softmax(q k^T / sqrt(Dh) + bias) v over query blocks of `block` rows; causal (query t
  sees keys s <= t) or bidirectional (every key). `scaled` False leaves out the 1 / sqrt(Dh)
  (T5, whose initialisation folds it into the query); `bias_HxTxS` is added to the logits
  (T5's relative position bias).

  K key/value heads serve H = K * G query heads (grouped-query attention; K = H is multi-head,
  K = 1 multi-query): query head k * G + g reads key/value head k. With a `window` (causal
  only) a query at t sees keys t - window + 1 .. t only. A causal query block [i, i + block)
  scores only the keys it can see, [i - window + 1, i + block): key blocks wholly outside are
  skipped, not masked. `key_valid_BxS` False marks padding keys, which no query sees. With
  `segment_ids_BxT` (self-attention over packed rows, S = T) a query sees only the keys of its
  own segment.
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
                                  k_BxSxKxDh[:, lo:hi], preferred_element_type=jnp.float32)
    if scaled:
      logits_BxKxGxQxS = logits_BxKxGxQxS * head_dim ** -0.5
    if bias_HxTxS is not None:
      logits_BxKxGxQxS = logits_BxKxGxQxS + bias_HxTxS[:, start:end, lo:hi].reshape(
          kv_heads, heads // kv_heads, end - start, hi - lo)
    keys_S = jnp.arange(lo, hi)
    mask = (visible(jnp.arange(start, end)[:, None], keys_S[None, :], window)[None, None, None]
            if causal else None)
    if key_valid_BxS is not None:
      valid_Bx1x1x1xS = key_valid_BxS[:, None, None, None, lo:hi]
      mask = valid_Bx1x1x1xS if mask is None else mask & valid_Bx1x1x1xS
    if segment_ids_BxT is not None:
      same_Bx1x1xQxS = (segment_ids_BxT[:, None, None, start:end, None]
                        == segment_ids_BxT[:, None, None, None, lo:hi])
      mask = same_Bx1x1xQxS if mask is None else mask & same_Bx1x1xQxS
    if mask is not None:
      logits_BxKxGxQxS = jnp.where(mask, logits_BxKxGxQxS, jnp.finfo(jnp.float32).min)
    att_BxKxGxQxS = jax.nn.softmax(logits_BxKxGxQxS, axis=-1).astype(v_BxSxKxDh.dtype)
    outs.append(jnp.einsum('bkgqs,bskd->bqkgd', att_BxKxGxQxS, v_BxSxKxDh[:, lo:hi]))
  return jnp.concatenate(outs, axis=1).reshape(batch, length, heads, head_dim)


class Attention(nn.Module):
  """Self-attention, causal (decoders) or bidirectional (encoders): multi-head, grouped-query
  or multi-query; optional RoPE and (causal) sliding window. Query, key and value run as one
  matmul (their kernels side by side, the parameters kept apart; measured in
  experiments/README.md)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  use_bias: bool = True
  rope_theta: float = 0.0  # 0: no RoPE
  window: int | None = None
  dtype: jnp.dtype = jnp.float32
  out_std: float = INIT_STD
  causal: bool = True
  scaled: bool = True  # False: no 1 / sqrt(Dh) on the logits (T5)
  qk_norm: bool = False  # RMS-normalise each head's query and key (a learned scale a channel)
  norm_eps: float = 1e-5
  value_residual: bool = False  # mix in the first attention layer's values (ResFormer)

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, cache: KVCache | None = None, *,
               index: jax.Array | int = 0, start_B: jax.Array | None = None,
               segment_ids_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None,
               key_valid_BxT: jax.Array | None = None, bias_HxTxS: jax.Array | None = None,
               first_values_BxTxKxDh: jax.Array | None = None):
    """x_BxTxD -> (y_BxTxD, cache): a Mixer (lm.models.layers.kinds). Training (cache None):
    key_valid_BxT False marks padding. Decoding (with a `cache` from `init_kv_cache`): the T
    new columns start at column `index` of the rows; T > 1 is a prefill into an empty cache,
    T = 1 a decode step. Row b is left-padded up to column start_B[b]: its positions count
    from there and its padding is never attended. Packed rows (training): `segment_ids_BxT`
    keep attention within each segment and `positions_BxT` give RoPE each token's position in
    its segment. `bias_HxTxS` is added to the logits: over the T x T columns, or in a decode
    step over the cache's slots (T = 1).
    With `value_residual` it returns (y_BxTxD, cache, values_BxTxKxDh), its own values before
    any mixing; given `first_values_BxTxKxDh` (the first attention layer's), it attends with
    a v + b first_values instead of v, (a, b) its parameter `value_residual`, learned from
    (0.5, 0.5) (ResFormer); the cache keeps the mixed values."""
    d_model, length = x_BxTxD.shape[-1], x_BxTxD.shape[1]

    h, k = self.num_heads, self.num_kv_heads
    qkv_BxTxH2KxDh = fused_projection(x_BxTxD, [
        DenseParams((heads, self.head_dim), self.use_bias, ('embed', 'heads', 'head_dim'),
                    name=name)(d_model)
        for heads, name in ((h, 'query'), (k, 'key'), (k, 'value'))], self.dtype)
    q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh = jnp.split(qkv_BxTxH2KxDh, [h, h + k], axis=2)
    own_values_BxTxKxDh = v_BxTxKxDh
    if self.value_residual and first_values_BxTxKxDh is not None:
      gates = self.param('value_residual',
                         no_decay(lambda *_: jnp.array([0.5, 0.5]), (None,)), (2,))
      v_BxTxKxDh = (gates[0].astype(self.dtype) * v_BxTxKxDh
                    + gates[1].astype(self.dtype) * first_values_BxTxKxDh)
    if self.qk_norm:  # before RoPE, as in OLMo 2 and Qwen 3
      head_norm = lambda name: nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype, name=name,
                                          scale_init=no_decay(nn.initializers.ones_init(),
                                                              ('head_dim',)))
      q_BxTxHxDh = head_norm('query_norm')(q_BxTxHxDh)
      k_BxTxKxDh = head_norm('key_norm')(k_BxTxKxDh)
    columns_T = index + jnp.arange(length)
    if self.rope_theta:
      positions = columns_T if start_B is None else columns_T - start_B[:, None]
      if positions_BxT is not None:
        positions = positions_BxT
      q_BxTxHxDh = rope(q_BxTxHxDh, positions, self.rope_theta)
      k_BxTxKxDh = rope(k_BxTxKxDh, positions, self.rope_theta)
    if cache is not None and length == 1:
      cache = write_kv_cache(cache, k_BxTxKxDh, v_BxTxKxDh, columns_T)
      out_BxTxHxDh = cached_attention(q_BxTxHxDh, cache, columns_T[0], self.window, start_B,
                                      None if bias_HxTxS is None else bias_HxTxS[:, 0],
                                      self.scaled)
    else:
      if start_B is not None:  # left padding
        key_valid_BxT = columns_T[None] >= start_B[:, None]
      out_BxTxHxDh = attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, causal=self.causal,
                               window=self.window, key_valid_BxS=key_valid_BxT,
                               segment_ids_BxT=segment_ids_BxT, bias_HxTxS=bias_HxTxS,
                               scaled=self.scaled)
      if cache is not None:
        cache = write_kv_cache(cache, k_BxTxKxDh, v_BxTxKxDh, columns_T)
    y_BxTxD = nn.Einsum((self.num_heads, self.head_dim, d_model), 'bthk,hkd->btd', name='out',
                        dtype=self.dtype, use_bias=self.use_bias,
                        kernel_init=matrix(('heads', 'head_dim', 'embed'), self.out_std, inputs=2),
                        bias_init=zeros(('embed',)))(out_BxTxHxDh.astype(self.dtype))
    if self.value_residual:
      return y_BxTxD, cache, own_values_BxTxKxDh
    return y_BxTxD, cache


class CrossAttention(nn.Module):
  """Queries from x_BxTxD over the keys and values of memory_BxSxD (multi-head, no positions),
  padding keys (memory_valid_BxS False) never seen. `keys_values` projects the memory once
  (an encoder's output, kept for every decode step); `attend` uses them."""
  num_heads: int
  head_dim: int
  d_model: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  out_std: float = INIT_STD
  scaled: bool = True  # False: no 1 / sqrt(Dh) on the logits (T5)

  def setup(self):
    h, dh = self.num_heads, self.head_dim
    make = lambda name: DenseParams((h, dh), self.use_bias, ('embed', 'heads', 'head_dim'),
                                    name=name)
    self.query, self.key, self.value = make('query'), make('key'), make('value')
    self.out = nn.Einsum((h, dh, self.d_model), 'bthk,hkd->btd', name='out', dtype=self.dtype,
                         use_bias=self.use_bias, bias_init=zeros(('embed',)),
                         kernel_init=matrix(('heads', 'head_dim', 'embed'), self.out_std, inputs=2))

  def keys_values(self, memory_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(k_BxSxHxDh, v_BxSxHxDh) of the memory, in one matmul."""
    kv_BxSx2HxDh = fused_projection(memory_BxSxD, [self.key(self.d_model),
                                                   self.value(self.d_model)], self.dtype)
    return jnp.split(kv_BxSx2HxDh, 2, axis=2)

  def attend(self, x_BxTxD: jax.Array, k_BxSxHxDh: jax.Array, v_BxSxHxDh: jax.Array,
             memory_valid_BxS: jax.Array | None) -> jax.Array:
    q_BxTxHxDh = fused_projection(x_BxTxD, [self.query(self.d_model)], self.dtype)
    out_BxTxHxDh = attention(q_BxTxHxDh, k_BxSxHxDh, v_BxSxHxDh, causal=False,
                             key_valid_BxS=memory_valid_BxS, scaled=self.scaled)
    return self.out(out_BxTxHxDh.astype(self.dtype))


def relative_position_bucket(relative: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """T5's bucket of each key - query offset: bidirectional, half the buckets for keys after the
  query; causal, keys after the query fall in bucket 0. Of a side's n buckets, offsets
  0 .. n/2 - 1 have one each, and larger ones share the other n/2, spaced logarithmically up to
  max_distance (offsets beyond it: the last bucket)."""
  bucket = jnp.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    bucket = jnp.where(relative > 0, num_buckets, 0)
    distance = jnp.abs(relative)
  else:
    distance = -jnp.minimum(relative, 0)
  exact = num_buckets // 2
  far = exact + (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact)
                 / math.log(max_distance / exact) * (num_buckets - exact)).astype(relative.dtype)
  far = jnp.minimum(far, num_buckets - 1)
  return bucket + jnp.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
  """T5's position bias: a learned scalar per head and bucket of the key - query offset
  (relative_position_bucket), added to the attention logits. Parameter `embedding`
  [num_buckets, H]."""
  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool

  @nn.compact
  def __call__(self, queries_T: jax.Array, keys_S: jax.Array) -> jax.Array:
    """bias_HxTxS of queries at columns queries_T over keys at columns keys_S."""
    table_NxH = self.param('embedding', normal((None, 'heads')),
                           (self.num_buckets, self.num_heads))
    buckets_TxS = relative_position_bucket(keys_S[None, :] - queries_T[:, None],
                                           self.bidirectional, self.num_buckets,
                                           self.max_distance)
    return jnp.transpose(table_NxH[buckets_TxS], (2, 0, 1))
