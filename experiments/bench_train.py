"""Train-step throughput of lm against Hugging Face transformers' GPT2LMHeadModel in PyTorch.

Same shape for both (vocab 8192, d_model 384, 6 layers, 6 heads, sequence 256, batch 16,
float32, AdamW with gradient clipping), run in one invocation: each framework in a worker process
of its own (so neither's thread pool spins on the other's cores), the parent alternating timed
rounds between them so that both see the same machine. MFU is model FLOPs (lm.models.decoder.train_flops_per_token) over the
measured matmul peak of the machine (the better of JAX's and PyTorch's float32 matmul).

  python experiments/bench_train.py [--steps=5] [--rounds=2]

Prints a table, then one JSON line with the figures.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn
import jax
import numpy as np
import torch
import transformers

from lm import models, objectives, parallel, train
from lm.config import ModelConfig, TrainConfig
from lm.models import decoder

SHAPE = dict(vocab_size=8192, num_layers=6, d_model=384, num_heads=6, mlp_dim=1536, max_len=256)
SEQ_LEN, BATCH = 256, 16


def lm_step_fn(cfg: ModelConfig, t: TrainConfig):
  """A compiled lm train step on a mesh of every device, and its initial state."""
  model = models.build(cfg)
  mesh = parallel.make_mesh((jax.device_count(), 1, 1))
  loss_fn = functools.partial(objectives.clm_loss, apply_fn=model.apply, pad_id=-1)
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
    init_fn, _, shardings = train.abstract_state(model, train.make_optimizer(t), SEQ_LEN, 0, mesh)
    batch_sharding = parallel.batch_sharding(mesh)
    step = jax.jit(train.make_train_step(loss_fn, train.make_schedule(t)),
                   in_shardings=(shardings, batch_sharding), donate_argnums=0)
    state = init_fn()
  batch = parallel.global_batch(random_batch(), batch_sharding)

  def run(state, n):
    for _ in range(n):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics['loss'])
    return state
  return run, state


def torch_step_fn(cfg: ModelConfig, t: TrainConfig):
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model,
      n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_dim,
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=(t.b1, t.b2),
                          weight_decay=t.weight_decay)
  batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in random_batch().items()}

  def run(state, n):
    for _ in range(n):
      logits = model(batch['inputs']).logits
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size),
                                               batch['targets'].reshape(-1))
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
      opt.step()
    return state
  return run, None


def random_batch() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {k: rng.integers(0, SHAPE['vocab_size'], (BATCH, SEQ_LEN)).astype(np.int32)
          for k in ('inputs', 'targets')}


def torch_peak_flops(n: int = 2048, repeats: int = 5) -> float:
  a = torch.ones(n, n)
  a @ a
  best = min(_timed(lambda: a @ a) for _ in range(repeats))
  return 2 * n**3 / best


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


RUNNERS = {'lm (JAX)': lm_step_fn, 'transformers (PyTorch)': torch_step_fn}


def worker(name: str) -> None:
  """Builds one framework's step, warms it up, then for each line `n` on stdin runs n steps
  and answers the seconds per step."""
  torch.set_num_threads(os.cpu_count() or 1)
  run, state = RUNNERS[name](ModelConfig(**SHAPE), TrainConfig(steps=1000, learning_rate=1e-3))
  state = run(state, 2)  # compile, warm up
  print('ready', flush=True)
  for line in sys.stdin:
    start = time.perf_counter()
    state = run(state, int(line))
    print((time.perf_counter() - start) / int(line), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=5, help='timed steps per round')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--worker', choices=list(RUNNERS), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args.worker)
  torch.set_num_threads(os.cpu_count() or 1)
  cfg = ModelConfig(**SHAPE)
  flops_per_token = decoder.train_flops_per_token(cfg, SEQ_LEN)
  workers = {name: subprocess.Popen([sys.executable, __file__, f'--worker={name}'],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for name in RUNNERS}
  for proc in workers.values():
    if proc.stdout.readline().strip() != 'ready':
      sys.exit(f'a benchmark worker failed (exit {proc.wait()})')
  peak = max(train.measure_peak_flops('float32'), torch_peak_flops())  # with both idle
  times: dict[str, list[float]] = {name: [] for name in workers}
  for _ in range(args.rounds):
    for name, proc in workers.items():
      proc.stdin.write(f'{args.steps}\n')
      proc.stdin.flush()
      times[name].append(float(proc.stdout.readline()))
  for proc in workers.values():
    proc.stdin.close()
    proc.wait()
  tokens = BATCH * SEQ_LEN
  rows = {name: {'step_ms': 1e3 * statistics.median(ts),
                 'tokens_per_sec': tokens / statistics.median(ts)} for name, ts in times.items()}
  for row in rows.values():
    row['mfu'] = row['tokens_per_sec'] * flops_per_token / peak
  lm_row, peer_row = rows['lm (JAX)'], rows['transformers (PyTorch)']
  ratio = lm_row['tokens_per_sec'] / peer_row['tokens_per_sec']
  machine = f'{platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].platform}'
  print(f'train step, GPT-2 shape {SHAPE}, seq {SEQ_LEN}, batch {BATCH}, float32, AdamW')
  print(f'machine: {machine}; matmul peak {peak / 1e9:.0f} GFLOP/s; '
        f'{flops_per_token / 1e6:.1f} MFLOP/token; median of {args.rounds} rounds of '
        f'{args.steps} steps')
  print(f'| {"framework":<24} | {"step ms":>8} | {"tokens/s":>9} | {"MFU":>6} |')
  print(f'|{"-" * 26}|{"-" * 10}|{"-" * 11}|{"-" * 8}|')
  for name, row in rows.items():
    print(f'| {name:<24} | {row["step_ms"]:>8.0f} | {row["tokens_per_sec"]:>9,.0f} | '
          f'{row["mfu"]:>6.1%} |')
  print(f'ratio lm / transformers tokens/s: {ratio:.2f} (bar 1.0, goal 1.2)')
  print(json.dumps({'lm_tokens_per_sec': lm_row['tokens_per_sec'],
                    'peer_tokens_per_sec': peer_row['tokens_per_sec'], 'ratio': ratio,
                    'lm_mfu': lm_row['mfu'], 'peer_mfu': peer_row['mfu'],
                    'peak_flops_per_sec': peak, 'flops_per_token': flops_per_token,
                    'machine': machine, 'jax': jax.__version__, 'torch': torch.__version__}))


if __name__ == '__main__':
  main()
