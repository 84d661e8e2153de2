"""Generation throughput of lm.sampling against transformers' `generate` in PyTorch.

The benchmark model (GPT-2 shape: vocab 8192, d_model 384, 6 layers, 6 heads, float32, random
weights), 256 new tokens after a 16-token prompt, no EOS (every row runs the whole budget):
greedy and top-k 50 + top-p 0.95 sampling at batch 1 and 8, and beam search with 4 beams at
batch 1, each beside GPT2LMHeadModel.generate (KV cache on) with the same weights. Each case
runs once in each framework to compile and warm up; then --rounds rounds each time one lm run
and one transformers run, back to back, in one process, each with the machine's threads. The
ratio is the median over rounds of that round's ratio (a burst of load from a neighbour on a
shared machine lands in one round, not in one framework's every run); tokens/s are each
framework's best round.

  python experiments/bench_sample.py [--rounds=5] [--new_tokens=256]

Prints a table, then one JSON line with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from lm import hf, models, sampling
from lm.models import DecoderConfig
from machine import describe  # experiments/machine.py

CFG = DecoderConfig(vocab_size=8192, num_layers=6, d_model=384, num_heads=6, mlp_dim=1536,
                  max_len=512)
PROMPT_LEN = 16
CASES = [  # name, batch, lm filter (or beams), transformers generate kwargs
    ('greedy', 1, sampling.temperature(0), 0, {'do_sample': False}),
    ('greedy', 8, sampling.temperature(0), 0, {'do_sample': False}),
    ('top-k 50 + top-p 0.95', 1, sampling.chain(sampling.top_k(50), sampling.top_p(0.95)), 0,
     {'do_sample': True, 'top_k': 50, 'top_p': 0.95}),
    ('top-k 50 + top-p 0.95', 8, sampling.chain(sampling.top_k(50), sampling.top_p(0.95)), 0,
     {'do_sample': True, 'top_k': 50, 'top_p': 0.95}),
    ('beam search, 4 beams', 1, None, 4, {'do_sample': False, 'num_beams': 4}),
]


def lm_runner(params, batch: int, filter_fn, beams: int, new_tokens: int):
  prompts = np.random.default_rng(batch).integers(0, CFG.vocab_size, (batch, PROMPT_LEN)).tolist()
  if beams:
    return lambda: sampling.beam_search(CFG, params, prompts, num_beams=beams,
                                        max_new_tokens=new_tokens, length_penalty=1.0)
  return lambda: sampling.generate(CFG, params, prompts, max_new_tokens=new_tokens,
                                   rng=jax.random.PRNGKey(0), filter_fn=filter_fn)


def torch_runner(model, batch: int, kwargs: dict, new_tokens: int):
  prompts = np.random.default_rng(batch).integers(0, CFG.vocab_size, (batch, PROMPT_LEN))
  inputs = torch.from_numpy(prompts)

  def run():
    with torch.no_grad():
      return model.generate(inputs, attention_mask=torch.ones_like(inputs),
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            pad_token_id=0, eos_token_id=None, use_cache=True, **kwargs)
  return run


def seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def alternate(ours, theirs, rounds: int) -> tuple[list[float], list[float]]:
  """Seconds of each run of `ours` and `theirs`, one of each per round, after a warm-up."""
  ours(), theirs()  # compile, warm up
  times = [(seconds(ours), seconds(theirs)) for _ in range(rounds)]
  return [a for a, _ in times], [b for _, b in times]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--new_tokens', type=int, default=256)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  transformers.logging.set_verbosity_error()
  boxed = models.build(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
  params = jax.tree.map(jnp.asarray, nn.meta.unbox(boxed))
  directory = Path(os.environ.get('TMPDIR', '/tmp')) / 'lm-bench-sample-gpt2'
  hf.save(CFG, params, directory)  # the same weights for both
  model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
  rows = []
  for name, batch, filter_fn, beams, kwargs in CASES:
    ours, theirs = alternate(lm_runner(params, batch, filter_fn, beams, args.new_tokens),
                             torch_runner(model, batch, kwargs, args.new_tokens), args.rounds)
    tokens = batch * args.new_tokens
    bar = 3.0 if batch == 1 and not beams else 2.0
    rows.append({'case': name, 'batch': batch, 'lm_tokens_per_sec': tokens / min(ours),
                 'hf_tokens_per_sec': tokens / min(theirs),
                 'ratio': statistics.median(b / a for a, b in zip(ours, theirs)),
                 'round_ratios': [b / a for a, b in zip(ours, theirs)], 'bar': bar})
  machine = describe()
  print(f'generate {args.new_tokens} tokens after {PROMPT_LEN}, GPT-2 shape (vocab 8192, d 384, '
        f'6 layers), float32; machine: {machine}; {args.rounds} alternating rounds: tokens/s '
        f'of the best, lm/HF the median of the rounds\' ratios (range in brackets)')
  print(f'| {"case":<22} | batch | {"lm tok/s":>9} | {"HF tok/s":>9} | lm/HF {"(range)":>12} '
        f'| bar |')
  print(f'|{"-" * 24}|-------|{"-" * 11}|{"-" * 11}|{"-" * 20}|-----|')
  for r in rows:
    spread = f'({min(r["round_ratios"]):.2f}-{max(r["round_ratios"]):.2f})'
    print(f'| {r["case"]:<22} | {r["batch"]:>5} | {r["lm_tokens_per_sec"]:>9,.0f} | '
          f'{r["hf_tokens_per_sec"]:>9,.0f} | {r["ratio"]:>5.2f} {spread:>12} | {r["bar"]:.0f}x |')
  print(json.dumps({'rows': rows, 'machine': machine, 'jax': jax.__version__,
                    'torch': torch.__version__, 'transformers': transformers.__version__}))


if __name__ == '__main__':
  main()
