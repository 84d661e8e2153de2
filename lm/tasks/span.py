"""Span corruption (`span`, encoder-decoders): T5's pre-training objective on the corpus.

The token store's documents (each BOS ... EOS) are one stream cut into rows of R raw tokens,
R from T5's length arithmetic (lm.data.span.lengths: the largest R whose corrupted input fills
data.seq_len; the targets' length follows from it, and data.target_len is not read). Each
training step corrupts its rows inside the jitted step with the step's key (`prepare`) (noise density
data.noise_density, mean span length data.mean_noise_span), so every epoch sees fresh masks;
the validation rows are corrupted once, from a key fixed by train.seed, so every evaluation
scores the same draws.
The loss, metrics and report are seq2seq's (lm.tasks.seq2seq): target loss, accuracy beside
the most frequent target token, and a few corrupted inputs with the model's fills.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm.errors import ConfigError, require
from lm.models import TokenCounts
from lm.data import span
from lm.tasks.base import DataConfig, batched, shuffled_indices
from lm.tasks.seq2seq import Seq2Seq


def corrupted(rng: jax.Array, batch: dict[str, jax.Array], *, lengths: span.Lengths,
              sentinel_ids: tuple[int, ...], eos_id: int) -> dict[str, jax.Array]:
  """The seq2seq batch of raw rows batch['tokens'] [B, R]: every input and target token
  counts (the lengths are exact)."""
  inputs_BxS, targets_BxT = span.corrupt_batch(rng, batch['tokens'], lengths,
                                               jnp.asarray(sentinel_ids), eos_id)
  return {'inputs': inputs_BxS, 'input_mask': jnp.ones(inputs_BxS.shape, bool),
          'targets': targets_BxT, 'loss_mask': jnp.ones(targets_BxT.shape, bool)}


def rows(tokens: np.ndarray, raw_len: int) -> np.ndarray:
  """The stream cut into rows of raw_len tokens (the rest dropped): [N, R]."""
  count = len(tokens) // raw_len
  return np.asarray(tokens[:count * raw_len], np.int32).reshape(count, raw_len)


@dataclasses.dataclass(frozen=True)
class SpanData(DataConfig):
  """span's data keys: the common ones (data.seq_len: the corrupted input's tokens, from which
  the targets' length follows) and the noise's."""
  noise_density: float = 0.15  # share of a row's raw tokens that are noise
  mean_noise_span: float = 3.0  # mean length of a noise span


class SpanCorruption(Seq2Seq):
  name = 'span'
  layout = 'documents'
  data_config = SpanData

  @staticmethod
  def validate(d: SpanData) -> None:
    """The noise settings, and that data.seq_len holds a corrupted row."""
    require(0.0 < d.noise_density < 1.0, 'data.noise_density', d.noise_density,
            'the share of noise tokens must be in (0, 1), e.g. 0.15 (T5)')
    require(d.mean_noise_span >= 1.0, 'data.mean_noise_span', d.mean_noise_span,
            'a noise span holds at least one token: give >= 1, e.g. 3 (T5)')
    n = span.lengths(d.seq_len, d.noise_density, d.mean_noise_span)
    require(n is not None, 'data.seq_len', d.seq_len,
            'too short for one noise span: a corrupted row needs a kept token, a sentinel and '
            'EOS; give >= 3, e.g. 256')
    require(n.raw - n.noise >= n.spans, 'data.noise_density', d.noise_density,
            f'with data.mean_noise_span={d.mean_noise_span}, a row of {n.raw} tokens has '
            f'{n.spans} noise spans but only {n.raw - n.noise} other tokens to separate them; '
            'lower the density or raise the mean span')

  @staticmethod
  def token_counts(d: SpanData) -> TokenCounts:
    """seq_len corrupted input tokens and the targets' tokens a row."""
    return TokenCounts(d.seq_len, target_len=span.lengths(d.seq_len, d.noise_density,
                                                          d.mean_noise_span).targets)

  @classmethod
  def load(cls, cfg, tokenizer):
    return super(Seq2Seq, cls).load(cfg, tokenizer)  # the token store (Task.load)

  def __init__(self, cfg, model, tokenizer, splits):
    d = cfg.data
    self.lengths = span.lengths(d.seq_len, d.noise_density, d.mean_noise_span)
    sentinels = tokenizer.sentinel_ids
    if self.lengths.spans > len(sentinels):
      raise ConfigError(
          f'data.seq_len={d.seq_len}: a row holds {self.lengths.spans} noise spans, and the '
          f'tokenizer has {len(sentinels)} sentinels (a tokenizer of format 1 has none: '
          'train a new one); lower data.seq_len or raise data.mean_noise_span')
    self.corrupt = self.prepare = functools.partial(corrupted, lengths=self.lengths,
                                     sentinel_ids=tuple(sentinels[:self.lengths.spans]),
                                     eos_id=tokenizer.eos_id)
    for name, split in splits.items():
      if len(split.tokens) < self.lengths.raw:
        raise ConfigError(f'data.seq_len={d.seq_len}: a row takes {self.lengths.raw} tokens and '
                          f'the {name} split holds {len(split.tokens)}; give a larger corpus '
                          '(or data.val_fraction) or a shorter data.seq_len')
    super().__init__(cfg, model, tokenizer, splits)

  def validation_rows(self):
    raw_NxR = rows(self.splits['val'].tokens, self.lengths.raw)
    batch = jax.jit(self.corrupt)(jax.random.PRNGKey(self.cfg.train.seed), {'tokens': raw_NxR})
    return {k: np.asarray(v) for k, v in batch.items()}

  @property
  def target_len(self) -> int:
    return self.lengths.targets

  def eval_batch_shapes(self):  # corrupted once: seq2seq's
    return super().batch_shapes()

  def batch_shapes(self):
    return {'tokens': jax.ShapeDtypeStruct((self.cfg.train.batch_size, self.lengths.raw),
                                           jnp.int32)}

  def train_dataset(self, process_index, process_count):
    t = self.cfg.train
    raw_NxR = rows(self.splits['train'].tokens, self.lengths.raw)
    ds = shuffled_indices(len(raw_NxR), t.seed)
    return batched(ds.map(lambda i: {'tokens': raw_NxR[i]}), t.batch_size, process_index,
                   process_count)

  def report_lines(self, val):
    n = self.lengths
    return [f'(span corruption: rows of {n.raw} tokens, {n.noise} of them noise in {n.spans} '
            f'spans; inputs {n.inputs} and targets {n.targets} tokens)',
            *super().report_lines(val)]
