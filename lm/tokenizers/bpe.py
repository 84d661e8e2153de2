"""Byte-level BPE training, two ways that learn the same merges.

The algorithm: split each text with the GPT-4 regex into words (the leading space stays with
the word after it), count the words, start every word as its UTF-8 bytes (ids 0-255), then
repeatedly merge the most frequent adjacent pair of ids, counted over all words with their
multiplicities, into a new id (256, 257, ...), until the vocabulary is full or no pair is left.
Tie-break: among pairs of equal count, the smallest (left id, right id) wins. A merge rewrites
each word left to right, so `a a a` with the pair (a, a) becomes `aa a`.

- `train_reference`: the algorithm as written above, in pure Python; for tests and reading.
- `train`: the same algorithm in `rustbpe` (Rust, incremental pair counts, a heap with the
  same tie-break), chosen over Hugging Face `tokenizers` by measurement (README, Benchmarks);
  exported to tiktoken ranks.
"""
from __future__ import annotations

import collections
from typing import Iterable, Iterator

import regex

from lm.errors import ConfigError
from lm.tokenizers.tokenizer import GPT4_PATTERN, SPECIAL_TOKENS, Tokenizer, bpe_tokenizer

Pair = tuple[int, int]


MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def check_vocab_size(vocab_size: int, field: str = 'vocab_size') -> None:
  if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
    raise ConfigError(f'{field}={vocab_size!r}: a byte-level BPE needs at least 256 byte ids '
                      f'plus {len(SPECIAL_TOKENS)} special tokens; use {MIN_VOCAB_SIZE} or '
                      'more (e.g. 8192)')


def clean(text: str) -> str:
  """Lone surrogates (not encodable as UTF-8) become U+FFFD, as tiktoken's encode does."""
  try:
    text.encode('utf-8')
    return text
  except UnicodeEncodeError:
    return text.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace')


def train_reference(texts: Iterable[str], num_merges: int,
                    pattern: str = GPT4_PATTERN) -> list[Pair]:
  """The merges, in order: merge i creates id 256 + i."""
  split = regex.compile(pattern)
  word_counts = collections.Counter(w for text in texts for w in split.findall(clean(text)))
  words = {tuple(w.encode('utf-8')): c for w, c in word_counts.items()}
  merges = []
  for new_id in range(256, 256 + num_merges):
    pair_counts = collections.Counter()
    for word, count in words.items():
      for pair in zip(word, word[1:]):
        pair_counts[pair] += count
    if not pair_counts:
      break
    best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
    merges.append(best)
    merged = collections.Counter()
    for word, count in words.items():
      merged[merge(word, best, new_id)] += count
    words = merged
  return merges


def merge(ids: tuple[int, ...], pair: Pair, new_id: int) -> tuple[int, ...]:
  out, i = [], 0
  while i < len(ids):
    if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
      out.append(new_id)
      i += 2
    else:
      out.append(ids[i])
      i += 1
  return tuple(out)


def merges_to_ranks(merges: list[Pair]) -> dict[bytes, int]:
  token_bytes = [bytes([b]) for b in range(256)]
  for left, right in merges:
    token_bytes.append(token_bytes[left] + token_bytes[right])
  return {t: i for i, t in enumerate(token_bytes)}


def train(texts: Iterable[str], vocab_size: int, pattern: str = GPT4_PATTERN,
          field: str = 'vocab_size') -> Tokenizer:
  """A `bpe` Tokenizer of exactly `vocab_size` ids (special tokens included); errors name the
  setting as `field`."""
  check_vocab_size(vocab_size, field)
  trainer = train_rustbpe(texts, vocab_size - len(SPECIAL_TOKENS), pattern)
  return from_rustbpe(trainer, vocab_size, field)


def train_rustbpe(texts: Iterable[str], num_ids: int, pattern: str = GPT4_PATTERN):
  """rustbpe's trainer after learning up to num_ids - 256 merges."""
  import rustbpe
  num_chars = [0]

  def cleaned() -> Iterator[str]:
    for text in texts:
      num_chars[0] += len(text)
      yield clean(text)
  trainer = rustbpe.Tokenizer()
  trainer.train_from_iterator(cleaned(), num_ids, pattern=pattern)
  if not num_chars[0]:
    raise ConfigError('the corpus for BPE training is empty: give files that hold UTF-8 text')
  return trainer


def from_rustbpe(trainer, vocab_size: int, field: str = 'vocab_size') -> Tokenizer:
  learned = trainer.get_mergeable_ranks()
  ranks = dict(learned)
  if len(ranks) != len(learned):
    raise RuntimeError('rustbpe learned two merges with the same bytes; tiktoken cannot hold '
                       'them, so its ids would differ from the trainer\'s')
  if len(ranks) + len(SPECIAL_TOKENS) < vocab_size:
    most = len(ranks) + len(SPECIAL_TOKENS)
    raise ConfigError(f'{field}={vocab_size}: this corpus has only {len(ranks) - 256} merges '
                      f'to learn; use a vocab_size of at most {most}, or a larger corpus')
  return bpe_tokenizer(ranks, trainer.get_pattern())
