"""Train-step throughput of lm against Hugging Face transformers' model of the same
architecture in PyTorch.

One benchmark shape (vocab 8192, d_model 384, 6 layers, 6 heads, sequence 256, batch 16,
float32, AdamW with gradient clipping) in three variants:
  gpt2   learned positions, LayerNorm, GELU MLP 1536, biases, tied   vs GPT2LMHeadModel
  llama  RoPE, RMSNorm, SwiGLU MLP 1024, 2 KV heads, no biases        vs LlamaForCausalLM
  moe    llama with 8 SwiGLU experts of 512, 2 per token (+ the       vs MixtralForCausalLM
         load-balancing loss): the active parameters of llama, 4x its MLP weights
  moe_cap  moe with a capacity factor of 1.25 (lm drops the          vs MixtralForCausalLM
         assignments past it; transformers drops none)
Each (variant, framework) runs in a worker process of its own (so no thread pool spins on
another's cores); the parent alternates timed rounds between them so that all see the same
machine. MFU is model FLOPs (lm.models.train_flops_per_token, active parameters for the
MoE) over the measured matmul peak of the machine (the better of JAX's and PyTorch's).

  python experiments/bench_train.py [--variants=gpt2,llama,moe,moe_cap] [--steps=5] [--rounds=2]
  python experiments/bench_train.py --accum_steps=4   # gradient accumulation: memory, time
  python experiments/bench_train.py --moe_dispatch    # one MoE layer routed each way
  python experiments/bench_train.py --dtype=bfloat16  # bfloat16 compute (PyTorch: autocast)

Prints a table, then one JSON line with the figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
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

from lm import hf, models, objectives, parallel, train
from lm.config import TrainConfig
from lm.models import DecoderConfig
from lm.models.layers import mlp
from machine import cpu_model, describe  # experiments/machine.py


SHAPE = dict(vocab_size=8192, num_layers=6, d_model=384, num_heads=6, mlp_dim=1536, max_len=256)
LLAMA = dict(SHAPE, mlp_dim=1024, num_kv_heads=2, positions='rope', norm='rmsnorm', mlp='swiglu',
             use_bias=False, tie_embeddings=False)
VARIANTS = {'gpt2': DecoderConfig(**SHAPE), 'llama': DecoderConfig(**LLAMA),
            'moe': DecoderConfig(**dict(LLAMA, mlp_dim=512, num_experts=8, experts_per_token=2)),
            'moe_cap': DecoderConfig(**dict(LLAMA, mlp_dim=512, num_experts=8, experts_per_token=2,
                                            moe_capacity_factor=1.25))}
SEQ_LEN, BATCH = 256, 16


def lm_step_fn(cfg: DecoderConfig, t: TrainConfig):
  """A compiled lm train step on a mesh of every device, and its initial state."""
  model = models.build(cfg)
  loss_fn = functools.partial(objectives.clm_loss, apply_fn=model.apply)  # with moe_aux
  return compiled_steps(model, loss_fn, t, SEQ_LEN, random_batch())


def compiled_steps(model, loss_fn, t: TrainConfig, seq_len: int, batch: dict[str, np.ndarray],
                   accum_steps: int = 1):
  """(run(state, n): n jitted train steps of `loss_fn` on `batch`, on a mesh of every device;
  the initial state). `run.memory` is the compiled step's memory analysis, `run.hlo` its
  optimised HLO."""
  mesh = parallel.make_mesh((jax.device_count(), 1, 1))
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
    init_fn, _, shardings = train.abstract_state(model, train.make_optimizer(t, model), seq_len,
                                                 0, mesh)
    batch_sharding = parallel.batch_sharding(mesh)
    step = jax.jit(train.make_train_step(loss_fn, train.make_schedule(t), accum_steps),
                   in_shardings=(shardings, batch_sharding), donate_argnums=0)
    state = init_fn()
  batch = parallel.global_batch(batch, batch_sharding)
  step = step.lower(state, batch).compile()

  def run(state, n):
    for _ in range(n):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics['loss'])
    return state
  run.memory = step.memory_analysis()
  run.hlo = step.as_text()  # the compiled step (experiments/profile_step.py reads its matmuls)
  return run, state


def accumulation(k: int, steps: int, rounds: int) -> dict[str, float]:
  """The llama variant's step with k microbatches against k=1 at the same global batch: the
  compiled step's temporary memory (XLA's buffer assignment: activations, gradients,
  accumulators; the state and batch are arguments apart) and the seconds per step."""
  cfg = VARIANTS['llama']
  t = TrainConfig(steps=1000, learning_rate=1e-3)
  model = models.build(cfg)
  loss_fn = functools.partial(objectives.clm_loss, apply_fn=model.apply)
  out = {}
  for accum in (1, k):
    run, state = compiled_steps(model, loss_fn, t, SEQ_LEN, random_batch(), accum)
    state = run(state, 2)
    times = []
    for _ in range(rounds):
      start = time.perf_counter()
      state = run(state, steps)
      times.append((time.perf_counter() - start) / steps)
    out[accum] = {'temp_bytes': run.memory.temp_size_in_bytes,
                  'argument_bytes': run.memory.argument_size_in_bytes,
                  'step_ms': 1e3 * statistics.median(times)}
    del state
  print(f'gradient accumulation, llama variant, global batch {BATCH} x {SEQ_LEN}, '
        f'{cpu_model()}:')
  print(f'| {"k":>2} | {"temporaries MB":>14} | {"state+batch MB":>14} | {"step ms":>7} |')
  print('|----|----------------|----------------|---------|')
  for accum, row in out.items():
    print(f'| {accum:>2} | {row["temp_bytes"] / 1e6:>14.1f} | {row["argument_bytes"] / 1e6:>14.1f} '
          f'| {row["step_ms"]:>7.0f} |')
  ratio = {'temp_memory_ratio': out[k]['temp_bytes'] / out[1]['temp_bytes'],
           'step_time_ratio': out[k]['step_ms'] / out[1]['step_ms']}
  print(f'k={k} / k=1: temporaries {ratio["temp_memory_ratio"]:.2f}x, step time '
        f'{ratio["step_time_ratio"]:.2f}x')
  return {'accum_steps': k, **{f'k{a}_{key}': v for a, row in out.items() for key, v in row.items()},
          **ratio}


def median_seconds(fn, repeats: int) -> float:
  """The median wall time of `repeats` calls of fn, after one call to compile and warm up."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def moe_dispatch(rounds: int) -> dict[str, dict[str, float]]:
  """One MoE layer of the moe variant (8 experts of 512, top 2, d_model 384) on the benchmark's
  16 x 256 tokens, forward and forward + backward, routed each way, beside the dense SwiGLU MLP
  of equal active parameters (width 1024): the median ms of `rounds` timings each."""
  cfg = VARIANTS['moe']
  e, k, f, d = cfg.num_experts, cfg.experts_per_token, cfg.mlp_dim, cfg.d_model
  x_BxTxD = jax.random.normal(jax.random.PRNGKey(0), (BATCH, SEQ_LEN, d))
  moe = mlp.MoeMlp(e, k, f)
  params = nn.meta.unbox(moe.init(jax.random.PRNGKey(1), x_BxTxD)['params'])

  def ragged(p, x_BxTxD):
    x_NxD = x_BxTxD.reshape(-1, d)
    weights_NxK, experts_NxK = jax.lax.top_k(jax.nn.softmax(x_NxD @ p['router']), k)
    weights_NxK = weights_NxK / weights_NxK.sum(-1, keepdims=True)
    return mlp.dropless_experts(x_NxD, experts_NxK, weights_NxK,
                                jnp.concatenate([p['gate'], p['up']], axis=2), p['down'],
                                matmul=jax.lax.ragged_dot)
  dense = mlp.Mlp('swiglu', k * f, use_bias=False)
  dense_params = nn.meta.unbox(dense.init(jax.random.PRNGKey(1), x_BxTxD)['params'])
  arms = {'dense SwiGLU of equal active parameters': (dense.apply, dense_params),
          'no drop: grouped blocks (the default)': (lambda v, x: moe.apply(v, x)[0], params),
          'ragged_dot': (lambda v, x: ragged(v['params'], x), params)}
  for factor in (1.0, 1.25, 2.0):
    capped = mlp.MoeMlp(e, k, f, capacity_factor=factor)
    arms[f'capacity factor {factor}'] = (lambda v, x, m=capped: m.apply(v, x)[0], params)
  out = {}
  for name, (apply, p) in arms.items():
    loss = lambda p, x: jnp.sum(apply({'params': p}, x) ** 2)
    fns = {'forward_ms': jax.jit(loss), 'forward_backward_ms': jax.jit(jax.grad(loss, (0, 1)))}
    out[name] = {key: 1e3 * median_seconds(lambda: jax.block_until_ready(fn(p, x_BxTxD)), rounds)
                 for key, fn in fns.items()}
  print(f'one MoE layer ({e} experts of {f}, top {k}, d_model {d}) on {BATCH} x {SEQ_LEN} '
        f'tokens, float32, {describe()}; median of {rounds}:')
  print(f'| {"routing":<40} | {"forward ms":>10} | {"fwd+bwd ms":>10} |')
  print('|' + '|'.join('-' * (w + 2) for w in (40, 10, 10)) + '|')
  for name, row in out.items():
    print(f'| {name:<40} | {row["forward_ms"]:>10.0f} | {row["forward_backward_ms"]:>10.0f} |')
  return out


