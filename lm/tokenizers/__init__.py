"""Tokenizers behind one interface: `load(name_or_dir)` -> Tokenizer.

Kinds so far: `bytes`. A tokenizer is saved into a directory (`tokenizer.json` names its kind)
and loaded back from it, so a run's workdir carries the tokenizer its model was trained with.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from lm.config import ConfigError
from lm.tokenizers.bytes import ByteTokenizer

KINDS = ('bytes',)


class Tokenizer(Protocol):
  kind: str
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Sequence[int]) -> str: ...
  def token_bytes(self) -> np.ndarray: ...  # [V] UTF-8 byte length of each id, 0 for specials
  def fingerprint(self) -> str: ...
  def save(self, directory: str | os.PathLike) -> None: ...


def load(name_or_dir: str | os.PathLike) -> Tokenizer:
  """`load('bytes')`, or a directory written by `save` (a run's `workdir/tokenizer`)."""
  name = str(name_or_dir)
  if name == 'bytes':
    return ByteTokenizer()
  path = Path(name) / 'tokenizer.json'
  if not path.is_file():
    raise ConfigError(f'tokenizer={name!r}: not a kind {KINDS} nor a directory holding '
                      'tokenizer.json; give a kind or a run\'s workdir/tokenizer')
  try:
    kind = json.loads(path.read_text())['kind']
  except (ValueError, KeyError) as e:
    raise ConfigError(f'tokenizer={name!r}: {path} is corrupt ({e}); re-create it') from e
  return load(kind)
