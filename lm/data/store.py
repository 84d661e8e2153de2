"""The tokenized corpus: one flat memmapped token array per split, built once and cached.

Two layouts: `documents` (causal LM) stores each document as BOS + tokens + EOS; `lines`
(masked LM + next sentence) tokenizes each line alone (corpus.lines) and keeps the offsets of
every line and of the first line of every document. The cache directory is named by a
fingerprint of the layout, the tokenizer, the split and every file's (key, size, mtime), so a
changed corpus or tokenizer builds a new store; a store is written to a temporary directory and
renamed into place, so an interrupted build leaves nothing half-written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from lm import files, tokenizers
from lm.errors import ConfigError
from lm.data import corpus
from lm.tokenizers import bpe

if TYPE_CHECKING:
  from lm.config import TokenizerConfig
  from lm.tasks import DataConfig

SPLITS = ('train', 'val')


@dataclasses.dataclass(frozen=True)
class Split:
  tokens: np.ndarray  # [N] memmap
  num_bytes: int  # UTF-8 bytes of the text the tokens encode
  num_files: int  # files with at least one document in this split
  # `lines` layout: line i is tokens[line_starts[i]:line_starts[i + 1]] ([L + 1]), document
  # d its lines document_starts[d] .. document_starts[d + 1] - 1.
  line_starts: np.ndarray | None = None
  document_starts: np.ndarray | None = None
  num_documents: int = 0


def default_cache_dir() -> Path:
  return Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'lm' / 'tokens'


def fingerprint(sources: list[corpus.SourceFile], what: str, val_fraction: float) -> str:
  """Names what is built (`what`) from these files, as they are now, split so."""
  h = hashlib.sha256()
  # format 2: the documents of a JSONL file split one by one (format 1: by file)
  h.update(json.dumps({'tokenizer': what, 'val_fraction': val_fraction, 'format': 2}).encode())
  for f in sources:
    st = f.path.stat()
    h.update(f'{f.key}\0{f.path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()[:20]


def cache_dir(cfg: DataConfig) -> Path:
  return Path(os.path.expanduser(cfg.cache_dir)) if cfg.cache_dir else default_cache_dir()


def load_or_train_tokenizer(tcfg: TokenizerConfig, cfg: DataConfig) -> tokenizers.Tokenizer:
  """`bytes` and `cl100k` as they are; a `bpe` trained on the train split of the corpus,
  cached under a fingerprint of that split and the vocabulary size."""
  if tcfg.kind != 'bpe':
    return tokenizers.load(tcfg.kind)
  sources = corpus.list_files(cfg.paths)
  what = f'bpe-{tcfg.vocab_size}-{tokenizers.GPT4_PATTERN}-format{tokenizers.FORMAT}'
  directory = cache_dir(cfg) / f'bpe-{fingerprint(sources, what, cfg.val_fraction)}'
  if not (directory / 'tokenizer.json').is_file():
    print(f'training a byte-level BPE of {tcfg.vocab_size} ids on the train split '
          f'(of {len(sources)} files)', flush=True)
    train_docs = (doc for f in sources
                  for split, doc in corpus.split_documents(f, cfg.val_fraction)
                  if split == 'train')
    tokenizer = bpe.train(train_docs, tcfg.vocab_size, field='tokenizer.vocab_size')
    files.publish_directory(directory, tokenizer.save)
  return tokenizers.load(directory)


def directory_of(cfg: DataConfig, tokenizer: tokenizers.Tokenizer,
                 layout: str = 'documents') -> Path:
  """Where the token store of this corpus, tokenizer and layout is (or will be) cached."""
  what = tokenizer.fingerprint() + ('' if layout == 'documents' else f'-{layout}')
  return cache_dir(cfg) / fingerprint(corpus.list_files(cfg.paths), what, cfg.val_fraction)


def cached_json(directory: Path, name: str, compute: Callable[[], dict]) -> dict:
  """`compute()`, kept as `name` in `directory` (a token store's): computed once."""
  path = directory / name
  if path.is_file():
    return json.loads(path.read_text())
  value = compute()
  directory.mkdir(parents=True, exist_ok=True)
  files.write_atomic(path, json.dumps(value, indent=2))
  return value


def load_or_build(cfg: DataConfig, tokenizer: tokenizers.Tokenizer,
                  layout: str = 'documents') -> dict[str, Split]:
  sources = corpus.list_files(cfg.paths)
  directory = directory_of(cfg, tokenizer, layout)
  if not (directory / 'meta.json').is_file():
    _build(sources, tokenizer, cfg, directory, layout)
  splits = _load(directory)
  _check_splits(splits, cfg, layout)
  return splits


def _load(directory: Path) -> dict[str, Split]:
  meta = json.loads((directory / 'meta.json').read_text())
  def tokens(name: str) -> np.ndarray:
    n = meta[name]['num_tokens']  # numpy cannot memmap an empty file
    return (np.memmap(directory / f'{name}.bin', dtype=meta['dtype'], mode='r', shape=(n,))
            if n else np.zeros(0, meta['dtype']))
  offsets = lambda name, what: (np.load(directory / f'{name}.{what}.npy')
                                if (directory / f'{name}.{what}.npy').is_file() else None)
  return {name: Split(tokens(name), meta[name]['num_bytes'], meta[name]['num_files'],
                      offsets(name, 'lines'), offsets(name, 'documents'),
                      meta[name]['num_documents'])
          for name in SPLITS}


def _build(sources: list[corpus.SourceFile], tokenizer, cfg: DataConfig, directory: Path,
           layout: str) -> None:
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32

  def write(tmp: Path) -> None:
    meta = {'dtype': np.dtype(dtype).name, 'files': len(sources), 'layout': layout}
    counts = {name: {'num_tokens': 0, 'num_bytes': 0, 'num_files': 0, 'num_documents': 0}
              for name in SPLITS}
    outs = {name: open(tmp / f'{name}.bin', 'wb') for name in SPLITS}
    line_lengths = {name: [] for name in SPLITS}  # `lines` layout
    document_sizes = {name: [] for name in SPLITS}  # lines per document
    for f in tqdm(sources, desc='tokenizing corpus', unit='file', leave=False):
      docs = {name: [] for name in SPLITS}
      for name, doc in corpus.split_documents(f, cfg.val_fraction):
        docs[name].append(doc)
      for name in SPLITS:
        _write_documents(docs[name], tokenizer, layout, dtype, outs[name], counts[name],
                         line_lengths[name], document_sizes[name])
    for out in outs.values():
      out.close()
    if layout == 'lines':
      starts = lambda sizes: np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
      for name in SPLITS:
        np.save(tmp / f'{name}.lines.npy', starts(line_lengths[name]))
        np.save(tmp / f'{name}.documents.npy', starts(document_sizes[name]))
    meta.update(counts)
    (tmp / 'meta.json').write_text(json.dumps(meta, indent=2))
  files.publish_directory(directory, write)


def _write_documents(docs: list[str], tokenizer, layout: str, dtype, out, counts: dict[str, int],
                     line_lengths: list[int], document_sizes: list[int]) -> None:
  """Appends one file's documents of one split to its token file, counting what was written."""
  if not docs:
    return
  counts['num_files'] += 1
  counts['num_documents'] += len(docs)
  counts['num_bytes'] += sum(len(doc.encode('utf-8', errors='replace')) for doc in docs)
  if layout == 'documents':
    units = [[tokenizer.bos_id, *ids, tokenizer.eos_id] for ids in tokenizer.encode_batch(docs)]
  else:
    lines = [corpus.lines(doc) for doc in docs]
    units = tokenizer.encode_batch([line for doc in lines for line in doc])
    document_sizes += [len(doc) for doc in lines if doc]
    line_lengths += [len(ids) for ids in units]
  for ids in units:
    out.write(np.asarray(ids, dtype).tobytes())
    counts['num_tokens'] += len(ids)


def _check_splits(splits: dict[str, Split], cfg: DataConfig, layout: str) -> None:
  paths = list(cfg.paths) or 'the default corpus'
  if sum(split.num_bytes for split in splits.values()) == 0:
    raise ConfigError(f'data.paths={paths!r}: the corpus holds no text (empty or skipped '
                      'files); point data.paths at UTF-8 text or JSONL files with "text"')
  if layout == 'lines':  # the task's pipeline checks what it needs of them
    return
  for name, split in splits.items():
    # A split must hold at least one window of seq_len + 1 tokens.
    require_tokens = cfg.seq_len + 1
    if len(split.tokens) < require_tokens:
      raise ConfigError(
          f'data.val_fraction={cfg.val_fraction}: the {name} split of data.paths={paths!r} '
          f'holds {len(split.tokens)} tokens in {split.num_documents} documents of '
          f'{split.num_files} files, fewer than data.seq_len + 1 = {require_tokens}; text '
          'files split whole (JSONL files by line), so add text, change data.val_fraction, or '
          'lower data.seq_len')
