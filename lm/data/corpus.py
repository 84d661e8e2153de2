"""Corpus sources: the Python standard library's own sources by default, or the user's globs.

Files are listed in a deterministic order. Each document goes to train or validation by a
stable hash (SHA-256, the same on every machine and in every Python run): a text file is one
document, split by its key (the path relative to the stdlib, or to the literal directory a glob
starts from), so the split does not move when files are added or the corpus is moved; a JSONL
file holds one document a line, split by the line's own text, so that one JSONL file (the common
form of a data set) yields both splits, and a line keeps its split when lines around it change.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator, Sequence

from lm.errors import ConfigError

EXCLUDED_DIRS = frozenset({'test', 'tests', 'idle_test', 'site-packages', '__pycache__'})


class CorpusWarning(UserWarning):
  """A file of the corpus was skipped (binary, not UTF-8, a bad JSONL line)."""


@dataclasses.dataclass(frozen=True)
class SourceFile:
  key: str  # stable name: decides the split
  path: Path


def stdlib_files() -> list[SourceFile]:
  """The standard library's .py files, tests and site-packages left out, sorted by key."""
  root = Path(sysconfig.get_paths()['stdlib'])
  files = []
  for path in root.rglob('*.py'):
    rel = path.relative_to(root)
    if not EXCLUDED_DIRS.intersection(rel.parts[:-1]) and path.is_file():
      files.append(SourceFile(rel.as_posix(), path))
  return sorted(files, key=lambda f: f.key)


def glob_root(pattern: str) -> str:
  """The leading directories of a glob that hold no wildcard: '/a/b/**/*.py' -> '/a/b'."""
  parts = Path(pattern).parts
  literal = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts) - 1)
  return str(Path(*parts[:literal])) if literal else '.'


def glob_files(patterns: Sequence[str], field: str = 'data.paths') -> list[SourceFile]:
  """Files matched by the user's globs (`**` recurses), deduplicated and sorted by key."""
  files = {}
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    root = glob_root(pattern)
    matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
    if not matches:
      raise ConfigError(f'{field}={pattern!r}: matches no file; check the path, or leave '
                        f'{field} empty for the default corpus (the Python stdlib)')
    for m in matches:
      key = Path(os.path.relpath(m, root)).as_posix()
      files.setdefault(key, SourceFile(key, Path(m)))
  return [files[k] for k in sorted(files)]


def list_files(patterns: Sequence[str], field: str = 'data.paths') -> list[SourceFile]:
  return glob_files(patterns, field) if patterns else stdlib_files()


def is_validation(key: str, val_fraction: float) -> bool:
  """Stable across machines and Python runs (unlike hash())."""
  digest = hashlib.sha256(key.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64 < val_fraction


def json_field(line: str, key: str, kind: type):
  """The `key` of a JSONL line's object, checked to be a `kind`; ValueError (not JSON),
  KeyError (no such key) or TypeError (not an object, or a value of another type) if not."""
  value = json.loads(line)[key]
  if not isinstance(value, kind):
    raise TypeError(f'"{key}" is a {type(value).__name__}')
  return value


def read_documents(source: SourceFile) -> Iterator[str]:
  """The documents of one file: a text file is one, a JSONL file one per line's `text`.

  A binary or non-UTF-8 file is skipped with a CorpusWarning, never an exception.
  """
  return (text for _, text in _keyed_documents(source))


def split_documents(source: SourceFile, val_fraction: float) -> Iterator[tuple[str, str]]:
  """('train' or 'val', text) of each document of one file, split as the module says."""
  for key, text in _keyed_documents(source):
    yield ('val' if is_validation(key, val_fraction) else 'train'), text


def _keyed_documents(source: SourceFile) -> Iterator[tuple[str, str]]:
  """(split key, text) of each document: the file's key for a text file, the line for JSONL."""
  raw = source.path.read_bytes()
  nul = raw.find(b'\0')
  if nul >= 0:
    warnings.warn(f'skipping {source.path}: not UTF-8 text (NUL byte at byte {nul}: binary)',
                  CorpusWarning, stacklevel=3)
    return
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    warnings.warn(f'skipping {source.path}: not UTF-8 text ({e.reason} at byte {e.start})',
                  CorpusWarning, stacklevel=3)
    return
  if source.path.suffix != '.jsonl':
    if text:
      yield source.key, text
    return
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      doc = json_field(line, 'text', str)
    except (ValueError, KeyError, TypeError) as e:
      warnings.warn(f'skipping {source.path}:{number}: want an object with a "text" string '
                    f'({e!r})', CorpusWarning, stacklevel=3)
      continue
    if doc:
      yield line.strip(), doc


def lines(document: str) -> list[str]:
  """The sentences of a document for next-sentence prediction: its non-blank lines, each with
  its newline and the blank lines after it (blank lines before the first are dropped), so that
  consecutive ones join back into the document's text."""
  out = []
  for line in document.splitlines(keepends=True):
    if line.strip():
      out.append(line)
    elif out:
      out[-1] += line
  return out
