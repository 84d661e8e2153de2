"""Tokenizer benchmark on the default corpus (the Python stdlib's sources), in one run.

- training a byte-level BPE of vocab 8192: lm (`lm.tokenizers.bpe.train`: rustbpe, then the
  tiktoken encoding built from its ranks) against Hugging Face `tokenizers` trained directly
  with the same split regex and vocabulary;
- encode throughput (MB/s, one thread, document by document): lm's `Tokenizer.encode` against
  a raw `tiktoken.Encoding` of the same ranks;
- bytes per token of bytes, the trained BPE, Hugging Face's BPE and cl100k;
- the time to tokenize the corpus into lm's token store.

  python experiments/bench_tokenizer.py [--rounds=3] [--vocab_size=8192]

Prints a table, then one JSON line with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tiktoken
import tokenizers as hf

from lm import tokenizers
from lm.config import DataConfig
from lm.data import corpus, store
from lm.tokenizers import SPECIAL_TOKENS, bpe
from machine import cpu_model  # experiments/machine.py


def hf_train(texts: list[str], vocab_size: int) -> hf.Tokenizer:
  """Hugging Face's byte-level BPE with lm's split regex and the same number of merges."""
  tokenizer = hf.Tokenizer(hf.models.BPE())
  tokenizer.pre_tokenizer = hf.pre_tokenizers.Sequence([
      hf.pre_tokenizers.Split(hf.Regex(tokenizers.GPT4_PATTERN), behavior='isolated'),
      hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS),
                                   initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
                                   show_progress=False)
  tokenizer.train_from_iterator(texts, trainer)
  return tokenizer


def timed(fn) -> tuple[float, object]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--vocab_size', type=int, default=8192)
  args = parser.parse_args()
  texts = [doc for f in corpus.stdlib_files() for doc in corpus.read_documents(f)]
  num_bytes = sum(len(t.encode('utf-8')) for t in texts)
  train_s = {'lm': [], 'hf': []}
  for _ in range(args.rounds):  # alternating, so both see the same machine
    seconds, ours = timed(lambda: bpe.train(texts, args.vocab_size))
    train_s['lm'].append(seconds)
    seconds, theirs = timed(lambda: hf_train(texts, args.vocab_size))
    train_s['hf'].append(seconds)
  raw = tiktoken.Encoding('raw', pat_str=ours.pattern, mergeable_ranks=ours.ranks,
                          special_tokens={})
  encode_s = {'lm': [], 'tiktoken': []}
  for _ in range(args.rounds):
    encode_s['lm'].append(timed(lambda: [ours.encode(t) for t in texts])[0])
    encode_s['tiktoken'].append(timed(lambda: [raw.encode_ordinary(t) for t in texts])[0])
  counts = {
      'bytes': sum(map(len, tokenizers.load('bytes').encode_batch(texts))),
      f'lm bpe {args.vocab_size}': sum(map(len, ours.encode_batch(texts))),
      f'hf bpe {args.vocab_size}': sum(len(e.ids) for e in theirs.encode_batch(texts)),
      'cl100k': sum(map(len, tokenizers.load('cl100k').encode_batch(texts))),
  }
  with tempfile.TemporaryDirectory() as cache:
    store_s, _ = timed(lambda: store.load_or_build(DataConfig(cache_dir=cache), ours))
  med = {k: statistics.median(v) for k, v in {**train_s, **encode_s}.items()}
  train_ratio = med['lm'] / med['hf']
  encode_mb_s = {k: num_bytes / 1e6 / med[k] for k in ('lm', 'tiktoken')}
  encode_ratio = encode_mb_s['lm'] / encode_mb_s['tiktoken']
  machine = f'{cpu_model()}, {os.cpu_count()} cores'
  print(f'default corpus: {len(texts)} files, {num_bytes / 1e6:.1f} MB; machine: {machine}; '
        f'median of {args.rounds} rounds')
  print(f'| {"measure":<46} | {"lm":>10} | {"peer":>10} | {"lm / peer":>9} |')
  print(f'|{"-" * 48}|{"-" * 12}|{"-" * 12}|{"-" * 11}|')
  print(f'| {f"train BPE vocab {args.vocab_size}, s (peer: HF tokenizers)":<46} | '
        f'{med["lm"]:>10.2f} | {med["hf"]:>10.2f} | {train_ratio:>9.2f} |')
  print(f'| {"encode, MB/s, 1 thread (peer: raw tiktoken)":<46} | {encode_mb_s["lm"]:>10.2f} | '
        f'{encode_mb_s["tiktoken"]:>10.2f} | {encode_ratio:>9.2f} |')
  print(f'bars: train time at most 1.1x the peer\'s ({train_ratio:.2f}); encode at least 0.9x '
        f'the peer\'s throughput ({encode_ratio:.2f})')
  print(f'| {"tokenizer":<14} | {"tokens":>10} | {"bytes/token":>11} |')
  print(f'|{"-" * 16}|{"-" * 12}|{"-" * 13}|')
  for name, n in counts.items():
    print(f'| {name:<14} | {n:>10,} | {num_bytes / n:>11.3f} |')
  print(f'token store of the whole corpus with lm bpe {args.vocab_size}: {store_s:.2f} s')
  print(json.dumps({
      'corpus_bytes': num_bytes, 'vocab_size': args.vocab_size,
      'lm_train_sec': med['lm'], 'peer_train_sec': med['hf'], 'train_time_ratio': train_ratio,
      'lm_encode_mb_per_sec': encode_mb_s['lm'], 'peer_encode_mb_per_sec': encode_mb_s['tiktoken'],
      'encode_ratio': encode_ratio,
      'bytes_per_token': {k: num_bytes / n for k, n in counts.items()},
      'store_build_sec': store_s, 'machine': machine, 'tiktoken': tiktoken.__version__,
      'tokenizers': hf.__version__}))


if __name__ == '__main__':
  main()
