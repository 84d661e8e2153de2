"""Byte-level tokenizer: ids 0-255 are the UTF-8 bytes, special tokens sit at fixed ids after."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

SPECIAL_TOKENS = {'<|bos|>': 256, '<|eos|>': 257, '<|pad|>': 258}


class ByteTokenizer:
  kind = 'bytes'
  vocab_size = 256 + len(SPECIAL_TOKENS)
  bos_id = SPECIAL_TOKENS['<|bos|>']
  eos_id = SPECIAL_TOKENS['<|eos|>']
  pad_id = SPECIAL_TOKENS['<|pad|>']

  def encode(self, text: str) -> list[int]:
    """The text's UTF-8 bytes; the text of a special token stays ordinary bytes.

    Lone surrogates, which UTF-8 cannot hold, become '?'.
    """
    return list(text.encode('utf-8', errors='replace'))

  def decode(self, ids: Sequence[int]) -> str:
    """Special ids are dropped; invalid UTF-8 becomes U+FFFD, never an exception."""
    return bytes(i for i in ids if 0 <= i < 256).decode('utf-8', errors='replace')

  def token_bytes(self) -> np.ndarray:
    return np.array([1] * 256 + [0] * len(SPECIAL_TOKENS), np.int32)

  def fingerprint(self) -> str:
    return f'bytes-v1-{sorted(SPECIAL_TOKENS.items())}'

  def save(self, directory: str | os.PathLike) -> None:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / 'tokenizer.json.tmp'
    tmp.write_text(json.dumps({'kind': self.kind, 'special_tokens': SPECIAL_TOKENS}, indent=2))
    os.replace(tmp, path / 'tokenizer.json')
