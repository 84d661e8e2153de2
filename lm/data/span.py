"""T5's span corruption (Raffel et al. 2020, section 3.1.4), on fixed shapes so that it runs
inside the jitted loss with the step's key.

A row of R raw tokens gets N = round(R * noise_density) noise tokens (at least 1, at most
R - 1) in M = round(N / mean_noise_span) spans (at least 1): the noise tokens split into M
non-empty spans and the others into M non-empty runs, each split uniformly at random among the
compositions, laid out run, span, run, span, ... The input keeps the runs and puts sentinel i
in place of span i; the target lists each sentinel followed by its span:

  raw     for i in range ( n ) : print ( i )
  inputs  for i in <s0> n ) : print <s1> ) EOS
  targets <s0> range ( <s1> ( i EOS

so inputs hold R - N + M + 1 tokens and targets N + M + 1, the same for every row: T5's
length arithmetic (`lengths`) picks the largest R whose inputs fit data.seq_len.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Lengths:
  raw: int  # R: raw tokens a row
  noise: int  # N: of them, noise
  spans: int  # M: noise spans
  inputs: int  # R - N + M + 1 (EOS)
  targets: int  # N + M + 1 (EOS)


def counts(raw: int, noise_density: float, mean_noise_span: float) -> Lengths:
  """The noise tokens, spans and lengths of a row of `raw` tokens."""
  noise = min(max(int(round(raw * noise_density)), 1), raw - 1)
  spans = max(int(round(noise / mean_noise_span)), 1)
  return Lengths(raw, noise, spans, raw - noise + spans + 1, noise + spans + 1)


def lengths(inputs_len: int, noise_density: float, mean_noise_span: float) -> Lengths | None:
  """The largest row whose corrupted input holds at most inputs_len tokens (T5's
  compute_input_and_target_lengths), or None if no row of two tokens fits."""
  best = None
  raw = 2
  while counts(raw, noise_density, mean_noise_span).inputs <= inputs_len:
    best = counts(raw, noise_density, mean_noise_span)
    raw += 1
  return best


def _composition(key: jax.Array, total: int, parts: int) -> jax.Array:
  """The part (0 .. parts - 1) of each of `total` items, split in order into `parts` non-empty
  runs, the cut points a uniform draw of parts - 1 of the total - 1 gaps."""
  gaps = jax.random.uniform(key, (total - 1,))
  cut = jnp.zeros(total - 1, bool).at[jnp.argsort(gaps)[:parts - 1]].set(True)
  return jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(cut).astype(jnp.int32)])


def segments(key: jax.Array, n: Lengths) -> jax.Array:
  """The segment of each raw position: 2i for run i, 2i + 1 for noise span i (run i precedes
  span i)."""
  run_key, span_key = jax.random.split(key)
  run_lengths = jnp.bincount(_composition(run_key, n.raw - n.noise, n.spans), length=n.spans)
  span_lengths = jnp.bincount(_composition(span_key, n.noise, n.spans), length=n.spans)
  interleaved = jnp.stack([run_lengths, span_lengths], axis=1).reshape(-1)  # run, span, ...
  return jnp.repeat(jnp.arange(2 * n.spans), interleaved, total_repeat_length=n.raw)


def corrupt(key: jax.Array, raw_R: jax.Array, n: Lengths, sentinel_ids: jax.Array,
            eos_id: int) -> tuple[jax.Array, jax.Array]:
  """(inputs, targets) of one row of n.raw tokens: see the module docstring. sentinel_ids[i]
  is the id of sentinel i."""
  segment_R = segments(key, n)
  noise_R = segment_R % 2 == 1
  sentinel_R = sentinel_ids[segment_R // 2].astype(raw_R.dtype)
  first_R = jnp.concatenate([jnp.ones(1, bool), segment_R[1:] != segment_R[:-1]])

  def gather(keep_R, token_R, length):  # the kept tokens in order, then EOS
    where_R = jnp.where(keep_R, jnp.cumsum(keep_R) - 1, length)  # dropped: out of bounds
    return jnp.full(length, eos_id, raw_R.dtype).at[where_R].set(token_R, mode='drop')
  # inputs: the runs, each noise span's place taken by its sentinel; targets: the noise
  # spans, each run's place taken by the sentinel of the span after it
  inputs = gather(~noise_R | first_R, jnp.where(noise_R, sentinel_R, raw_R), n.inputs)
  targets = gather(noise_R | first_R, jnp.where(noise_R, raw_R, sentinel_R), n.targets)
  return inputs, targets


def corrupt_batch(key: jax.Array, raw_BxR: jax.Array, n: Lengths, sentinel_ids: jax.Array,
                  eos_id: int) -> tuple[jax.Array, jax.Array]:
  """corrupt for each row with its own key: (inputs_BxS, targets_BxT)."""
  keys = jax.random.split(key, raw_BxR.shape[0])
  return jax.vmap(lambda k, raw: corrupt(k, raw, n, sentinel_ids, eos_id))(keys, raw_BxR)