def torch_model(cfg: DecoderConfig):
  """transformers' model of the same architecture (lm.hf writes its config)."""
  hf_config = hf.config_to_hf(cfg)
  config_class = transformers.AutoConfig.for_model(hf_config.pop('model_type'), **hf_config)
  return transformers.AutoModelForCausalLM.from_config(config_class)


def torch_step_fn(cfg: DecoderConfig, t: TrainConfig):
  model = torch_model(cfg)
  batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in random_batch().items()}

  def loss():  # bfloat16: autocast's mixed precision, as lm's dtype (float32 parameters)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=cfg.dtype == 'bfloat16'):
      out = model(batch['inputs'], output_router_logits=bool(cfg.num_experts))
    nll = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, cfg.vocab_size),
                                            batch['targets'].reshape(-1))
    # the same load-balancing term as lm's objective
    return nll + cfg.moe_aux_coef * out.aux_loss if cfg.num_experts else nll
  return torch_steps(model, loss, t), None


def torch_steps(model: torch.nn.Module, loss_fn, t: TrainConfig):
  """run(state, n): n PyTorch train steps of `loss_fn()` (AdamW after gradient clipping, as
  lm's optimizer), the model in training mode."""
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=(t.b1, t.b2),
                          weight_decay=t.weight_decay)

  def run(state, n):
    for _ in range(n):
      loss = loss_fn()
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
      opt.step()
    return state
  return run


