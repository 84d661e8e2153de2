"""Tokenizer CLI.

  python -m lm.tokenizers train --input=GLOB[,GLOB] --vocab_size=N --out=DIR
  python -m lm.tokenizers stats --tokenizer=bytes|cl100k|DIR [--input=GLOB[,GLOB]] [--top=10]

`--input` defaults to the default corpus (the Python standard library's sources). Binary and
non-UTF-8 files are skipped with a warning. A mistake in the arguments is one line on stderr
and exit status 2.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

from lm import tokenizers
from lm.errors import ConfigError
from lm.data import corpus
from lm.tokenizers import bpe


def read_texts(inputs: str) -> list[str]:
  patterns = [p for p in inputs.split(',') if p] if inputs else []
  return [doc for f in corpus.list_files(patterns, '--input') for doc in corpus.read_documents(f)]


def train(args: argparse.Namespace) -> None:
  bpe.check_vocab_size(args.vocab_size, '--vocab_size')
  out = Path(args.out)
  if out.exists() and not out.is_dir():
    raise ConfigError(f'--out={args.out!r}: exists and is not a directory; give a directory')
  texts = read_texts(args.input)
  start = time.perf_counter()
  tokenizer = bpe.train(texts, args.vocab_size, field='--vocab_size')
  seconds = time.perf_counter() - start
  tokenizer.save(out)
  num_bytes = sum(len(t.encode('utf-8', 'replace')) for t in texts)
  print(f'trained a bpe of {tokenizer.vocab_size} ids on {len(texts)} documents '
        f'({num_bytes / 1e6:.1f} MB) in {seconds:.1f} s; saved to {out}')


def stats(args: argparse.Namespace) -> None:
  tokenizer = tokenizers.load(args.tokenizer)
  texts = read_texts(args.input)
  counts = collections.Counter()
  for ids in tokenizer.encode_batch(texts):
    counts.update(ids)
  num_tokens = sum(counts.values())
  num_bytes = sum(len(t.encode('utf-8', 'replace')) for t in texts)
  ordinary = [i for i, n in enumerate(tokenizer.token_bytes()) if n]
  unused = sum(1 for i in ordinary if not counts[i])
  print(f'{tokenizer!r} on {len(texts)} documents, {num_bytes:,} bytes')
  print(f'tokens: {num_tokens:,}; bytes per token: {num_bytes / max(num_tokens, 1):.3f}')
  print(f'unused ids: {unused:,} of {len(ordinary):,} ordinary ids '
        f'({unused / len(ordinary):.1%}); {len(tokenizer.special_ids)} special ids '
        f'from {tokenizer.first_special}')
  longest = sorted(ordinary, key=lambda i: (-len(tokenizer.id_to_bytes(i)), i))[:args.top]
  print('longest tokens: id, bytes, uses, text')
  for i in longest:
    token = tokenizer.id_to_bytes(i)
    print(f'  {i:>7} {len(token):>4} {counts[i]:>9,}  {token.decode("utf-8", "replace")!r}')


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m lm.tokenizers', description=__doc__.split('\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  p = commands.add_parser('train', help='train a byte-level BPE on text files')
  p.add_argument('--input', default='', help='comma-separated globs (default: the stdlib)')
  p.add_argument('--vocab_size', type=int, required=True)
  p.add_argument('--out', required=True, help='directory to write the tokenizer into')
  p = commands.add_parser('stats', help='statistics of a tokenizer on text files')
  p.add_argument('--tokenizer', required=True, help='bytes, cl100k, or a tokenizer directory')
  p.add_argument('--input', default='', help='comma-separated globs (default: the stdlib)')
  p.add_argument('--top', type=int, default=10, help='how many of the longest tokens to show')
  args = parser.parse_args(argv)
  try:
    {'train': train, 'stats': stats}[args.command](args)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
