"""TrainState, the pure train and eval steps, and the training loop.

`run(config_dict, workdir)` is the whole job: validate, tokenize the corpus, build the mesh and
sharded state, restore the latest checkpoint if any, train with periodic evaluation and
checkpoints, then report the final validation loss and bits per byte beside gzip and xz, and
print a few samples.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
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

from lm import (checkpoint, config as config_lib, distributed, files, load, models, parallel,
                tasks, tokenizers)
from lm.config import Config
from lm.data import store

from lm.models.layers import common

FINAL_EVAL_BATCHES = None  # the final evaluation covers the whole validation split


class TrainState(train_state.TrainState):
  rng: jax.Array  # raw uint32 key; step s uses fold_in(rng, s)


def make_schedule(t: config_lib.TrainConfig, peak: float | None = None) -> optax.Schedule:
  """Linear warmup from 0 to the peak (train.learning_rate, or `peak`), then down to
  min_lr_ratio of it at train.steps: `cosine` all the way, or `wsd` (warmup-stable-decay) flat
  until the last decay_fraction of the steps and linear from there."""
  peak = t.learning_rate if peak is None else peak
  end = peak * t.min_lr_ratio
  if t.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak,
                                              warmup_steps=t.warmup_steps, decay_steps=t.steps,
                                              end_value=end)
  decay_steps = round(t.decay_fraction * t.steps)
  stable_steps = t.steps - decay_steps - t.warmup_steps
  return optax.join_schedules([
      optax.linear_schedule(0.0, peak, t.warmup_steps),
      optax.constant_schedule(peak),
      optax.linear_schedule(peak, end, decay_steps)],
      boundaries=[t.warmup_steps, t.warmup_steps + stable_steps])


def muon_momentum(t: config_lib.TrainConfig) -> optax.Schedule:
  """Muon's momentum: linear from 0.85 to train.muon_momentum over muon_momentum_warmup steps."""
  start = min(0.85, t.muon_momentum)
  return optax.linear_schedule(start, t.muon_momentum, max(t.muon_momentum_warmup, 1))


def make_optimizer(t: config_lib.TrainConfig, model: nn.Module) -> optax.GradientTransformation:
  """After global-norm gradient clipping: AdamW, or with train.optimizer='muon' Muon for the
  hidden matrices (the parameters the model boxes as common.Matrix, orthogonalised over the
  axes the box names, at train.muon_learning_rate) and optax's Adam with Nesterov momentum for
  the rest (embeddings, head, norms, biases, routers, a scan's own parameters; at
  train.learning_rate, which the logged train/lr follows); both on the same schedule. Weight decay on the parameters that `model` declares (every parameter but those
  whose init is tagged common.NoDecay: biases, norms)."""
  boxed = models.abstract_params(model)
  decay_by_name = common.decays(boxed)
  by_name = lambda table: (lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: table[common.param_name(path)], params))
  if t.optimizer == 'adamw':
    opt = optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                      mask=by_name(decay_by_name))
  else:
    dims = {name: None if axes is None else optax.contrib.MuonDimensionNumbers(*axes)
            for name, axes in common.matrix_axes(boxed).items()}
    opt = optax.inject_hyperparams(optax.contrib.muon, static_args=(
        'nesterov', 'muon_weight_dimension_numbers', 'weight_decay_mask', 'ns_steps'))(
        learning_rate=make_schedule(t, t.muon_learning_rate), beta=muon_momentum(t),
        weight_decay=t.weight_decay, weight_decay_mask=by_name(decay_by_name),
        adam_b1=t.b1, adam_b2=t.b2, adam_weight_decay=t.weight_decay,
        adam_learning_rate=make_schedule(t), nesterov=True,
        muon_weight_dimension_numbers=by_name(dims))
  return optax.chain(optax.clip_by_global_norm(t.grad_clip), opt) if t.grad_clip > 0 else opt


