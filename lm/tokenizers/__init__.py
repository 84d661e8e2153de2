"""Tokenizers behind one interface: `load(name_or_dir)` -> Tokenizer.

Kinds: `bytes`, `bpe` (trained on a corpus: `lm.tokenizers.bpe.train`, or
`python -m lm.tokenizers train`), `cl100k` (pretrained, offline). A tokenizer is saved into a
directory (`tokenizer.json` names its kind; a `bpe` adds `ranks.tiktoken`) and loaded back
from it, so a run's workdir carries the tokenizer its model was trained with.
"""
from __future__ import annotations

import os

from lm import files
from lm.errors import ConfigError
from lm.tokenizers import bpe
from lm.tokenizers.tokenizer import (BYTES_FIRST_SPECIAL, CL100K_FIRST_SPECIAL, FORMAT, GPT4_PATTERN,
                                     SENTINELS, SPECIAL_TOKENS, StreamDecoder, Tokenizer,
                                     byte_tokenizer, cl100k, load_dir, special_text)

KINDS = ('bytes', 'bpe', 'cl100k')

__all__ = ['FORMAT', 'GPT4_PATTERN', 'KINDS', 'SENTINELS', 'SPECIAL_TOKENS', 'StreamDecoder', 'Tokenizer', 'load',
           'special_text', 'vocab_size_of']


def vocab_size_of(kind: str, vocab_size: int) -> int:
  """The vocabulary a `tokenizer.kind` gives, `tokenizer.vocab_size` for a bpe; checked."""
  if kind not in KINDS:
    raise ConfigError(f'tokenizer.kind={kind!r}: use one of {KINDS}')
  if kind == 'bpe':
    bpe.check_vocab_size(vocab_size, 'tokenizer.vocab_size')
    return vocab_size
  first_special = BYTES_FIRST_SPECIAL if kind == 'bytes' else CL100K_FIRST_SPECIAL
  return first_special + len(SPECIAL_TOKENS)  # without reading cl100k's ranks twice


def load(name_or_dir: str | os.PathLike) -> Tokenizer:
  """`load('bytes')`, `load('cl100k')`, or a directory written by `Tokenizer.save` (a trained
  BPE, or a run's `workdir/tokenizer`)."""
  name = str(name_or_dir)
  if name == 'bytes':
    return byte_tokenizer()
  if name == 'cl100k':
    return cl100k()
  if not (files.path(name) / 'tokenizer.json').is_file():
    hint = (' a bpe is trained first: python -m lm.tokenizers train --input=GLOB '
            '--vocab_size=N --out=DIR, then load(DIR)' if name == 'bpe' else '')
    raise ConfigError(f'tokenizer={name!r}: not bytes, cl100k, nor a directory holding '
                      f'tokenizer.json;{hint or " give a kind or a tokenizer directory"}')
  return load_dir(name)
