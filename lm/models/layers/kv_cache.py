"""The key/value cache of decoding on CPU: keys and values in blocks of slots (read whole, no
copy), a rolling buffer for a sliding window, the beam table that reorders beams without
moving rows, and attention of one new query over the filled blocks."""
from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lm.models.layers.common import visible


@flax.struct.dataclass
class KVCache:
  """One attention layer's decoding state: keys and values, each a tuple of blocks of slots
  [B * K, block, Dh] (init_kv_cache), `pos` [S] the column in each slot (-1: empty) and, in beam
  search, `beam_row` [P, R, S] (`reorder`). Scanned layers stack every array on a leading axis."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  pos: jax.Array
  beam_row: jax.Array | None = None

  def take_rows(self, rows_N: jax.Array, batch: int) -> KVCache:
    """The cache of rows rows_N of the batch of `batch` rows."""
    def take(x):  # a block [B * K, S, Dh], scanned [repeats, B * K, S, Dh]: rows_N of B
      lead, (slots, head_dim) = x.shape[:-3], x.shape[-2:]
      x_BxKxSxDh = x.reshape(*lead, batch, -1, slots, head_dim)
      return jnp.take(x_BxKxSxDh, rows_N, axis=len(lead)).reshape(*lead, -1, slots, head_dim)
    return self.replace(k=tuple(map(take, self.k)), v=tuple(map(take, self.v)))

  def reorder(self, parent_PxR: jax.Array, index: jax.Array) -> KVCache:
    """The cache once beam j of prompt p continues beam parent_PxR[p, j] (the B = P * R rows
    being P prompts' R beams): no key or value moves. `beam_row` [P, R, S] holds the row of
    its prompt that holds each beam's slot s (read by attention_over_blocks); the beams take
    their parents' tables, and the slot the next decode step writes (column `index`) is each
    beam's own row. Without a table yet, each beam's slots start in its own row (the rows of a
    prompt then hold the same keys, as take_rows leaves them)."""
    prompts, beams = parent_PxR.shape
    own_PxR = jnp.broadcast_to(jnp.arange(beams, dtype=jnp.int32), (prompts, beams))
    lead, slots = self.pos.shape[:-1], self.pos.shape[-1]  # lead: scanned layers' repeats
    shape = (*lead, prompts, beams, slots)
    rows = (self.beam_row if self.beam_row is not None
            else jnp.broadcast_to(own_PxR[..., None], shape))
    rows = jnp.take_along_axis(rows, jnp.broadcast_to(parent_PxR[..., None], shape), axis=-2)
    rows = rows.at[..., index % slots].set(jnp.broadcast_to(own_PxR, shape[:-1]))
    return self.replace(beam_row=rows)


def init_kv_cache(batch: int, max_len: int, kv_heads: int, head_dim: int,
                  window: int | None = None, dtype=jnp.float32) -> KVCache:
  """Keys and values of up to max_len columns, each a tuple of blocks of slots (`block_sizes`),
  [B * K, block, Dh] (row b's key/value head k at b * K + k): a decode step reads the filled
  blocks whole, with no copy (XLA:CPU copies any slice of an array before a matmul reads it;
  why this layout: experiments/README.md, Sampling). With a window, a rolling buffer of
  `window` slots (column p in slot p % window), so memory does not grow with the sequence.
  `pos` holds the column in each slot, -1 while empty. On a mesh the blocks' rows (whole rows
  of the batch, each with its heads) spread like the batch (logical axis `cache_rows`)."""
  slots = min(max_len, window) if window is not None else max_len
  blocks = lambda: tuple(nn.with_logical_constraint(
      jnp.zeros((batch * kv_heads, size, head_dim), dtype), ('cache_rows', 'length', 'head_dim'))
      for size in block_sizes(slots))
  return KVCache(blocks(), blocks(), jnp.full((slots,), -1, jnp.int32))


CACHE_BLOCK = 64  # a cache's blocks are (a multiple of) this many slots


def block_sizes(slots: int, most: int = 8) -> list[int]:
  """The sizes of a cache's blocks: CACHE_BLOCK slots, or a multiple of it so that there are
  at most `most` blocks, the last one what is left."""
  block = max(CACHE_BLOCK, -(-slots // most // CACHE_BLOCK) * CACHE_BLOCK)
  return [min(block, slots - start) for start in range(0, slots, block)]


def write_kv_cache(cache: KVCache, k_BxTxKxDh: jax.Array, v_BxTxKxDh: jax.Array,
                   positions_T: jax.Array) -> dict:
  slots = cache.pos.shape[0]
  sizes = [block.shape[1] for block in cache.k]
  batch, length, kv_heads, head_dim = k_BxTxKxDh.shape
  rows = lambda x_BxTxKxDh, c: x_BxTxKxDh.transpose(0, 2, 1, 3).reshape(
      batch * kv_heads, length, head_dim).astype(c[0].dtype)
  k_NxTxDh, v_NxTxDh = rows(k_BxTxKxDh, cache.k), rows(v_BxTxKxDh, cache.v)
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
    return cache.replace(k=write(cache.k, k_NxTxDh), v=write(cache.v, v_NxTxDh),
                         pos=jax.lax.dynamic_update_slice_in_dim(
                             cache.pos, positions_T.astype(jnp.int32), slot, 0))
  keep = min(slots, length)  # a prefill longer than the window keeps its last `slots` columns
  where_T = positions_T[-keep:] % slots

  def write(blocks, x_NxTxDh):  # a prefill: once, so the blocks are joined and split again
    joined = jnp.concatenate(blocks, axis=1).at[:, where_T].set(x_NxTxDh[:, -keep:])
    return tuple(jnp.split(joined, np.cumsum(sizes)[:-1], axis=1))
  return cache.replace(k=write(cache.k, k_NxTxDh), v=write(cache.v, v_NxTxDh),
                       pos=cache.pos.at[where_T].set(positions_T[-keep:].astype(jnp.int32)))


def cached_attention(q_Bx1xHxDh: jax.Array, cache: KVCache, t: jax.Array,
                     window: int | None = None, start_B: jax.Array | None = None,
                     bias_HxS: jax.Array | None = None, scaled: bool = True):
  """The query at column t over the cached keys it may see (from column start_B[b] on), with
  `bias_HxS` (a bias over the cache's slots) added to the logits, and scaled by 1 / sqrt(Dh)
  unless `scaled` is False.

  Only the filled blocks of the cache are read (a jax.lax.switch on their number): a full
  cache holds column p in slot p, so the blocks past slot t are still empty."""
  sizes = [block.shape[1] for block in cache.k]
  branch = jnp.sum(t >= np.cumsum(sizes)[:-1])  # the block of slot t (past the last: full)
  return jax.lax.switch(  # one block (a short cache): called directly, no conditional
      branch, [functools.partial(attention_over_blocks, n, window=window, scaled=scaled)
               for n in range(1, len(sizes) + 1)],
      q_Bx1xHxDh, cache, t, start_B, bias_HxS)


def attention_over_blocks(n: int, q_Bx1xHxDh: jax.Array, cache: KVCache, t: jax.Array,
                          start_B: jax.Array | None, bias_HxS: jax.Array | None,
                          window: int | None, scaled: bool = True) -> jax.Array:
  """cached_attention over the cache's first n blocks: a matmul per block, one softmax.

  With cache.beam_row [P, R, S] (beam search, KVCache.reorder), the B = P * R rows
  are P prompts' R beams each, and beam j of prompt p finds slot s in row beam_row[p, j, s] of
  its prompt's rows, so that reordering the beams moves no key or value. Each cache row is
  then read once, by the R queries of its group (a matmul of R rows where a plain cache has
  one), and each beam keeps the logits of its own rows."""
  batch, _, heads, head_dim = q_Bx1xHxDh.shape
  ks, vs = cache.k[:n], cache.v[:n]
  slots = sum(k.shape[1] for k in ks)
  pos_S = cache.pos[:slots]
  kv_heads = ks[0].shape[0] // batch
  group = cache.beam_row.shape[1] if cache.beam_row is not None else 1
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
    row_PxJxS = cache.beam_row[..., :slots]
    seen = seen & (row_PxJxS[:, :, None, None, None] == jnp.arange(group)[:, None])
  if scaled:
    logits = logits * head_dim ** -0.5
  if bias_HxS is not None:  # logits [P, J, K, G, R, S]
    logits = logits + bias_HxS[:, :slots].reshape(kv_heads, g, 1, slots)
  logits = jnp.where(seen, logits, jnp.finfo(jnp.float32).min)
  att = jax.nn.softmax(logits.reshape(prompts, group, kv_heads, g, group * slots), axis=-1)
  att_NxMxS = att.reshape(prompts, group, kv_heads, g, group, slots).transpose(
      0, 4, 2, 1, 3, 5).reshape(batch * kv_heads, group * g, slots).astype(vs[0].dtype)
  att_per_block = jnp.split(att_NxMxS, np.cumsum([v.shape[1] for v in vs])[:-1], axis=-1)
  out_NxMxDh = sum(jnp.einsum('nms,nsd->nmd', a_NxMxS, v_NxSxDh)
                   for a_NxMxS, v_NxSxDh in zip(att_per_block, vs))
  out_PxRxKxJxGxDh = out_NxMxDh.reshape(prompts, group, kv_heads, group, g, head_dim)
  return out_PxRxKxJxGxDh.sum(axis=1).transpose(0, 2, 1, 3, 4).reshape(
      batch, 1, heads, head_dim)
