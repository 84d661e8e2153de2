"""The tokenized corpus: one flat memmapped token array per split, built once and cached.

Each document is stored as BOS + tokens + EOS. The cache directory is named by a fingerprint
of the tokenizer, the split and every file's (key, size, mtime), so a changed corpus or
tokenizer builds a new store; a store is written to a temporary directory and renamed into
place, so an interrupted build leaves nothing half-written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lm.config import ConfigError, DataConfig
from lm.data import corpus

SPLITS = ('train', 'val')


@dataclasses.dataclass(frozen=True)
class Split:
  tokens: np.ndarray  # [N] memmap
  num_bytes: int  # UTF-8 bytes of the text the tokens encode
  num_files: int


def default_cache_dir() -> Path:
  return Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'lm' / 'tokens'


def fingerprint(files: list[corpus.SourceFile], tokenizer, val_fraction: float) -> str:
  h = hashlib.sha256()
  h.update(json.dumps({'tokenizer': tokenizer.fingerprint(), 'val_fraction': val_fraction,
                       'format': 1}).encode())
  for f in files:
    st = f.path.stat()
    h.update(f'{f.key}\0{f.path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()[:20]


def load_or_build(cfg: DataConfig, tokenizer) -> dict[str, Split]:
  files = corpus.list_files(cfg.paths)
  where = Path(os.path.expanduser(cfg.cache_dir)) if cfg.cache_dir else default_cache_dir()
  directory = where / fingerprint(files, tokenizer, cfg.val_fraction)
  if not (directory / 'meta.json').is_file():
    _build(files, tokenizer, cfg, directory)
  splits = _load(directory)
  _check_splits(splits, cfg)
  return splits


def _load(directory: Path) -> dict[str, Split]:
  meta = json.loads((directory / 'meta.json').read_text())
  def tokens(name: str) -> np.ndarray:
    n = meta[name]['num_tokens']  # numpy cannot memmap an empty file
    return (np.memmap(directory / f'{name}.bin', dtype=meta['dtype'], mode='r', shape=(n,))
            if n else np.zeros(0, meta['dtype']))
  return {name: Split(tokens(name), meta[name]['num_bytes'], meta[name]['num_files'])
          for name in SPLITS}


def _build(files: list[corpus.SourceFile], tokenizer, cfg: DataConfig, directory: Path) -> None:
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix='.building-'))
  try:
    meta = {'dtype': np.dtype(dtype).name, 'files': len(files)}
    outs = {name: open(tmp / f'{name}.bin', 'wb') for name in SPLITS}
    counts = {name: {'num_tokens': 0, 'num_bytes': 0, 'num_files': 0} for name in SPLITS}
    for f in tqdm(files, desc='tokenizing corpus', unit='file', leave=False):
      name = 'val' if corpus.is_validation(f.key, cfg.val_fraction) else 'train'
      docs = 0
      for doc in corpus.read_documents(f):
        ids = [tokenizer.bos_id, *tokenizer.encode(doc), tokenizer.eos_id]
        outs[name].write(np.asarray(ids, dtype).tobytes())
        counts[name]['num_tokens'] += len(ids)
        counts[name]['num_bytes'] += len(doc.encode('utf-8', errors='replace'))
        docs += 1
      counts[name]['num_files'] += docs > 0
    for out in outs.values():
      out.close()
    meta.update(counts)
    (tmp / 'meta.json').write_text(json.dumps(meta, indent=2))
    try:
      os.replace(tmp, directory)
    except OSError:  # another process built the same store first
      if not (directory / 'meta.json').is_file():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _check_splits(splits: dict[str, Split], cfg: DataConfig) -> None:
  paths = list(cfg.paths) or 'the default corpus'
  if sum(split.num_bytes for split in splits.values()) == 0:
    raise ConfigError(f'data.paths={paths!r}: the corpus holds no text (empty or skipped '
                      'files); point data.paths at UTF-8 text or JSONL files with "text"')
  for name, split in splits.items():
    # A split must hold at least one window of seq_len + 1 tokens.
    require_tokens = cfg.seq_len + 1
    if len(split.tokens) < require_tokens:
      raise ConfigError(
          f'data.val_fraction={cfg.val_fraction}: the {name} split of data.paths={paths!r} '
          f'holds {len(split.tokens)} tokens in {split.num_files} files, '
          f'fewer than data.seq_len + 1 = {require_tokens}; the split is by file, so add '
          'files, change data.val_fraction, or lower data.seq_len')
