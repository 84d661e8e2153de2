"""Step time around a checkpoint save: orbax's synchronous save against lm's asynchronous one.

The default config's run (configs/decoder.py, its corpus and batch) and a larger model of the
same family (`large`: d_model 512, 8 layers, 24M parameters, batch 4) train step by step; a
save starts after every `--every`-th step. Each step's wall time is taken with the state ready
(so a step that pays for a save shows it), for both modes in alternating rounds. Reported per
mode: the median step without a save nearby, the step that starts the save (the save call
included), the `--after` steps that follow (an asynchronous write competes with them for the
cores), and the cost of a save to training: the time of that window beyond as many median steps.

  python experiments/bench_checkpoint.py [--sizes=default,large] [--rounds=2] [--saves=3]

Prints a table, then one JSON line with the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn
import jax

from lm import checkpoint, parallel, train
from lm.config import from_file
from machine import describe  # experiments/machine.py

ROOT = Path(__file__).resolve().parents[1]
# The byte-level data and batch of the figures in the README (the decoder default's until it
# moved to a BPE of 2048 ids and a context of 256).
MEASURED = {'tokenizer': dict(kind='bytes'), 'data': dict(seq_len=128),
            'model': dict(max_len=128), 'train': dict(batch_size=32)}
SIZES = {
    'default': {},
    'large': {'model': dict(d_model=512, num_layers=8, num_heads=8, num_kv_heads=4,
                            mlp_dim=1408), 'train': dict(batch_size=4)},
}


def make_run(size: str, workdir: Path):
  config = from_file(ROOT / 'configs' / 'decoder.py')
  for section, values in MEASURED.items():
    config[section].update(values)
  for section, values in SIZES[size].items():
    config[section].update(values)
  return train.setup(config, workdir)


def timed_steps(r, async_save: bool, saves: int, every: int, after: int, workdir: Path):
  """Per-step wall times; the step after which a save starts is flagged."""
  t = r.cfg.train
  batch_spec = {k: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                        sharding=parallel.batch_sharding(r.mesh, len(s.shape)))
                for k, s in r.task.batch_shapes().items()}
  batch_sharding = {k: s.sharding for k, s in batch_spec.items()}
  ckpts = checkpoint.Checkpoints(workdir / f'checkpoints-{async_save}-{time.time_ns()}',
                                 keep=2, async_save=async_save)
  with jax.set_mesh(r.mesh), nn.logical_axis_rules(parallel.RULES):
    step_fn = jax.jit(train.make_train_step(r.task.loss_fn, train.make_schedule(t)),
                      in_shardings=(r.shardings, batch_sharding),
                      out_shardings=(r.shardings, parallel.replicated(r.mesh)),
                      donate_argnums=0).lower(r.abstract, batch_spec).compile()
    data = iter(r.task.train_dataset(0, 1))
    state = r.init_fn()
    for _ in range(3):  # warm-up
      state, _ = step_fn(state, parallel.global_batch(next(data), batch_sharding))
    jax.block_until_ready(state)
    times, save_steps = [], set()
    for step in range(1, saves * every + after + 1):
      batch = parallel.global_batch(next(data), batch_sharding)
      start = time.perf_counter()
      state, _ = step_fn(state, batch)
      jax.block_until_ready(state)
      if step % every == 0 and len(save_steps) < saves:
        ckpts.save(step, state, data.get_state(), r.cfg)
        save_steps.add(step)
      times.append(time.perf_counter() - start)
    ckpts.close()
  return times, save_steps


def summarise(times: list[float], save_steps: set[int], after: int) -> dict[str, float]:
  near = {s + k for s in save_steps for k in range(after + 1)}
  plain = statistics.median(t for i, t in enumerate(times, 1) if i not in near)
  saving = statistics.median(times[s - 1] for s in save_steps)
  following = statistics.median(sum(times[s:s + after]) / after for s in save_steps)
  window = statistics.median(sum(times[s - 1:s + after]) for s in save_steps)
  return {'step_s': plain, 'save_step_s': saving, 'following_step_s': following,
          'save_cost_s': window - (after + 1) * plain}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='default,large')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--saves', type=int, default=3, help='saves per round')
  parser.add_argument('--every', type=int, default=8, help='steps between saves')
  parser.add_argument('--after', type=int, default=4, help='steps counted after a save')
  args = parser.parse_args()
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for size in args.sizes.split(','):
      r = make_run(size, Path(tmp) / size)
      state_mb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(r.abstract)) / 2**20
      runs = {False: ([], set()), True: ([], set())}
      for _ in range(args.rounds):
        for mode in (False, True):  # alternating rounds: both modes see the same machine
          times, saves = timed_steps(r, mode, args.saves, args.every, args.after, Path(tmp))
          offset = len(runs[mode][0])
          runs[mode][0].extend(times)
          runs[mode][1].update(offset + s for s in saves)
      results[size] = {'state_mb': state_mb, **{
          ('async' if mode else 'sync'): summarise(times, saves, args.after)
          for mode, (times, saves) in runs.items()}}

  print(f'\nstep time around a checkpoint save ({describe()}, {jax.device_count()} '
        f'device(s); median over '
        f'{args.rounds * args.saves} saves)\n')
  header = (f'{"size":<8} {"state":>8} {"mode":<6} {"step":>8} {"save step":>10} '
            f'{"next steps":>11} {"save cost":>10}')
  print(header + '\n' + '-' * len(header))
  for size, res in results.items():
    for mode in ('sync', 'async'):
      m = res[mode]
      print(f'{size:<8} {res["state_mb"]:>6.0f}MB {mode:<6} {m["step_s"] * 1e3:>6.0f}ms '
            f'{m["save_step_s"] * 1e3:>8.0f}ms {m["following_step_s"] * 1e3:>9.0f}ms '
            f'{m["save_cost_s"] * 1e3:>8.0f}ms')
  print('\n(step: median without a save nearby; save step: the step that starts a save, the '
        'save call included;\n next steps: the mean of the steps after it; save cost: that '
        'window beyond as many median steps)')
  print(json.dumps({f'{size}_{mode}_{k}': round(v, 5) for size, res in results.items()
                    for mode in ('sync', 'async') for k, v in res[mode].items()}
                   | {f'{size}_state_mb': round(res['state_mb'], 1)
                      for size, res in results.items()} | {'machine': describe()}))


if __name__ == '__main__':
  main()