def make_train_step(loss_fn: Callable, schedule: optax.Schedule, accum_steps: int = 1,
                    prepare: Callable | None = None) -> Callable:
  """A pure train_step(state, batch) -> (state, metrics) for a loss_fn(params, batch, rng).

  `prepare(rng, batch) -> batch`, if given, draws the step's randomness over the whole batch
  (span corruption) before the loss sees it. With `accum_steps=k`, the batch is split into k
  microbatches (rows j, j+k, j+2k, ...: each spread over data x fsdp like the batch), a
  `lax.scan` adds up their gradients in float32, and one optimizer update applies their
  average weighted by each microbatch's `metrics['loss_tokens']` (the targets its mean loss
  is over; 1 where a loss reports none): the gradient of the whole batch's mean loss, as with
  k=1. Microbatch j's loss draws from fold_in(rng, j); other metrics are averaged with the
  same weights, `loss_tokens` summed.

  A step whose loss or gradient norm is not finite is never applied: the parameters and the
  optimizer state stay as they were and only the step count advances; `metrics['finite']`
  says which it was, for the loop to stop or to count it. A batch may carry `signal_B`, each
  process's signal number in its rows (StopOnSignal): `metrics['signal']` is their largest.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulated(params, batch, rng):
    micro = jax.tree.map(lambda x: nn.with_logical_constraint(
        jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1),
        (None, 'batch', *(None,) * (x.ndim - 1))), batch)

    def add(carry, j_and_batch):
      j, microbatch = j_and_batch
      (_, metrics), grads = grad_fn(params, microbatch, jax.random.fold_in(rng, j))
      weight = jnp.asarray(metrics.get('loss_tokens', 1.0), jnp.float32)
      scaled = lambda tree: jax.tree.map(lambda x: weight * x.astype(jnp.float32), tree)
      return jax.tree.map(jnp.add, carry, (scaled(grads), scaled(metrics), weight)), None

    zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
    metrics_shape = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro),
                                                   rng)[0][1])
    (grads, metrics, total), _ = jax.lax.scan(
        add, (zeros(params), zeros(metrics_shape), jnp.zeros((), jnp.float32)),
        (jnp.arange(accum_steps), micro))
    grads = jax.tree.map(lambda g, p: (g / total).astype(p.dtype), grads, params)
    metrics = {k: v if k == 'loss_tokens' else v / total for k, v in metrics.items()}
    return metrics['loss'], metrics, grads

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    batch = dict(batch)
    signal_B = batch.pop('signal_B', None)  # lm.train.StopOnSignal: a signal on any process
    if prepare is not None:
      batch = prepare(rng, batch)
    if accum_steps == 1:
      (loss, metrics), grads = grad_fn(state.params, batch, rng)
    else:
      loss, metrics, grads = accumulated(state.params, batch, rng)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updated = state.apply_gradients(grads=grads)
    keep_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    updated = updated.replace(params=keep_finite(updated.params, state.params),
                              opt_state=keep_finite(updated.opt_state, state.opt_state))
    metrics = {**metrics, 'grad_norm': grad_norm, 'lr': schedule(state.step), 'finite': finite}
    if signal_B is not None:
      metrics['signal'] = jnp.max(signal_B)
    return updated, metrics
  return train_step


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, seq_len: int, seed: int,
                   mesh: jax.sharding.Mesh) -> tuple[Callable, Any, Any]:
  """(init_fn, abstract state with shardings, shardings) for a TrainState on `mesh`."""
  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros((1, seq_len), jnp.int32))['params']
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=state_rng)
  is_boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)
  # an optimizer state that leaves a parameter out (optax's masked and partitioned states:
  # Muon's Adam half) keeps that parameter's box around an empty node: no array, no sharding
  empty_unboxed = lambda x: x.value if is_boxed(x) and not jax.tree.leaves(x.value) else x
  boxed = jax.tree.map(empty_unboxed, jax.eval_shape(init, jax.random.PRNGKey(seed)),
                       is_leaf=is_boxed)
  shardings = parallel.logical_shardings(boxed, mesh)
  values = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_boxed(x) else x, boxed,
                        is_leaf=is_boxed)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          values, shardings)
  init_fn = jax.jit(lambda: nn.meta.unbox(init(jax.random.PRNGKey(seed))),
                    out_shardings=shardings)
  return init_fn, abstract, shardings


# Dense bfloat16 matmul peaks per chip (FLOP/s), from the vendors' data sheets: what MFU is
# measured against on an accelerator (on CPU, and for float32, the peak is measured).
BF16_PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'TPU v4': 275e12,
                   'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v5': 459e12,
                   'TPU v6 lite': 918e12, 'TPU v6e': 918e12}


def table_peak_flops(device_kind: str) -> float | None:
  """The bfloat16 peak of a device kind as JAX names it ('NVIDIA H100 80GB HBM3', 'TPU v5
  lite'), or None for one the table does not know."""
  for name in sorted(BF16_PEAK_FLOPS, key=len, reverse=True):  # 'TPU v5 lite' before 'TPU v5'
    if name in device_kind:
      return BF16_PEAK_FLOPS[name]
  return None


def peak_flops(dtype: str) -> float:
  """FLOP/s of one device: the table's bfloat16 peak of a known accelerator, else measured."""
  device = jax.local_devices()[0]
  known = table_peak_flops(device.device_kind) if device.platform != 'cpu' else None
  return known if dtype == 'bfloat16' and known else measure_peak_flops(dtype)


def measure_peak_flops(dtype: str = 'float32', n: int = 2048, repeats: int = 5) -> float:
  """Matmul FLOP/s of one device: the best of `repeats` timed n x n x n products."""
  a = jnp.ones((n, n), dtype, device=jax.local_devices()[0])
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


class StopOnSignal:
  """SIGTERM or Ctrl-C sets `signum`; the loop checkpoints and stops. A second Ctrl-C aborts.

  A signal may reach one process of many (a TPU maintenance event, a SLURM preemption), so it
  is agreed inside the train step, which needs no collective of its own: every process feeds
  its `signum` into the step's batch as its rows of `batch['signal_B']`, and the step returns
  their largest (metrics['signal']); the loop reads it one step later, with the check of that
  step's loss, and every process stops after the same step."""

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

  def rows(self, count: int) -> np.ndarray:
    """This process's rows of batch['signal_B']: its signal number, 0 for none."""
    return np.full(count, self.signum or 0, np.int32)

  def __exit__(self, *exc):
    for s, handler in self.previous.items():
      signal.signal(s, handler)


@dataclasses.dataclass
class Run:
  """What the loop needs, built once from a validated Config."""
  cfg: Config
  workdir: files.PathLike
  tokenizer: Any
  splits: dict[str, store.Split]
  mesh: jax.sharding.Mesh
  model: nn.Module
  task: tasks.Task  # the data pipeline and loss of data.task
  init_fn: Callable  # () -> TrainState, laid out on the mesh
  abstract: Any  # the TrainState's ShapeDtypeStructs with shardings
  shardings: Any


def setup(config: ml_collections.ConfigDict, workdir: str | Path) -> Run:
  """Validates everything a user can get wrong before anything is written."""
  workdir = files.path(workdir)
  saved = workdir / 'tokenizer'  # a resumed run keeps the tokenizer its model learned with,
  saved_tok = tokenizers.load(saved) if (saved / 'tokenizer.json').is_file() else None
  vocab_size = lambda t: (saved_tok.vocab_size if saved_tok is not None and saved_tok.kind == t.kind
                          else tokenizers.vocab_size_of(t.kind, t.vocab_size))  # in any format
  cfg = config_lib.parse(config, device_count=jax.device_count(), vocab_size=vocab_size,
                         process_count=jax.process_count())
  pretrained_tok = pretrained_tokenizer(cfg)  # an lm workdir's, which must be the config's kind
  cfg = with_pretrained_model(cfg, jax.device_count(), jax.process_count())
  checkpoint.prepare_workdir(workdir, cfg)
  tokenizer = saved_tok or pretrained_tok or store.load_or_train_tokenizer(cfg.tokenizer,
                                                                           cfg.data)
  splits = tasks.load(cfg, tokenizer)
  mesh = parallel.make_mesh(config_lib.mesh_shape(cfg.mesh.shape, jax.device_count()))
  model = models.build(cfg.model)
  task = tasks.make(cfg, model, tokenizer, splits)
  init_fn, abstract, shardings = abstract_state(model, make_optimizer(cfg.train, model),
                                                cfg.data.seq_len, cfg.train.seed, mesh)
  parallel.check_even(abstract, mesh)
  print(distributed.describe(mesh), flush=True)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    files.write_atomic(workdir / 'config.json', cfg.to_json())
    tokenizer.save(workdir / 'tokenizer')
  return Run(cfg, workdir, tokenizer, splits, mesh, model, task, init_fn, abstract, shardings)


def with_pretrained_model(cfg: Config, device_count: int, process_count: int = 1) -> Config:
  """With train.init_from, the model section is the architecture of that lm workdir or
  Hugging Face directory (the config's choices kept: models.pretrained); its
  weights are read when the run starts (`pretrained_params`): a fresh run starts from them,
  and the final report compares the tuned model with them."""
  path = cfg.train.init_from
  if not path:
    return cfg
  config_lib.require(Path(path).is_dir(), 'train.init_from', path,
                     'no such directory; give a run directory of python -m lm.main, a Hugging '
                     'Face model directory (config.json and model.safetensors), or \'\' to '
                     'start from random weights')
  read = load.model_config(Path(path))
  model = models.pretrained(read, cfg.model)
  config_lib.require(
      cfg.model.vocab_size <= model.vocab_size, 'tokenizer.kind', cfg.tokenizer.kind,
      f'its {cfg.model.vocab_size} ids do not fit the {model.vocab_size}-row embedding of '
      f'train.init_from={path!r}; use the tokenizer the weights were trained with')
  changed = [f'{f.name} {getattr(cfg.model, f.name, None)!r} -> {getattr(model, f.name)!r}'
             for f in dataclasses.fields(model)
             if getattr(cfg.model, f.name, None) != getattr(model, f.name)]
  if changed:
    say(f'train.init_from={path}: the model is the checkpoint\'s ({", ".join(changed)})')
  cfg = dataclasses.replace(cfg, model=model)
  config_lib.validate(cfg, device_count, process_count)
  return cfg


def pretrained_params(cfg: Config) -> Any:
  """The weights of train.init_from (an lm workdir's newest checkpoint that reads, or a
  Hugging Face directory's), in the layout of cfg.model."""
  _, params = load.params(Path(cfg.train.init_from))
  return models.layout_for(cfg.model, params)


def pretrained_tokenizer(cfg: Config) -> tokenizers.Tokenizer | None:
  """The tokenizer of an lm workdir in train.init_from, which must be the config's kind."""
  path = Path(cfg.train.init_from)
  if not cfg.train.init_from or not load.is_lm_workdir(path):
    return None
  tokenizer = tokenizers.load(path / 'tokenizer')
  t = cfg.tokenizer
  config_lib.require(
      tokenizer.kind == t.kind and (t.kind != 'bpe' or tokenizer.vocab_size == t.vocab_size),
      'tokenizer.kind', t.kind, f'train.init_from={str(path)!r} learned with a {tokenizer.kind} '
      f'tokenizer of {tokenizer.vocab_size} ids: set tokenizer.kind={tokenizer.kind!r}'
      + (f' and tokenizer.vocab_size={tokenizer.vocab_size}' if tokenizer.kind == 'bpe' else ''))
  return tokenizer


class TrainingError(RuntimeError):
  """The run stopped on a fault it cannot go past (a non-finite step, a failed save); its last
  good checkpoint is kept. Printed as one line; the CLI exits with status 1."""


class NonFiniteGuard:
  """Counts the steps whose loss or gradient norm is not finite (train_step has not applied
  them) and stops the run past `allowed` of them, naming the step and the checkpoint kept.
  Each skipped step is said and logged where the metrics log is (process 0)."""

  def __init__(self, allowed: int, ckpts: checkpoint.Checkpoints, log, bar):
    self.allowed, self.ckpts, self.log, self.bar = allowed, ckpts, log, bar
    self.skipped = 0

  def check(self, step: int, finite: jax.Array, metrics: dict[str, jax.Array]) -> None:
    if bool(finite):
      return
    self.skipped += 1
    what = (f'step {step}: loss {float(metrics["loss"])}, gradient norm '
            f'{float(metrics["grad_norm"])}')
    if self.skipped <= self.allowed:
      if self.log:
        self.bar.write(f'{what}: not finite, update skipped ({self.skipped} of '
                       f'train.skip_nonfinite_steps={self.allowed})')
        self.log.write(step, {'train/skipped_nonfinite': self.skipped})
      return
    self.ckpts.wait()
    kept = self.ckpts.latest_step()
    raise TrainingError(
        f'{what}: not finite, so the run stopped without applying it; '
        + (f'the newest checkpoint, step {kept}, is finite and kept' if kept is not None else
           'no checkpoint was written')
        + ': lower train.learning_rate, set train.grad_clip, or let '
        f'train.skip_nonfinite_steps={self.allowed + 1} skip such steps, then run again')


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
  """Trains (or resumes) and returns the final metrics; holds the workdir's lock meanwhile.

  Many processes (lm.distributed): each starts JAX's runtime first, then all check that they
  run one config; process 0 alone takes the lock, and an error there stops every process."""
  distributed.initialize(config_lib.parse_distributed(config))
  distributed.same_config(same_across_processes(config))
  with contextlib.ExitStack() as stack:
    error = None
    try:
      stack.enter_context(checkpoint.WorkdirLock(workdir, enabled=jax.process_index() == 0))
    except config_lib.ConfigError as e:
      error = e
    if not distributed.all_ok(error is None):
      raise error or config_lib.ConfigError(
          f'--workdir={str(workdir)!r}: process 0 could not take the workdir\'s lock (its '
          'error says why)')
    return _train(setup(config, workdir))


def same_across_processes(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as every process must have it: without the keys each process sets apart."""
  raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  section = {k: v for k, v in raw.get('distributed', {}).items()
             if k not in ('process_id', 'local_device_ids')}
  return json.loads(json.dumps({**raw, 'distributed': section}, default=str))


def train_batch_spec(r: Run) -> dict[str, jax.ShapeDtypeStruct]:
  """The global shapes, dtypes and shardings of a training batch (with its `signal_B`)."""
  shapes = {**r.task.batch_shapes(),
            'signal_B': jax.ShapeDtypeStruct((r.cfg.train.batch_size,), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                  sharding=parallel.batch_sharding(r.mesh, len(s.shape)))
          for k, s in shapes.items()}


def compiled_train_step(r: Run, batch_spec: dict[str, jax.ShapeDtypeStruct]):
  """The train step of `r`, compiled for its shardings (the state donated); call it inside the
  run's mesh and logical-axis rules."""
  t = r.cfg.train
  step = jax.jit(make_train_step(r.task.loss_fn, make_schedule(t), t.grad_accum_steps,
                                 r.task.prepare),
                 in_shardings=(r.shardings, {k: s.sharding for k, s in batch_spec.items()}),
                 out_shardings=(r.shardings, parallel.replicated(r.mesh)), donate_argnums=0)
  return step.lower(r.abstract, batch_spec).compile()


def step_timer(config: ml_collections.ConfigDict, workdir: str | Path
               ) -> Callable[[int], list[float]]:
  """A clock for `config`'s train step: compiles it, runs one warm-up step on a real batch, and
  returns timer(n), the wall times of n more compiled steps (state and data carried on between
  calls, so that several configs' timers can take turns; experiments/ablate.py). `workdir`
  gets the run's config and tokenizer, no checkpoint."""
  r = setup(config, workdir)
  batch_spec = train_batch_spec(r)
  sharding = {k: s.sharding for k, s in batch_spec.items()}
  rows = r.cfg.train.batch_size // jax.process_count()
  data_iter = iter(r.task.train_dataset(jax.process_index(), jax.process_count()))
  with jax.set_mesh(r.mesh), nn.logical_axis_rules(parallel.RULES):
    train_step = compiled_train_step(r, batch_spec)
    held = {'state': r.init_fn()}

  def timer(n: int) -> list[float]:
    times = []
    with jax.set_mesh(r.mesh), nn.logical_axis_rules(parallel.RULES):
      for _ in range(n):
        batch = parallel.global_batch({**next(data_iter),
                                       'signal_B': np.zeros(rows, np.int32)}, sharding)
        start = time.perf_counter()
        held['state'], metrics = train_step(held['state'], batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return times

  timer(1)  # the warm-up
  return timer


def _train(r: Run) -> dict[str, float]:
  cfg, t, task = r.cfg, r.cfg.train, r.task
  is_main = jax.process_index() == 0
  abstract, shardings = r.abstract, r.shardings
  batch_spec = train_batch_spec(r)
  batch_sharding = {k: s.sharding for k, s in batch_spec.items()}
  eval_sharding = {k: parallel.batch_sharding(r.mesh, len(s.shape))
                   for k, s in task.eval_batch_shapes().items()}
  ckpts = checkpoint.Checkpoints(r.workdir / 'checkpoints', t.keep_checkpoints,
                                 t.async_checkpoints)
  restored = ckpts.restore_latest(abstract)
  start = restored[0] if restored else 0
  # Read (and stacked for scan_layers) outside the mesh context: a fresh run starts from them,
  # and the final report compares the tuned model with them.
  # Host copies (numpy): the train step donates the state's device buffers.
  pretrained = jax.device_get(pretrained_params(cfg)) if cfg.train.init_from else None
  with jax.set_mesh(r.mesh), nn.logical_axis_rules(parallel.RULES):
    compile_start = time.perf_counter()
    train_step = compiled_train_step(r, batch_spec)
    eval_step = jax.jit(task.eval_fn, in_shardings=(shardings.params, eval_sharding, None))
    compile_seconds = time.perf_counter() - compile_start

    data_iter = iter(task.train_dataset(jax.process_index(), jax.process_count()))
    if restored:
      _, state, data_state = restored
      data_iter.set_state(data_state)
      say(f'resuming {r.workdir} from step {start}')
    else:
      state = r.init_fn()
      if pretrained is not None:
        state = state.replace(params=jax.device_put(pretrained, shardings.params))
        say(f'starting from the weights of {cfg.train.init_from}')
    peak = t.peak_flops or peak_flops(cfg.model.dtype)
    flops_per_token = task.train_flops_per_token()
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    say(f'model: {num_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOP/token; '
          f'compiled in {compile_seconds:.1f}s; device peak {peak / 1e9:.0f} GFLOP/s x '
          f'{jax.device_count()}; mesh {dict(r.mesh.shape)}')
    log = checkpoint.MetricsLog(r.workdir, start, wandb_run(cfg, r.workdir)) if is_main else None
    val_batches = task.eval_batches(t.eval_batches)
    evaluate = lambda params, batches: _evaluate(eval_step, task, params, batches, eval_sharding,
                                                 t.seed)
    tokens_per_step = t.batch_size * cfg.data.seq_len
    last_log_step, last_log_time = start, time.perf_counter()
    stop_signal = None
    try:
      with StopOnSignal() as stop, tqdm(total=t.steps, initial=start, unit='step',
                                        dynamic_ncols=True, disable=not is_main) as bar:
        guard = NonFiniteGuard(t.skip_nonfinite_steps, ckpts, log, bar)
        unchecked = None  # the last step's (step, finite, metrics), checked after the next
        # step is dispatched, so that the check does not stall the device's queue
        signalled = None  # the last step's agreed signal, read then too
        rows = t.batch_size // jax.process_count()
        for step in range(start + 1, t.steps + 1):
          batch = parallel.global_batch({**next(data_iter), 'signal_B': stop.rows(rows)},
                                        batch_sharding)
          state, metrics = train_step(state, batch)
          if unchecked:
            guard.check(*unchecked)
          stop_signal = None if signalled is None else int(signalled) or None  # last step's
          signalled = metrics.pop('signal')
          unchecked = (step, metrics.pop('finite'), metrics)
          bar.update(1)
          if step % t.log_every == 0 or step == t.steps:
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            tokens_per_sec = (step - last_log_step) * tokens_per_step / (now - last_log_time)
            record = {f'train/{k}': float(v) for k, v in metrics.items()}
            record.update({'perf/tokens_per_sec': tokens_per_sec, 'perf/mfu': tokens_per_sec
                           * flops_per_token / (peak * jax.device_count())})
            bar.set_postfix(loss=f'{record["train/loss"]:.3f}', tok_s=f'{tokens_per_sec:,.0f}')
            if log:
              log.write(step, record)
            last_log_step, last_log_time = step, now
          if step % t.eval_every == 0 and step != t.steps:
            val = evaluate(state.params, val_batches)
            if log:
              bar.write(f'step {step}: ' + ', '.join(f'val/{k} {v:.4f}' for k, v in val.items()))
              log.write(step, {f'val/{k}': v for k, v in val.items()})
            last_log_step, last_log_time = step, time.perf_counter()
          if step % t.checkpoint_every == 0 or step == t.steps or stop_signal is not None:
            guard.check(*unchecked)  # only finite states reach a checkpoint
            unchecked = None
            ckpts.save(step, state, data_iter.get_state(), cfg)
          if stop_signal is not None:
            break
      ckpts.close()  # waits for the last save
    except BaseException:
      with contextlib.suppress(Exception):  # the first error is the one to report
        ckpts.close()
      if log:
        log.close()
      raise
    if stop_signal is not None:
      say(f'{signal.Signals(stop_signal).name}: saved a checkpoint at step {step} in '
            f'{r.workdir}; run the same command to resume')
      if log:
        log.close()
      return {'step': step, 'stopped_by_signal': stop_signal}
    if pretrained is not None:
      pretrained = jax.device_put(pretrained, shardings.params)
    return _finish(r, state, evaluate, log, pretrained)


def wandb_run(cfg: Config, workdir: files.PathLike):
  """A Weights & Biases run for train.wandb_project (None where it is ''): the config, then
  every line of metrics.jsonl. Named after the workdir, in train.wandb_group; its id is fixed by
  the workdir, so a resumed run continues it. WANDB_MODE=offline keeps it on disk."""
  t = cfg.train
  if not t.wandb_project:
    return None
  import wandb  # only where it is asked for; config.validate checked that it is installed
  workdir = files.path(workdir)
  return wandb.init(project=t.wandb_project, group=t.wandb_group or None, name=workdir.name,
                    id=hashlib.sha256(str(workdir.resolve() if files.is_local(workdir) else workdir)
                                       .encode()).hexdigest()[:16],
                    resume='allow', config=cfg.to_dict(),
                    dir=str(workdir) if files.is_local(workdir) else None)


def _evaluate(eval_step, task: tasks.Task, params, batches, batch_sharding,
              seed: int) -> dict[str, float]:
  """The task's metrics over `batches`; batch i draws its randomness (masks) from a key fixed
  by (seed, i), so every evaluation of a run sees the same inputs."""
  sums: dict[str, float] = {}
  for i, batch in enumerate(batches):
    local = {k: v[jax.process_index()::jax.process_count()] for k, v in batch.items()}
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
    out = jax.device_get(eval_step(params, parallel.global_batch(local, batch_sharding), rng))
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {k: float(v) for k, v in task.metrics(sums).items()}


def _finish(r: Run, state: TrainState, evaluate: Callable, log,
            pretrained=None) -> dict[str, float]:
  """The final evaluation, with the task's report: baselines beside the model (and beside the
  starting model of train.init_from, `pretrained`), samples."""
  batches = r.task.eval_batches(FINAL_EVAL_BATCHES)
  val = evaluate(state.params, batches)
  for name, more in r.task.final_evals().items():
    val.update({f'{name}_{k}': v for k, v in evaluate(state.params, more).items()})
  base = None if pretrained is None else (pretrained, evaluate(pretrained, batches))
  extra, lines = r.task.report(state.params, val, r.mesh, base)
  step = int(state.step)
  result = {'step': step, **{f'val/{k}': v for k, v in {**val, **extra}.items()}}
  if log:
    log.write(step, {k: v for k, v in result.items() if k != 'step'})
    log.close()
  say(f'\nfinal validation at step {step} ' + '\n'.join(lines))
  return result


def say(text: str) -> None:
  """A line of the run's report: printed by process 0 only."""
  if jax.process_index() == 0:
    print(text, flush=True)
