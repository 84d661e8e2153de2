"""The scan layers measured: lm's Mamba against transformers' MambaForCausalLM (the mambapy
parallel scan, the fastest PyTorch path without CUDA kernels), lm's Mamba-2 against
transformers' Mamba2ForCausalLM (its PyTorch chunked SSD), beside each other and lm's
Llama-style decoder of matched parameters.

Shape: vocab 8192, d_model 384, 6 layers, expand 2, float32 (Mamba state 16; Mamba-2 heads of
64 channels, one group, state 64, chunks of 64); training at sequence 256, batch 16, AdamW.
Six tables:
  train     train-step tokens/s: lm Mamba, the peer, lm Llama of matched parameters
  scans     the three selective scans, forward plus backward, at B 4, L 2048, I 1024, N 16
  decode    greedy tokens/s, 256 new tokens after a 16-token prompt, batch 1 and 8, against the
            peer's generate on the same weights
  context   one decode step after 16 and after 4,096 tokens of context: Mamba and Llama
  mamba2    train-step tokens/s: lm Mamba-2, transformers' Mamba-2, lm Mamba, lm Llama
  mamba2_decode   greedy decoding as `decode`, lm Mamba-2 against transformers' Mamba-2
Each framework's training runs in a worker process of its own; the parent alternates timed
rounds between them so that both see the same machine.

  python experiments/bench_ssm.py [--parts=train,scans,decode,context,mamba2,mamba2_decode]
                                  [--rounds=2]

Prints the tables, then one JSON line with the figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from bench_train import (BATCH, SEQ_LEN, lm_step_fn, random_batch, serve, start_workers,
                         timed_rounds, torch_steps)  # the same train step, batch and workers
from lm import hf, models, sampling, train
from machine import describe
from lm.config import TrainConfig
from lm.models import DecoderConfig
from lm.models.layers import ssm

MAMBA = DecoderConfig(vocab_size=8192, num_layers=6, d_model=384, num_heads=6, mlp_dim=0,
                    max_len=4608, positions='none', norm='rmsnorm', use_bias=False,
                    layer_pattern='M', state_size=16, d_conv=4, expand=2, scan='sequential',
                    scan_chunk=64)
# Llama-style blocks whose parameters match the Mamba's: attention 2 D (D + 2 Dh) and a
# SwiGLU of 512 (0.98M a layer against the Mamba layer's 0.96M).
LLAMA = DecoderConfig(vocab_size=8192, num_layers=6, d_model=384, num_heads=6, num_kv_heads=2,
                    mlp_dim=512, max_len=4608, positions='rope', norm='rmsnorm', mlp='swiglu',
                    use_bias=False)
# Mamba-2 layers of about the Mamba layer's parameters (0.94M against 0.96M).
MAMBA2 = dataclasses.replace(MAMBA, layer_pattern='D', state_size=64, ssm_head_dim=64, ngroups=1,
                             scan_chunk=64)
TRAIN = TrainConfig(steps=1000, learning_rate=1e-3)


def peer_model(cfg: DecoderConfig = MAMBA):
  """transformers' model of cfg's architecture, random weights."""
  hf_config = hf.config_to_hf(cfg)
  if hf_config.pop('model_type') == 'mamba2':
    return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**hf_config))
  return transformers.MambaForCausalLM(transformers.MambaConfig(**hf_config, use_mambapy=True))


def peer_train(cfg: DecoderConfig):
  model = peer_model(cfg)
  batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in random_batch().items()}
  loss = lambda: torch.nn.functional.cross_entropy(
      model(batch['inputs']).logits.reshape(-1, cfg.vocab_size), batch['targets'].reshape(-1))
  return torch_steps(model, loss, TRAIN), None


WORKERS = {'lm_mamba': lambda: lm_step_fn(MAMBA, TRAIN), 'peer_mamba': lambda: peer_train(MAMBA),
           'lm_llama': lambda: lm_step_fn(LLAMA, TRAIN),
           'lm_mamba2': lambda: lm_step_fn(MAMBA2, TRAIN),
           'peer_mamba2': lambda: peer_train(MAMBA2)}
TRAIN_ARMS = {  # part -> (worker, config, label); the first two give the ratio
    'train': (('lm_mamba', MAMBA, f'lm Mamba ({MAMBA.scan} scan)'),
              ('peer_mamba', MAMBA, 'transformers Mamba (mambapy)'),
              ('lm_llama', LLAMA, 'lm Llama, matched params')),
    'mamba2': (('lm_mamba2', MAMBA2, 'lm Mamba-2 (chunked SSD)'),
               ('peer_mamba2', MAMBA2, 'transformers Mamba-2 (torch)'),
               ('lm_mamba', MAMBA, f'lm Mamba ({MAMBA.scan} scan)'),
               ('lm_llama', LLAMA, 'lm Llama, matched params'))}


def worker(name: str) -> None:
  torch.set_num_threads(os.cpu_count() or 1)
  serve(*WORKERS[name](), warmup=1)


def train_part(rounds: int, part: str = 'train') -> dict:
  arms = TRAIN_ARMS[part]
  procs = start_workers(__file__, [name for name, _, _ in arms])
  peak = train.measure_peak_flops('float32')
  times = timed_rounds(procs, rounds, lambda name: 1 if name.startswith('peer') else 3)
  out = {'peak_flops_per_sec': peak}
  print(f'train step: d_model 384, 6 layers, vocab 8192, seq {SEQ_LEN}, batch {BATCH}, float32, '
        f'AdamW; matmul peak {peak / 1e9:.0f} GFLOP/s')
  print(f'| {"model":<28} | {"params":>7} | {"MFLOP/tok":>9} | {"step ms":>8} | {"tok/s":>7} | '
        f'{"MFU":>6} |')
  print('|' + '|'.join('-' * (w + 2) for w in (28, 7, 9, 8, 7, 6)) + '|')
  for name, cfg, label in arms:
    seconds = statistics.median(times[name])
    flops = models.train_flops_per_token(cfg, models.TokenCounts(SEQ_LEN))
    params = sum(x.size for x in jax.tree.leaves(models.abstract_params(models.build(cfg))))
    tps = BATCH * SEQ_LEN / seconds
    out[name] = {'step_ms': 1e3 * seconds, 'tokens_per_sec': tps, 'params': params,
                 'flops_per_token': flops, 'mfu': tps * flops / peak}
    print(f'| {label:<28} | {params / 1e6:>6.2f}M | {flops / 1e6:>9.1f} | {1e3 * seconds:>8.0f} | '
          f'{tps:>7,.0f} | {tps * flops / peak:>6.1%} |')
  (lm, _, lm_label), (peer, _, peer_label) = arms[:2]
  out['ratio_lm_to_peer'] = out[lm]['tokens_per_sec'] / out[peer]['tokens_per_sec']
  print(f'{lm_label} / {peer_label}: {out["ratio_lm_to_peer"]:.1f}x; ' + '; '.join(
      f'{lm_label} / {label}: {out[lm]["tokens_per_sec"] / out[name]["tokens_per_sec"]:.2f}x'
      for name, _, label in arms[2:]))
  return out


def scans_part(rounds: int) -> dict:
  batch, length, inner, n = 4, 2048, 1024, 16
  rng = np.random.default_rng(0)
  u = jnp.asarray(rng.standard_normal((batch, length, inner)), jnp.float32)
  dt = jax.nn.softplus(jnp.asarray(rng.standard_normal((batch, length, inner)), jnp.float32) - 4)
  A = -jnp.exp(jnp.asarray(rng.standard_normal((inner, n)), jnp.float32))
  B, C = (jnp.asarray(rng.standard_normal((batch, length, n)), jnp.float32) for _ in range(2))
  out = {}
  print(f'selective scan, forward + backward, B {batch}, L {length}, I {inner}, N {n}')
  print(f'| {"scan":<16} | {"ms":>8} |')
  print('|' + '|'.join('-' * (w + 2) for w in (16, 8)) + '|')
  for scan, chunk in (('sequential', 0), ('parallel', 0), ('chunked', 32), ('chunked', 64),
                      ('chunked', 128)):
    loss = lambda u, dt, B, C: jnp.sum(ssm.selective_scan(u, dt, A, B, C, scan=scan,
                                                          chunk=chunk or 64)[0])
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    jax.block_until_ready(step(u, dt, B, C))
    times = []
    for _ in range(rounds):
      start = time.perf_counter()
      jax.block_until_ready(step(u, dt, B, C))
      times.append(time.perf_counter() - start)
    label = scan if not chunk else f'{scan} {chunk}'
    out[label.replace(' ', '_')] = 1e3 * min(times)
    print(f'| {label:<16} | {1e3 * min(times):>8.0f} |')
  return out


def decode_part(rounds: int, arch: DecoderConfig = MAMBA) -> dict:
  torch.set_num_threads(os.cpu_count() or 1)
  peer = peer_model(arch).eval()
  peer.generation_config.eos_token_id = None
  with tempfile.TemporaryDirectory() as tmp:
    peer.save_pretrained(tmp)
    cfg, params = hf.load(tmp)
  cfg = dataclasses.replace(cfg, scan=arch.scan, scan_chunk=arch.scan_chunk)
  prompt_len, new = 16, 256
  out = {}
  print(f'greedy decoding ({hf.architecture_of(cfg)}): {new} new tokens after a '
        f'{prompt_len}-token prompt, the same weights')
  print(f'| {"batch":>5} | {"lm tok/s":>8} | {"peer tok/s":>10} | {"lm/peer":>7} |')
  print('|' + '|'.join('-' * (w + 2) for w in (5, 8, 10, 7)) + '|')
  for batch in (1, 8):
    prompts = np.random.default_rng(batch).integers(0, 8192, (batch, prompt_len))
    run = lambda: sampling.generate(cfg, params, prompts.tolist(), max_new_tokens=new)
    run()
    lm_s = min(_timed(run) for _ in range(rounds))
    with torch.no_grad():
      gen = lambda: peer.generate(torch.tensor(prompts), max_new_tokens=new, do_sample=False)
      gen()
      peer_s = min(_timed(gen) for _ in range(max(1, rounds - 1)))
    lm_tps, peer_tps = batch * new / lm_s, batch * new / peer_s
    out[f'batch_{batch}'] = {'lm_tokens_per_sec': lm_tps, 'peer_tokens_per_sec': peer_tps,
                             'ratio': lm_tps / peer_tps}
    print(f'| {batch:>5} | {lm_tps:>8,.0f} | {peer_tps:>10,.0f} | {lm_tps / peer_tps:>7.1f} |')
  return out


def context_part(rounds: int) -> dict:
  out = {}
  print('one greedy decode step (batch 1) after a context of 16 and of 4,096 tokens')
  print(f'| {"model":<10} | {"ms at 16":>8} | {"ms at 4096":>10} | {"ratio":>5} |')
  print('|' + '|'.join('-' * (w + 2) for w in (10, 8, 10, 5)) + '|')
  for name, cfg in (('Mamba', MAMBA), ('Llama', LLAMA)):
    params = models.build(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
    d = models.decoding(cfg)
    params = d.prepare(params, 1)
    step = sampling.decoding_jit()(d.decode_step)
    row = []
    for context in (16, 4096):
      _, state = jax.jit(d.prefill, static_argnums=3)(params, jnp.ones((1, context), jnp.int32),
                                                      None, context + 64)
      token = jnp.zeros((1,), jnp.int32)
      logits, state = step(params, token, state)
      times = []
      for _ in range(rounds * 10):
        start = time.perf_counter()
        logits, state = step(params, token, state)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - start)
      row.append(1e3 * statistics.median(times))
    out[name] = {'step_ms_at_16': row[0], 'step_ms_at_4096': row[1], 'ratio': row[1] / row[0]}
    print(f'| {name:<10} | {row[0]:>8.2f} | {row[1]:>10.2f} | {row[1] / row[0]:>5.2f} |')
  return out


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


PARTS = {'train': train_part, 'scans': scans_part, 'decode': decode_part,
         'context': context_part, 'mamba2': lambda rounds: train_part(rounds, 'mamba2'),
         'mamba2_decode': lambda rounds: decode_part(rounds, MAMBA2)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--parts', default=','.join(PARTS), help=f'some of {list(PARTS)}')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args.worker)
  parts = args.parts.split(',')
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    parser.error(f'--parts: unknown {unknown}; use some of {list(PARTS)}')
  machine = describe()
  print(f'machine: {machine}; torch {torch.__version__}')
  results = {}
  for part in parts:
    results[part] = PARTS[part](args.rounds)
    print()
  print(json.dumps({'results': results, 'machine': machine, 'jax': jax.__version__,
                    'torch': torch.__version__}))


if __name__ == '__main__':
  main()