def random_batch() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {**{k: rng.integers(0, SHAPE['vocab_size'], (BATCH, SEQ_LEN)).astype(np.int32)
             for k in ('inputs', 'targets')}, 'loss_mask': np.ones((BATCH, SEQ_LEN), bool)}


def torch_peak_flops(n: int = 2048, repeats: int = 5, dtype: str = 'float32') -> float:
  a = torch.ones(n, n, dtype=getattr(torch, dtype))
  a @ a
  best = min(_timed(lambda: a @ a) for _ in range(repeats))
  return 2 * n**3 / best


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


RUNNERS = {'lm': lm_step_fn, 'transformers': torch_step_fn}


def worker(spec: str) -> None:
  """Builds one (variant, framework)'s step, then serves it (serve)."""
  variant, framework, dtype = spec.split(':')
  torch.set_num_threads(os.cpu_count() or 1)
  cfg = dataclasses.replace(VARIANTS[variant], dtype=dtype)
  serve(*RUNNERS[framework](cfg, TrainConfig(steps=1000, learning_rate=1e-3)), warmup=2)


def serve(run, state, warmup: int) -> None:
  """A worker's loop: warms `run` up, says ready, then for each line `n` on stdin runs n steps
  and answers the seconds per step."""
  state = run(state, warmup)  # compile, warm up
  print('ready', flush=True)
  for line in sys.stdin:
    start = time.perf_counter()
    state = run(state, int(line))
    print((time.perf_counter() - start) / int(line), flush=True)


