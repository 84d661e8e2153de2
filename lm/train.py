"""TrainState, the pure train and eval steps, and the training loop.

`run(config_dict, workdir)` is the whole job: validate, tokenize the corpus, build the mesh and
sharded state, restore the latest checkpoint if any, train with periodic evaluation and
checkpoints, then report the final validation loss and bits per byte beside gzip and xz, and
print a few samples.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import lzma
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from tqdm import tqdm

from lm import checkpoint, config as config_lib, hf, models, objectives, parallel, sampling
from lm import tokenizers
from lm.config import Config
from lm.data import clm, store
from lm.models import decoder

SAMPLE_PROMPTS = ('import ', 'def ', 'class ')


class TrainState(train_state.TrainState):
  rng: jax.Array  # raw uint32 key; step s uses fold_in(rng, s)


def make_schedule(t: config_lib.TrainConfig) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to min_lr_ratio of it at train.steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=t.steps, end_value=t.learning_rate * t.min_lr_ratio)


def is_matrix(path: tuple) -> bool:
  """Kernels, embeddings and expert weights, by the parameter's name: a bias or a norm scale
  may have 2 dims too."""
  return getattr(path[-1], 'key', None) in ('kernel', 'embedding', 'router', 'gate', 'up', 'down')


def make_optimizer(t: config_lib.TrainConfig) -> optax.GradientTransformation:
  """AdamW (weight decay on matrices only) after global-norm gradient clipping."""
  decay_matrices = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: is_matrix(path), params)
  adamw = optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                      mask=decay_matrices)
  return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip > 0 else adamw


def make_train_step(loss_fn: Callable, schedule: optax.Schedule) -> Callable:
  """A pure train_step(state, batch) -> (state, metrics) for a loss_fn(params, batch, rng)."""
  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    metrics = {**metrics, 'grad_norm': optax.global_norm(grads), 'lr': schedule(state.step)}
    return state.apply_gradients(grads=grads), metrics
  return train_step


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, seq_len: int, seed: int,
                   mesh: jax.sharding.Mesh) -> tuple[Callable, Any, Any]:
  """(init_fn, abstract state with shardings, shardings) for a TrainState on `mesh`."""
  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros((1, seq_len), jnp.int32))['params']
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=state_rng)
  boxed = jax.eval_shape(init, jax.random.PRNGKey(seed))
  shardings = parallel.logical_shardings(boxed, mesh)
  is_boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)
  values = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_boxed(x) else x, boxed,
                        is_leaf=is_boxed)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          values, shardings)
  init_fn = jax.jit(lambda: nn.meta.unbox(init(jax.random.PRNGKey(seed))),
                    out_shardings=shardings)
  return init_fn, abstract, shardings


def measure_peak_flops(dtype: str = 'float32', n: int = 2048, repeats: int = 5) -> float:
  """Matmul FLOP/s of one device: the best of `repeats` timed n x n x n products."""
  a = jnp.ones((n, n), dtype, device=jax.devices()[0])
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def compressed_bits_per_byte(text: bytes) -> dict[str, float]:
  """Bits per byte of gzip -9 and xz -9 on the same text: baselines for val/bpb."""
  return {'gzip -9': 8 * len(gzip.compress(text, 9)) / len(text),
          'xz -9': 8 * len(lzma.compress(text, preset=9)) / len(text)}


class StopOnSignal:
  """SIGTERM or Ctrl-C sets `signum`; the loop checkpoints and stops. A second Ctrl-C aborts."""

  def __enter__(self):
    self.signum = None
    self.previous = {}
    if threading.current_thread() is threading.main_thread():
      self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def _handle(self, signum, frame):
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for s, handler in self.previous.items():
      signal.signal(s, handler)


@dataclasses.dataclass
class Run:
  """What the loop needs, built once from a validated Config."""
  cfg: Config
  workdir: Path
  tokenizer: Any
  splits: dict[str, store.Split]
  mesh: jax.sharding.Mesh
  model: nn.Module
  init_fn: Callable  # () -> TrainState, laid out on the mesh
  abstract: Any  # the TrainState's ShapeDtypeStructs with shardings
  shardings: Any


def setup(config: ml_collections.ConfigDict, workdir: str | Path) -> Run:
  """Validates everything a user can get wrong before anything is written."""
  cfg = config_lib.parse(config, device_count=jax.device_count(),
                         vocab_size=lambda t: tokenizers.vocab_size_of(t.kind, t.vocab_size))
  cfg = with_pretrained_model(cfg, jax.device_count())
  workdir = Path(workdir)
  checkpoint.prepare_workdir(workdir, cfg)
  saved = workdir / 'tokenizer'  # a resumed run keeps the tokenizer its model learned with
  tokenizer = (tokenizers.load(saved) if (saved / 'tokenizer.json').is_file()
               else store.load_or_train_tokenizer(cfg.tokenizer, cfg.data))
  splits = store.load_or_build(cfg.data, tokenizer)
  mesh = parallel.make_mesh(config_lib.mesh_shape(cfg.mesh.shape, jax.device_count()))
  model = models.build(cfg.model)
  init_fn, abstract, shardings = abstract_state(model, make_optimizer(cfg.train), cfg.data.seq_len,
                                                cfg.train.seed, mesh)
  parallel.check_even(abstract, mesh)
  checkpoint.write_atomic(workdir / 'config.json', cfg.to_json())
  tokenizer.save(workdir / 'tokenizer')
  return Run(cfg, workdir, tokenizer, splits, mesh, model, init_fn, abstract, shardings)


PRETRAINING_CHOICES = ('dtype', 'remat', 'scan_layers', 'moe_aux_coef')  # kept from the config


def with_pretrained_model(cfg: Config, device_count: int) -> Config:
  """With train.init_from, the model section is that Hugging Face directory's architecture
  (the config's dtype, remat, scan_layers and moe_aux_coef kept); its weights are read only
  when a run starts (`pretrained_params`), not when it resumes."""
  path = cfg.train.init_from
  if not path:
    return cfg
  config_lib.require(Path(path).is_dir(), 'train.init_from', path,
                     'no such directory; give a Hugging Face model directory (config.json and '
                     'model.safetensors), or \'\' to start from random weights')
  model = dataclasses.replace(hf.load_config(path), **{k: getattr(cfg.model, k)
                                             for k in PRETRAINING_CHOICES})
  config_lib.require(
      cfg.model.vocab_size <= model.vocab_size, 'tokenizer.kind', cfg.tokenizer.kind,
      f'its {cfg.model.vocab_size} ids do not fit the {model.vocab_size}-row embedding of '
      f'train.init_from={path!r}; use the tokenizer the weights were trained with')
  changed = [f'{f.name} {getattr(cfg.model, f.name)!r} -> {getattr(model, f.name)!r}'
             for f in dataclasses.fields(model)
             if getattr(cfg.model, f.name) != getattr(model, f.name)]
  if changed:
    print(f'train.init_from={path}: the model is the checkpoint\'s ({", ".join(changed)})')
  cfg = dataclasses.replace(cfg, model=model)
  config_lib.validate(cfg, device_count)
  return cfg


def pretrained_params(cfg: Config) -> Any:
  """The weights of train.init_from, in the layout of cfg.model."""
  _, params = hf.load(cfg.train.init_from)
  return decoder.stack_layers(cfg.model, params) if cfg.model.scan_layers else params


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
  """Trains (or resumes) and returns the final metrics."""
  r = setup(config, workdir)
  cfg, t = r.cfg, r.cfg.train
  is_main = jax.process_index() == 0
  abstract, shardings = r.abstract, r.shardings
  batch_sharding = parallel.batch_sharding(r.mesh)
  loss_fn = functools.partial(objectives.clm_loss, apply_fn=r.model.apply,
                              pad_id=r.tokenizer.pad_id,
                              aux_coef=cfg.model.moe_aux_coef if cfg.model.num_experts else 0.0)
  eval_fn = functools.partial(objectives.clm_eval_sums, apply_fn=r.model.apply,
                              pad_id=r.tokenizer.pad_id,
                              token_bytes_V=jnp.asarray(r.tokenizer.token_bytes()))
  batch_spec = jax.ShapeDtypeStruct((t.batch_size, cfg.data.seq_len), jnp.int32,
                                    sharding=batch_sharding)
  ckpts = checkpoint.Checkpoints(r.workdir / 'checkpoints', t.keep_checkpoints)
  start = ckpts.latest_step() or 0
  # Read (and stacked for scan_layers) outside the mesh context; only a fresh run needs them.
  pretrained = pretrained_params(cfg) if cfg.train.init_from and not start else None
  with jax.set_mesh(r.mesh), nn.logical_axis_rules(parallel.RULES):
    train_step = jax.jit(make_train_step(loss_fn, make_schedule(t)),
                         in_shardings=(shardings, batch_sharding),
                         out_shardings=(shardings, parallel.replicated(r.mesh)),
                         donate_argnums=0)
    compile_start = time.perf_counter()
    train_step = train_step.lower(abstract, {'inputs': batch_spec, 'targets': batch_spec}).compile()
    eval_step = jax.jit(eval_fn, in_shardings=(shardings.params, batch_sharding))
    compile_seconds = time.perf_counter() - compile_start

    data_iter = iter(clm.train_dataset(
        r.splits['train'].tokens, seq_len=cfg.data.seq_len, batch_size=t.batch_size, seed=t.seed,
        process_index=jax.process_index(), process_count=jax.process_count()))
    if start:
      state, data_state = ckpts.restore(start, abstract)
      data_iter.set_state(data_state)
      print(f'resuming {r.workdir} from step {start}')
    else:
      state = r.init_fn()
      if pretrained is not None:
        state = state.replace(params=jax.device_put(pretrained, shardings.params))
        print(f'starting from the weights of {cfg.train.init_from}')
    peak = t.peak_flops or measure_peak_flops(cfg.model.dtype)
    flops_per_token = decoder.train_flops_per_token(cfg.model, cfg.data.seq_len)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f'model: {num_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOP/token; '
          f'compiled in {compile_seconds:.1f}s; device peak {peak / 1e9:.0f} GFLOP/s x '
          f'{jax.device_count()}; mesh {dict(r.mesh.shape)}')
    log = checkpoint.MetricsLog(r.workdir, start) if is_main else None
    val_batches = clm.eval_batches(r.splits['val'].tokens, seq_len=cfg.data.seq_len,
                                   batch_size=t.batch_size, pad_id=r.tokenizer.pad_id,
                                   max_batches=t.eval_batches)
    evaluate = lambda params, batches: _evaluate(eval_step, params, batches, batch_sharding)
    tokens_per_step = t.batch_size * cfg.data.seq_len
    last_log_step, last_log_time = start, time.perf_counter()
    stop_signal = None
    with StopOnSignal() as stop, tqdm(total=t.steps, initial=start, unit='step',
                                      dynamic_ncols=True, disable=not is_main) as bar:
      for step in range(start + 1, t.steps + 1):
        batch = parallel.global_batch(next(data_iter), batch_sharding)
        state, metrics = train_step(state, batch)
        bar.update(1)
        if step % t.log_every == 0 or step == t.steps:
          metrics = jax.device_get(metrics)
          now = time.perf_counter()
          tokens_per_sec = (step - last_log_step) * tokens_per_step / (now - last_log_time)
          record = {'train/loss': float(metrics['loss']),
                    'train/grad_norm': float(metrics['grad_norm']),
                    'train/lr': float(metrics['lr']),
                    'perf/tokens_per_sec': tokens_per_sec,
                    'perf/mfu': tokens_per_sec * flops_per_token / (peak * jax.device_count())}
          bar.set_postfix(loss=f'{record["train/loss"]:.3f}', tok_s=f'{tokens_per_sec:,.0f}')
          if log:
            log.write(step, record)
          last_log_step, last_log_time = step, now
        if step % t.eval_every == 0 and step != t.steps:
          val = evaluate(state.params, val_batches)
          bar.write(f'step {step}: val/loss {val["loss"]:.4f}, val/bpb {val["bpb"]:.4f}')
          if log:
            log.write(step, {'val/loss': val['loss'], 'val/bpb': val['bpb']})
          last_log_step, last_log_time = step, time.perf_counter()
        stop_signal = stop.signum
        if step % t.checkpoint_every == 0 or step == t.steps or stop_signal is not None:
          ckpts.save(step, state, data_iter.get_state(), cfg)
        if stop_signal is not None:
          break
    ckpts.close()
    if stop_signal is not None:
      print(f'{signal.Signals(stop_signal).name}: saved a checkpoint at step {step} in '
            f'{r.workdir}; run the same command to resume')
      if log:
        log.close()
      return {'step': step, 'stopped_by_signal': stop_signal}
    return _finish(r, state, evaluate, log)


def _evaluate(eval_step, params, batches, batch_sharding) -> dict[str, float]:
  sums: dict[str, float] = {}
  for batch in batches:
    local = {k: v[jax.process_index()::jax.process_count()] for k, v in batch.items()}
    out = jax.device_get(eval_step(params, parallel.global_batch(local, batch_sharding)))
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {k: float(v) for k, v in objectives.eval_metrics(sums).items()}


def _finish(r: Run, state: TrainState, evaluate: Callable, log) -> dict[str, float]:
  """The full validation split, the compressors on the same text, and a few samples."""
  cfg = r.cfg
  val_tokens = r.splits['val'].tokens
  batches = clm.eval_batches(val_tokens, seq_len=cfg.data.seq_len,
                             batch_size=cfg.train.batch_size, pad_id=r.tokenizer.pad_id)
  val = evaluate(state.params, batches)
  covered = clm.num_windows(len(val_tokens), cfg.data.seq_len) * cfg.data.seq_len
  text = r.tokenizer.decode(np.asarray(val_tokens[1:covered + 1]).tolist()).encode('utf-8')
  baselines = compressed_bits_per_byte(text)
  step = int(state.step)
  result = {'step': step, 'val/loss': val['loss'], 'val/bpb': val['bpb'],
            'val/gzip_bpb': baselines['gzip -9'], 'val/xz_bpb': baselines['xz -9']}
  if log:
    log.write(step, {k: v for k, v in result.items() if k != 'step'})
    log.close()
  print(f'\nfinal validation at step {step} ({len(text):,} bytes of held-out text):')
  print(f'  {"model":<10} loss {val["loss"]:.4f} nats/token   {val["bpb"]:.4f} bits/byte')
  for name, bpb in baselines.items():
    print(f'  {name:<10} {"":27} {bpb:.4f} bits/byte')
  for i, text in enumerate(_samples(r, state.params)):
    print(f'\n--- sample {i + 1} ---\n{text}')
  return result


def _samples(r: Run, params) -> list[str]:
  t, tok = r.cfg.train, r.tokenizer
  if not t.num_samples or not t.sample_len:
    return []
  prompts = [[tok.bos_id, *tok.encode(SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)])]
             for i in range(t.num_samples)]
  in_vocabulary = lambda logits_BxV: jnp.where(  # init_from: the model's V may be larger
      jnp.arange(logits_BxV.shape[-1]) < tok.vocab_size, logits_BxV, -jnp.inf)
  with jax.set_mesh(r.mesh), nn.logical_axis_rules(parallel.RULES):
    out = sampling.generate(
        r.cfg.model, params, prompts, rng=jax.random.PRNGKey(t.seed),
        max_new_tokens=min(t.sample_len, r.cfg.model.max_len - max(map(len, prompts))),
        filter_fn=sampling.chain(in_vocabulary, sampling.temperature(0.8)),
        eos_id=tok.eos_id, pad_id=tok.pad_id)
  return [tok.decode(p[1:] + ids) for p, ids in zip(prompts, out.tokens)]
