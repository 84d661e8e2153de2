"""The encoder-decoder (T5 v1.1 layout: gated GELU, untied head) against transformers'
T5ForConditionalGeneration in PyTorch, with the same weights.

Shape: vocab 8192, d_model 384, 6 + 6 layers, 6 heads, MLP 1024, float32, random weights.
- Train step (AdamW, gradient clipping) on inputs of 256 and targets of 64 tokens at batch 16:
  tokens/s counts both (16 x 320 a step); MFU from lm.models.encdec's encoder and decoder
  FLOPs over the machine's measured matmul peak. Each framework in a worker process of its own,
  timed in alternating rounds (bench_train.py's machinery).
- Greedy generation of 64 tokens from 256-token inputs at batch 1 and 8, no EOS: lm.sampling
  against `generate` (its cache on), alternating in one process (bench_sample.py's machinery).

  python experiments/bench_encdec.py [--steps=3] [--rounds=3] [--new_tokens=64]

Prints a table, then one JSON line with the figures.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from experiments.bench_sample import alternate
from experiments.bench_train import (compiled_steps, serve, start_workers, timed_rounds,
                                     torch_peak_flops, torch_steps)
from lm import hf, models, objectives, sampling, train
from lm.config import TrainConfig
from lm.models import EncDecConfig
from lm.models import encdec
from machine import describe  # experiments/machine.py

CFG = EncDecConfig(vocab_size=8192, num_layers=6, num_decoder_layers=6, d_model=384,
                   num_heads=6, mlp_dim=1024, max_len=512, mlp='geglu', tie_embeddings=False)
INPUT_LEN, TARGET_LEN, BATCH = 256, 64, 16


def random_batch() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {'inputs': rng.integers(0, CFG.vocab_size, (BATCH, INPUT_LEN)).astype(np.int32),
          'input_mask': np.ones((BATCH, INPUT_LEN), bool),
          'targets': rng.integers(0, CFG.vocab_size, (BATCH, TARGET_LEN)).astype(np.int32),
          'loss_mask': np.ones((BATCH, TARGET_LEN), bool)}


def lm_step_fn(t: TrainConfig):
  model = models.build(CFG)
  loss_fn = functools.partial(objectives.seq2seq_loss, apply_fn=model.apply, start_id=0)
  return compiled_steps(model, loss_fn, t, INPUT_LEN, random_batch())


def torch_model() -> transformers.T5ForConditionalGeneration:
  hf_config = hf.config_to_hf(CFG)
  hf_config.pop('model_type')
  return transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_config))


def torch_step_fn(t: TrainConfig):
  model = torch_model()
  batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in random_batch().items()
           if not k.endswith('mask')}
  loss = lambda: model(input_ids=batch['inputs'], labels=batch['targets']).loss
  return torch_steps(model, loss, t), None


RUNNERS = {'lm': lm_step_fn, 'transformers': torch_step_fn}


def worker(framework: str) -> None:
  torch.set_num_threads(os.cpu_count() or 1)
  serve(*RUNNERS[framework](TrainConfig(steps=1000, learning_rate=1e-3)), warmup=2)


def generation(rounds: int, new_tokens: int) -> list[dict]:
  """Greedy generation at batch 1 and 8, lm beside transformers, the same weights."""
  boxed = models.build(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
  params = jax.tree.map(jnp.asarray, nn.meta.unbox(boxed))
  directory = Path(os.environ.get('TMPDIR', '/tmp')) / 'lm-bench-encdec-t5'
  hf.save(CFG, params, directory)
  model = transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
  rows = []
  for batch in (1, 8):
    prompts = np.random.default_rng(batch).integers(0, CFG.vocab_size, (batch, INPUT_LEN))
    ours = lambda: sampling.generate(CFG, params, prompts.tolist(), max_new_tokens=new_tokens)
    inputs = torch.from_numpy(prompts)

    def theirs():
      with torch.no_grad():
        return model.generate(inputs, attention_mask=torch.ones_like(inputs),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, num_beams=1, eos_token_id=None, use_cache=True)
    lm_s, hf_s = alternate(ours, theirs, rounds)
    tokens = batch * new_tokens
    rows.append({'batch': batch, 'lm_tokens_per_sec': tokens / min(lm_s),
                 'hf_tokens_per_sec': tokens / min(hf_s),
                 'ratio': statistics.median(b / a for a, b in zip(lm_s, hf_s)),
                 'round_ratios': [b / a for a, b in zip(lm_s, hf_s)]})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=3, help='timed train steps per round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--new_tokens', type=int, default=64)
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args.worker)
  torch.set_num_threads(os.cpu_count() or 1)
  transformers.logging.set_verbosity_error()
  workers = start_workers(__file__, list(RUNNERS))
  peak = max(train.measure_peak_flops('float32'), torch_peak_flops())  # with all idle
  times = timed_rounds(workers, args.rounds, lambda name: args.steps)
  enc = encdec.encoder_flops_per_token(CFG, INPUT_LEN)
  dec = encdec.decoder_flops_per_token(CFG, INPUT_LEN, TARGET_LEN)
  step_flops = BATCH * (INPUT_LEN * enc + TARGET_LEN * dec)
  tokens = BATCH * (INPUT_LEN + TARGET_LEN)
  train_rows = {}
  for framework in RUNNERS:
    seconds = statistics.median(times[framework])
    train_rows[framework] = {'step_ms': 1e3 * seconds, 'tokens_per_sec': tokens / seconds,
                             'mfu': step_flops / seconds / peak}
  train_ratio = train_rows['lm']['tokens_per_sec'] / train_rows['transformers']['tokens_per_sec']
  gen_rows = generation(args.rounds, args.new_tokens)
  machine = describe()
  params = sum(x.size for x in jax.tree.leaves(models.abstract_params(models.build(CFG))))
  print(f'T5 v1.1 layout, vocab 8192, d 384, 6 + 6 layers, {params / 1e6:.1f}M parameters, '
        f'float32; machine: {machine}; matmul peak {peak / 1e9:.0f} GFLOP/s')
  print(f'train step: inputs {INPUT_LEN}, targets {TARGET_LEN}, batch {BATCH}, AdamW; '
        f'{enc / 1e6:.1f} MFLOP a encoder token, {dec / 1e6:.1f} a decoder token; median of '
        f'{args.rounds} rounds of {args.steps} steps')
  print(f'| {"":<12} | {"step ms":>8} | {"tokens/s":>8} | {"MFU":>6} |')
  print(f'|{"-" * 14}|{"-" * 10}|{"-" * 10}|{"-" * 8}|')
  for framework, r in train_rows.items():
    print(f'| {framework:<12} | {r["step_ms"]:>8.0f} | {r["tokens_per_sec"]:>8,.0f} | '
          f'{r["mfu"]:>6.1%} |')
  print(f'lm / transformers tokens/s: {train_ratio:.2f} (bar: 1.0)')
  print(f'\ngreedy generation of {args.new_tokens} tokens from {INPUT_LEN}-token inputs, '
        f'{args.rounds} alternating rounds: tokens/s of the best, lm/HF the median ratio')
  print(f'| batch | {"lm tok/s":>9} | {"HF tok/s":>9} | lm/HF {"(range)":>12} | bar |')
  print(f'|-------|{"-" * 11}|{"-" * 11}|{"-" * 20}|-----|')
  for r in gen_rows:
    spread = f'({min(r["round_ratios"]):.2f}-{max(r["round_ratios"]):.2f})'
    print(f'| {r["batch"]:>5} | {r["lm_tokens_per_sec"]:>9,.0f} | {r["hf_tokens_per_sec"]:>9,.0f}'
          f' | {r["ratio"]:>5.2f} {spread:>12} |  2x |')
  print(json.dumps({'train': {**train_rows, 'ratio': train_ratio,
                              'encoder_flops_per_token': enc, 'decoder_flops_per_token': dec},
                    'generate': gen_rows, 'peak_flops_per_sec': peak, 'machine': machine,
                    'jax': jax.__version__, 'torch': torch.__version__,
                    'transformers': transformers.__version__}))


if __name__ == '__main__':
  main()
