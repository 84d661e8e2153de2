"""Sampling: a filter is a pure function logits_BxV -> logits_BxV that masks with -inf.

`generate` runs a `jax.lax.fori_loop` that recomputes the full forward over a fixed-size
buffer each step (no KV cache yet), so it serves any model `apply(params, tokens_BxT)`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Filter = Callable[[jax.Array], jax.Array]


def temperature(t: float) -> Filter:
  """t == 0 is greedy: everything but the most likely token is masked."""
  def apply(logits_BxV: jax.Array) -> jax.Array:
    if t == 0:
      top_B = jnp.max(logits_BxV, axis=-1, keepdims=True)
      return jnp.where(logits_BxV >= top_B, 0.0, -jnp.inf)
    return logits_BxV / t
  return apply


def generate(apply_fn: Callable, params, prompts: Sequence[Sequence[int]], *, max_len: int,
             max_new_tokens: int, rng: jax.Array, pad_id: int,
             filter_fn: Filter = temperature(1.0)) -> list[list[int]]:
  """Continues each prompt by up to max_new_tokens (fewer if max_len is reached)."""
  lengths_B = np.array([len(p) for p in prompts])
  if lengths_B.min() < 1 or lengths_B.max() >= max_len:
    raise ValueError(f'prompt lengths {lengths_B.tolist()} must be in [1, max_len={max_len})')
  steps = int(min(max_new_tokens, max_len - lengths_B.max()))
  buffer_BxT = np.full((len(prompts), max_len), pad_id, np.int32)
  for b, p in enumerate(prompts):
    buffer_BxT[b, :len(p)] = p
  out_BxT = np.asarray(_sample_loop(apply_fn, params, jnp.asarray(buffer_BxT),
                                    jnp.asarray(lengths_B), rng, steps, filter_fn))
  return [out_BxT[b, :n + steps].tolist() for b, n in enumerate(lengths_B)]


def _sample_loop(apply_fn, params, buffer_BxT, lengths_B, rng, steps, filter_fn):
  @jax.jit
  def loop(params, buffer_BxT, rng):
    rows_B = jnp.arange(buffer_BxT.shape[0])

    def body(i, carry):
      buffer_BxT, rng = carry
      rng, key = jax.random.split(rng)
      logits_BxV = apply_fn({'params': params}, buffer_BxT)[rows_B, lengths_B + i - 1]
      next_B = jax.random.categorical(key, filter_fn(logits_BxV))
      return buffer_BxT.at[rows_B, lengths_B + i].set(next_B.astype(buffer_BxT.dtype)), rng
    return jax.lax.fori_loop(0, steps, body, (buffer_BxT, rng))[0]
  return loop(params, buffer_BxT, rng)