def start_workers(script: str, names: list[str]) -> dict[str, subprocess.Popen]:
  """`python script --worker=NAME` for each name, once each has said it is ready."""
  workers = {name: subprocess.Popen([sys.executable, script, f'--worker={name}'],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for name in names}
  for name, proc in workers.items():
    if proc.stdout.readline().strip() != 'ready':
      sys.exit(f'the benchmark worker {name} failed (exit {proc.wait()})')
  return workers


def timed_rounds(workers: dict[str, subprocess.Popen], rounds: int,
                 steps_of) -> dict[str, list[float]]:
  """Seconds per step of each worker over `rounds` alternating rounds of steps_of(name) steps;
  the workers are ended."""
  times: dict[str, list[float]] = {name: [] for name in workers}
  for _ in range(rounds):
    for name, proc in workers.items():
      proc.stdin.write(f'{steps_of(name)}\n')
      proc.stdin.flush()
      times[name].append(float(proc.stdout.readline()))
  for proc in workers.values():
    proc.stdin.close()
    proc.wait()
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default='gpt2,llama,moe,moe_cap',
                      help=f'comma-separated, of {sorted(VARIANTS)}')
  parser.add_argument('--steps', type=int, default=5, help='timed steps per round')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--accum_steps', type=int, default=0,
                      help='instead: lm\'s llama step with this many microbatches against 1 '
                           '(memory and time)')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help="the compute dtype (lm's model.dtype; PyTorch's autocast)")
  parser.add_argument('--moe_dispatch', action='store_true',
                      help='instead: one MoE layer routed each way (grouped blocks, ragged_dot, '
                           'capacity groups) beside the dense MLP of equal active parameters')
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args.worker)
  if args.moe_dispatch:
    print(json.dumps({'moe_dispatch': moe_dispatch(max(args.rounds, 5)), 'machine': describe()}))
    return
  if args.accum_steps:
    result = accumulation(args.accum_steps, args.steps, args.rounds)
    print(json.dumps({'accumulation': result, 'machine': f'{cpu_model()}, {os.cpu_count()} cores',
                      'jax': jax.__version__}))
    return
  variants = args.variants.split(',')
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    parser.error(f'--variants: unknown {unknown}; use some of {sorted(VARIANTS)}')
  torch.set_num_threads(os.cpu_count() or 1)
  specs = [f'{v}:{f}:{args.dtype}' for v in variants for f in RUNNERS]
  workers = start_workers(__file__, specs)
  peak = max(train.measure_peak_flops(args.dtype),  # with all idle
             torch_peak_flops(dtype=args.dtype))
  times = timed_rounds(workers, args.rounds, lambda spec: args.steps)
  machine = describe()
  print(f'train step, shape {SHAPE}, seq {SEQ_LEN}, batch {BATCH}, {args.dtype}, AdamW')
  print(f'machine: {machine}; matmul peak {peak / 1e9:.0f} GFLOP/s; median of {args.rounds} '
        f'rounds of {args.steps} steps')
  print(f'| {"variant":<7} | {"params":>7} | {"MFLOP/tok":>9} | {"lm step ms":>10} | '
        f'{"lm tok/s":>8} | {"lm MFU":>6} | {"HF step ms":>10} | {"HF tok/s":>8} | '
        f'{"HF MFU":>6} | {"lm/HF":>5} |')
  print('|' + '|'.join('-' * (w + 2) for w in (7, 7, 9, 10, 8, 6, 10, 8, 6, 5)) + '|')
  results = {}
  for variant in variants:
    cfg = VARIANTS[variant]
    flops_per_token = models.train_flops_per_token(cfg, models.TokenCounts(SEQ_LEN))
    params = sum(p.numel() for p in torch_model(cfg).parameters())
    row = {}
    for framework in RUNNERS:
      seconds = statistics.median(times[f'{variant}:{framework}:{args.dtype}'])
      tokens_per_sec = BATCH * SEQ_LEN / seconds
      row[framework] = {'step_ms': 1e3 * seconds, 'tokens_per_sec': tokens_per_sec,
                        'mfu': tokens_per_sec * flops_per_token / peak}
    ratio = row['lm']['tokens_per_sec'] / row['transformers']['tokens_per_sec']
    ours, theirs = row['lm'], row['transformers']
    print(f'| {variant:<7} | {params / 1e6:>6.1f}M | {flops_per_token / 1e6:>9.1f} | '
          f'{ours["step_ms"]:>10.0f} | {ours["tokens_per_sec"]:>8,.0f} | {ours["mfu"]:>6.1%} | '
          f'{theirs["step_ms"]:>10.0f} | {theirs["tokens_per_sec"]:>8,.0f} | '
          f'{theirs["mfu"]:>6.1%} | {ratio:>5.2f} |')
    results[variant] = {**row, 'ratio': ratio, 'params': params,
                        'flops_per_token': flops_per_token}
  for name in ('moe', 'moe_cap'):
    if name in results and 'llama' in results:
      moe, dense = results[name], results['llama']
      moe['lm_over_dense'] = moe['lm']['tokens_per_sec'] / dense['lm']['tokens_per_sec']
      moe['transformers_over_dense'] = (moe['transformers']['tokens_per_sec']
                                        / dense['transformers']['tokens_per_sec'])
      print(f'{name} / dense llama of equal active parameters, tokens/s: lm '
            f'{moe["lm_over_dense"]:.2f}, transformers {moe["transformers_over_dense"]:.2f}')
  print(json.dumps({'results': results, 'dtype': args.dtype, 'peak_flops_per_sec': peak,
                    'machine': machine,
                    'jax': jax.__version__, 'torch': torch.__version__}))


if __name__ == '__main__':
  main()
