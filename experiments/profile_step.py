"""Where a benchmark train step's time goes, on this machine: its matmuls, and the rest.

Compiles lm's train step of a bench_train.py or bench_ssm.py variant and times it; reads the
compiled HLO for every matmul (dot) in it and times each distinct one alone, in JAX (the step's
own XLA options) and in PyTorch (oneDNN / MKL on CPU), at the same shapes; then traces two
steps with jax.profiler and sums the time of the other ops by kind (an XLA fusion's name without
its number: copies, transposes, elementwise fusions, reductions). The step less its matmuls
timed alone is what the non-matmul work costs (the ops can overlap on two cores, so the trace's
sums are a ranking, not a partition).

  python experiments/profile_step.py --variant=llama [--top=15]
  variants: gpt2, llama, moe, moe_cap (bench_train.py); mamba, mamba2 (bench_ssm.py)

Prints the tables, then one JSON line with the figures.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np
import torch

from bench_ssm import MAMBA, MAMBA2
from bench_train import BATCH, SEQ_LEN, VARIANTS, lm_step_fn, median_seconds
from lm.config import TrainConfig
from machine import describe  # experiments/machine.py

CONFIGS = {**VARIANTS, 'mamba': MAMBA, 'mamba2': MAMBA2}
_DEF = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]')
_DOT = re.compile(r'^\s*(?:ROOT )?%[\w.\-]+ = \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)'
                  r'(.*?)(?:, metadata=|$)')


def _dims(text: str, key: str) -> tuple[int, ...]:
  found = re.search(key + r'=\{([\d,]*)\}', text)
  return tuple(int(d) for d in found.group(1).split(',') if d) if found else ()


def hlo_dots(hlo: str) -> collections.Counter:
  """(lhs shape, rhs shape, lhs contracting, rhs contracting, lhs batch, rhs batch) -> how
  many times the step runs a dot of that kind."""
  shapes = {}
  for line in hlo.splitlines():
    found = _DEF.match(line)
    if found:
      shapes[found.group(1)] = tuple(int(d) for d in found.group(3).split(',') if d)
  dots = collections.Counter()
  for line in hlo.splitlines():
    found = _DOT.match(line)
    if found and found.group(2) in shapes and found.group(3) in shapes:
      rest = found.group(4)
      dots[(shapes[found.group(2)], shapes[found.group(3)],
            _dims(rest, 'lhs_contracting_dims'), _dims(rest, 'rhs_contracting_dims'),
            _dims(rest, 'lhs_batch_dims'), _dims(rest, 'rhs_batch_dims'))] += 1
  return dots


def _einsum(lhs, rhs, lc, rc, lb, rb) -> str:
  """The einsum of a dot_general: batch dims, then lhs free, then rhs free (XLA's order)."""
  letters = iter('abcdefghijklmnopqrstuvwxyz')
  a, b = [next(letters) for _ in lhs], [None] * len(rhs)
  for i, j in zip(lb + lc, rb + rc):
    b[j] = a[i]
  b = [x or next(letters) for x in b]
  out = [a[i] for i in lb] + [a[i] for i in range(len(lhs)) if i not in lb + lc] + [
      b[j] for j in range(len(rhs)) if j not in rb + rc]
  return f'{"".join(a)},{"".join(b)}->{"".join(out)}'


def time_dots(dots: collections.Counter) -> list[dict]:
  """Each distinct dot alone: its FLOPs and ms in JAX and in PyTorch (float32)."""
  rows = []
  rng = np.random.default_rng(0)
  for (lhs, rhs, lc, rc, lb, rb), count in dots.items():
    x, y = (rng.standard_normal(s).astype(np.float32) for s in (lhs, rhs))
    spec = _einsum(lhs, rhs, lc, rc, lb, rb)
    dot = jax.jit(lambda x, y: jax.lax.dot_general(x, y, ((lc, rc), (lb, rb))))
    jx, jy = jax.device_put(x), jax.device_put(y)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    flops = 2 * np.prod(lhs, dtype=float) * np.prod([rhs[j] for j in range(len(rhs))
                                                     if j not in rb + rc], dtype=float)
    rows.append({'einsum': spec, 'lhs': lhs, 'rhs': rhs, 'count': count, 'flops': flops,
                 'jax_ms': 1e3 * median_seconds(lambda: dot(jx, jy).block_until_ready(), 5),
                 'torch_ms': 1e3 * median_seconds(lambda: torch.einsum(spec, tx, ty), 5)})
  return sorted(rows, key=lambda r: -r['count'] * r['jax_ms'])


def op_kinds(run, state, steps: int) -> tuple[collections.Counter, collections.Counter]:
  """ms a step and calls a step of each op kind in a jax.profiler trace of `steps` steps."""
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      run(state, steps)
    trace = next(Path(directory).rglob('*.trace.json.gz'))
    events = json.load(gzip.open(trace))
  events = events['traceEvents'] if isinstance(events, dict) else events
  ms, calls = collections.Counter(), collections.Counter()
  for e in events:
    name = e.get('name', '')
    if e.get('ph') != 'X' or 'dur' not in e or name.startswith(('$', 'end:')) or any(
        word in name for word in ('Thunk', 'Pjit', 'Executable', 'ThreadPool', 'np.asarray')):
      continue
    kind = re.sub(r'\.\d+$', '', name)
    ms[kind] += e['dur'] / 1e3 / steps
    calls[kind] += 1 / steps
  return ms, calls


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='llama', choices=sorted(CONFIGS))
  parser.add_argument('--top', type=int, default=15, help='matmuls and op kinds to list')
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  run, state = lm_step_fn(CONFIGS[args.variant], TrainConfig(steps=1000, learning_rate=1e-3))
  state = run(state, 2)
  seconds = []
  for _ in range(3):
    start = time.perf_counter()
    state = run(state, 2)
    seconds.append((time.perf_counter() - start) / 2)
  step_ms = 1e3 * min(seconds)
  dots = time_dots(hlo_dots(run.hlo))
  jax_ms = sum(r['count'] * r['jax_ms'] for r in dots)
  torch_ms = sum(r['count'] * r['torch_ms'] for r in dots)
  flops = sum(r['count'] * r['flops'] for r in dots)
  ms, calls = op_kinds(run, state, 2)
  print(f'{args.variant} train step (sequence {SEQ_LEN}, batch {BATCH}, float32), {describe()}')
  print(f'step {step_ms:.0f} ms; its {sum(r["count"] for r in dots)} matmuls ({flops / 1e9:.0f} '
        f'GFLOP) timed alone: JAX {jax_ms:.0f} ms, PyTorch {torch_ms:.0f} ms; the step less its '
        f'matmuls: {step_ms - jax_ms:.0f} ms')
  print(f'\n| {"matmul (einsum)":<18} | {"lhs":<18} | {"rhs":<18} | {"x":>3} | '
        f'{"JAX GFLOP/s":>11} | {"torch GFLOP/s":>13} | {"JAX ms a step":>13} | '
        f'{"torch ms":>8} |')
  print('|' + '|'.join('-' * (w + 2) for w in (18, 18, 18, 3, 11, 13, 13, 8)) + '|')
  for r in dots[:args.top]:
    print(f'| {r["einsum"]:<18} | {str(r["lhs"]):<18} | {str(r["rhs"]):<18} | {r["count"]:>3} | '
          f'{r["flops"] / r["jax_ms"] / 1e6:>11.0f} | {r["flops"] / r["torch_ms"] / 1e6:>13.0f} | '
          f'{r["count"] * r["jax_ms"]:>13.1f} | {r["count"] * r["torch_ms"]:>8.1f} |')
  print(f'\nthe other ops in a jax.profiler trace (ms a step; they may overlap):')
  print(f'| {"op kind":<32} | {"calls":>6} | {"ms":>7} |')
  print('|' + '|'.join('-' * (w + 2) for w in (32, 6, 7)) + '|')
  others = [(kind, t) for kind, t in ms.most_common() if kind not in ('dot', 'ynn_fusion')]
  for kind, t in others[:args.top]:
    print(f'| {kind:<32} | {calls[kind]:>6.0f} | {t:>7.1f} |')
  print(json.dumps({'variant': args.variant, 'machine': describe(), 'step_ms': step_ms,
                    'matmul_jax_ms': jax_ms, 'matmul_torch_ms': torch_ms, 'matmul_flops': flops,
                    'matmuls': dots,
                    'op_kinds_ms': dict(others[:args.top])}, default=str))


if __name__ == '__main__':
  main()
