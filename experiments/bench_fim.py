"""Fill-in-the-middle on held-out code: single-line infilling exact match of a FIM-trained run
against a plain run completing the same line from the code before it only, and both runs'
left-to-right bits per byte.

For each of `--lines` non-blank lines (of at most 32 tokens) drawn with a fixed seed from the
held-out files of the runs' corpus (the split both runs were evaluated on), the FIM model gets
the code before the line and the code after it (the prefix at most half of the context left
after room for the line, the suffix the rest) and infills with the PSM prompt of
`lm.sampling.infill` (or, with --layout=spm, the SPM prompt: the suffix first; greedy); the plain model gets the same code before the line and continues
it (greedy). A line counts when the first line of the output equals it exactly.

  python experiments/bench_fim.py --fim=runs/fim --plain=runs/decoder [--lines=200] [--layout=spm]

Prints a table, then one JSON line with the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from lm import load, sampling
from lm.config import upgrade_saved
from lm.data import corpus
from machine import describe  # noqa: E402  experiments/machine.py

MAX_LINE = 32  # tokens of a hidden line at most; each model writes up to 2 more
BATCH = 50


def held_out_lines(workdir: Path, tokenizer, count: int, seed: int
                   ) -> list[tuple[str, str, str]]:
  """(text before, the line, text after) of `count` non-blank lines of at most MAX_LINE tokens
  drawn from the held-out files of the run's corpus."""
  data = upgrade_saved(json.loads((workdir / 'config.json').read_text()))['data']
  files = [f for f in corpus.list_files(data['paths'])
           if corpus.is_validation(f.key, data['val_fraction'])]
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < count:
    text = files[rng.integers(len(files))].path.read_text(encoding='utf-8', errors='replace')
    lines = text.splitlines(keepends=True)
    if not lines:
      continue
    i = int(rng.integers(len(lines)))
    line = lines[i].rstrip('\n')
    if line.strip() and len(tokenizer.encode(line)) <= MAX_LINE:
      out.append((''.join(lines[:i]), line, '\n' + ''.join(lines[i + 1:])))
  return out


def fit(tokenizer, text: str, room: int, keep_end: bool) -> str:
  """The end (or the start) of `text` that encodes to at most `room` tokens."""
  while len(tokenizer.encode(text)) > room:
    cut = len(text) // 8 + 1
    text = text[cut:] if keep_end else text[:-cut]
  return text


def final_bpb(workdir: Path) -> float:
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').open()]
  return next(r['val/bpb'] for r in reversed(records) if 'val/bpb' in r)


def first_line(text: str) -> str:
  return text.split('\n', 1)[0]


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--fim', default='runs/fim')
  p.add_argument('--plain', default='runs/decoder')
  p.add_argument('--lines', type=int, default=200)
  p.add_argument('--context_chars', type=int, default=0,
                 help='characters of code on each side; 0: what fits the context')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--layout', choices=('psm', 'spm'), default='psm',
                 help="the FIM model's prompt: prefix first (psm) or suffix first (spm)")
  args = p.parse_args()
  fim_dir, plain_dir = Path(args.fim), Path(args.plain)
  results, cases = {}, None
  for name, workdir in (('fim', fim_dir), ('plain', plain_dir)):
    cfg, params, tok = load.model(workdir)
    cases = cases or held_out_lines(fim_dir, tok, args.lines, args.seed)
    room = cfg.max_len - MAX_LINE - 2 - 4  # the reply, the sentinels and BOS
    side = args.context_chars or 4 * cfg.max_len
    prompts = []
    for before, _, after in cases:
      prefix = fit(tok, before[-side:], room // 2, keep_end=True)
      if name == 'fim':
        suffix = fit(tok, after[:side], room - len(tok.encode(prefix)), keep_end=False)
        prompts.append(sampling.infill_prompt(tok, prefix, suffix, spm=args.layout == 'spm'))
      else:
        start = [tok.bos_id] if prefix == before else []  # BOS only at a file's start
        prompts.append([*start, *tok.encode(prefix)])
    got = []
    for i in range(0, len(prompts), BATCH):
      out = sampling.generate(cfg, params, prompts[i:i + BATCH], max_new_tokens=MAX_LINE + 2,
                              eos_id=tok.eos_id, pad_id=tok.pad_id)
      got += [tok.decode(t) for t in out.tokens]
    hits = sum(first_line(g) == line for g, (_, line, _) in zip(got, cases))
    results[name] = {'exact_match': hits / len(cases), 'bpb': final_bpb(workdir)}
  print(f'single-line infilling on {len(cases)} held-out lines '
        f'({describe()})')
  print('| run | sees | exact match | left-to-right val/bpb |\n|---|---|---|---|')
  print(f'| {fim_dir} (FIM, {args.layout.upper()}) | code before and after | {results["fim"]["exact_match"]:.1%} | '
        f'{results["fim"]["bpb"]:.4f} |')
  print(f'| {plain_dir} (plain) | code before | {results["plain"]["exact_match"]:.1%} | '
        f'{results["plain"]["bpb"]:.4f} |')
  print(json.dumps({'machine': describe(), 'lines': len(cases), 'layout': args.layout, 'fim_exact_match': results['fim']['exact_match'],
                    'plain_exact_match': results['plain']['exact_match'],
                    'fim_bpb': results['fim']['bpb'], 'plain_bpb': results['plain']['bpb']}))


if __name__ == '__main__':
  main()
