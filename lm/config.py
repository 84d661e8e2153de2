"""The one boundary where an ml_collections ConfigDict becomes a frozen, typed, validated config.

Every check lives here and every error names the field, the value and the fix. The rest of the
code takes `Config` and trusts it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from typing import Any, Callable, ClassVar, Sequence

import ml_collections

from lm import models, tasks
from lm.errors import ConfigError, require
from lm.models import ModelConfig
from lm.tasks import DataConfig


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  kind: str = 'bytes'  # bytes | bpe | cl100k
  vocab_size: int = 8192  # bpe only: ids in all, special tokens included


SCHEDULES = ('cosine', 'wsd')
OPTIMIZERS = ('adamw', 'muon')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  init_from: str = ''  # a Hugging Face model directory to start from (fine-tuning); '': random init
  batch_size: int = 16
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  schedule: str = 'cosine'  # after the warmup: 'cosine' decay, or 'wsd' (stable, then decay)
  decay_fraction: float = 0.2  # 'wsd': the last share of the steps, decayed linearly
  optimizer: str = 'adamw'  # 'adamw', or 'muon' for the hidden matrices (AdamW for the rest)
  muon_learning_rate: float = 0.02  # 'muon': the matrices' peak rate (the same schedule)
  muon_momentum: float = 0.95  # 'muon': its momentum, reached after muon_momentum_warmup steps
  muon_momentum_warmup: int = 0  # 'muon': steps from a momentum of 0.85 up to muon_momentum
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  seed: int = 0
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 8
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  async_checkpoints: bool = True  # write checkpoints while the next steps run
  skip_nonfinite_steps: int = 0  # steps with a non-finite loss or gradient skipped before stopping
  grad_accum_steps: int = 1  # microbatches a step: the batch in k parts, one optimizer update
  peak_flops: float = 0.0  # FLOP/s of one device; 0: measured at start with a matmul
  num_samples: int = 3
  sample_len: int = 200
  wandb_project: str = ''  # Weights & Biases project to log metrics and config to; '': none
  wandb_group: str = ''  # its run group (experiments/ablate.py: the plan); the run's name is
                         # its workdir's


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """The final evaluation's second figure (causal tasks): held-out bits per byte over windows
  that overlap, each token scored with at least data.seq_len - stride tokens before it (the
  context a compressor has); 0, or data.seq_len or more (windows that would not overlap): none.
  The plain figure, non-overlapping windows, stays."""
  stride: int = 0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  shape: tuple[int, int, int] = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes what is left


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Many processes (lm.distributed): unset, one process, or the cluster JAX detects."""
  coordinator_address: str = ''  # host:port of process 0's coordinator; '': detected or none
  num_processes: int = 0  # 0: detected (1 where no cluster is)
  process_id: int = -1  # this process's index; -1: detected
  local_device_ids: tuple[int, ...] = ()  # this process's devices; (): all it sees
  initialization_timeout: int = 300  # seconds to wait for every process to join


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig
  data: DataConfig
  tokenizer: TokenizerConfig
  train: TrainConfig
  mesh: MeshConfig
  distributed: DistributedConfig = DistributedConfig()
  eval: EvalConfig = EvalConfig()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)


SECTIONS = {'model': ModelConfig, 'data': DataConfig, 'tokenizer': TokenizerConfig,
            'train': TrainConfig, 'mesh': MeshConfig,
            'distributed': DistributedConfig, 'eval': EvalConfig}  # model: the family's class; data: the task's
DERIVED = {('model', 'vocab_size')}  # filled in by the boundary, never by the user


def _section(name: str, cls: type, given: dict[str, Any], extra: dict[str, Any]):
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  for key in given:
    require(key in fields and (name, key) not in DERIVED, f'{name}.{key}', given[key],
            f'unknown key; {name} takes {sorted(k for k in fields if (name, k) not in DERIVED)}')
  values = {}
  for key, f in fields.items():
    if key in extra:
      values[key] = extra[key]
    elif key in given:
      values[key] = _coerce(f'{name}.{key}', given[key], f.default)
    elif f.default is dataclasses.MISSING:
      raise ConfigError(f'{name}.{key} is missing: set it in the config file')
  return cls(**values)


def _model_section(given: dict[str, Any], vocab_size: int) -> ModelConfig:
  """The model section as its family's config class: a key that another family owns is one
  line naming that family."""
  family = given.pop('family', models.DEFAULT_FAMILY)
  cls = models.config_class(family)
  _refuse_others('model', 'family', family, given, cls, models.config_classes())
  return _section('model', cls, given, {'vocab_size': vocab_size})


def _data_section(given: dict[str, Any]) -> DataConfig:
  """The data section as its task's config class: a key that another task owns is one line
  naming that task."""
  task = given.get('task', DataConfig.task)
  require(isinstance(task, str), 'data.task', task, f'use one of {sorted(tasks.TASKS)}')
  cls = tasks.data_config_class(task)
  _refuse_others('data', 'task', task, given, cls, tasks.data_config_classes())
  return _section('data', cls, given, {})


def _refuse_others(section: str, by: str, choice: str, given: dict[str, Any], cls: type,
                   classes: dict[str, type]) -> None:
  """A key of `given` that only other choices' classes have: one line naming them."""
  for key in given:
    owners = [name for name, other in classes.items() if key in _names(other) - _names(cls)]
    if owners:
      raise ConfigError(
          f'{section}.{key}={given[key]!r}: a key of the {" and ".join(owners)} {by}, and '
          f'{section}.{by}={choice!r}; remove it from the config (a config lists only its '
          f'{by}\'s keys)')


def _names(cls: type) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def _coerce(field: str, value: Any, default: Any) -> Any:
  """Checks the type against the default's and turns lists into tuples."""
  if default is None:  # an optional integer, such as model.window
    require(value is None or (isinstance(value, int) and not isinstance(value, bool)), field,
            value, 'give an integer, or leave it unset (None)')
    return value
  if isinstance(default, tuple):
    if isinstance(value, str):  # 'a/*.txt,b/*.jsonl' from a command line
      value = tuple(v for v in value.split(',') if v)
    require(isinstance(value, (list, tuple)), field, value, 'give a sequence')
    return tuple(value)
  if isinstance(default, bool):
    require(isinstance(value, bool), field, value, 'give True or False')
  elif isinstance(default, int):
    require(isinstance(value, int) and not isinstance(value, bool), field, value,
            'give an integer')
  elif isinstance(default, float):
    require(isinstance(value, (int, float)) and not isinstance(value, bool), field, value,
            'give a number')
    value = float(value)
  elif isinstance(default, str):
    require(isinstance(value, str), field, value, 'give a string')
  return value


def from_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """`get_config()` of a config file such as configs/decoder.py, as the CLI loads it."""
  spec = importlib.util.spec_from_file_location('lm_config_file', path)
  if spec is None or not os.path.isfile(path):
    raise ConfigError(f'--config={str(path)!r}: no such file; give a path like configs/decoder.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _raw(config: ml_collections.ConfigDict | dict[str, Any]) -> dict[str, Any]:
  raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  for key in raw:
    require(key in SECTIONS, key, raw[key], f'unknown section; use {sorted(SECTIONS)}')
  return raw


def parse_distributed(config: ml_collections.ConfigDict | dict[str, Any]) -> DistributedConfig:
  """The `distributed` section alone, checked: what start-up needs before any device exists."""
  d = _section('distributed', DistributedConfig, dict(_raw(config).get('distributed', {})), {})
  require(d.num_processes >= 0, 'distributed.num_processes', d.num_processes,
          'give the number of processes, or 0 to detect it')
  require(d.num_processes <= 1 or d.coordinator_address, 'distributed.num_processes',
          d.num_processes, 'many processes need distributed.coordinator_address=HOST:PORT '
          '(process 0\'s host and a free port), the same on every process')
  require(d.process_id == -1 or 0 <= d.process_id < max(d.num_processes, 1),
          'distributed.process_id', d.process_id,
          f'must be in [0, distributed.num_processes={d.num_processes}), or -1 to detect it')
  require(d.num_processes <= 1 or d.process_id >= 0,
          'distributed.process_id', d.process_id,
          f'with distributed.num_processes={d.num_processes}, give each process its index '
          f'0..{d.num_processes - 1}')
  address = d.coordinator_address
  require(not address or (address.count(':') >= 1 and address.rsplit(':', 1)[1].isdigit()),
          'distributed.coordinator_address', address, 'give HOST:PORT, e.g. 10.0.0.2:1234')
  require(d.initialization_timeout > 0, 'distributed.initialization_timeout',
          d.initialization_timeout, 'give the seconds to wait for every process, e.g. 300')
  require(all(isinstance(i, int) and i >= 0 for i in d.local_device_ids),
          'distributed.local_device_ids', d.local_device_ids,
          'give device indices of this host, e.g. (0, 1), or () for all')
  return d


def parse(config: ml_collections.ConfigDict | dict[str, Any], *,
          vocab_size: int | Callable[[TokenizerConfig], int], device_count: int,
          process_count: int = 1) -> Config:
  """ConfigDict -> frozen Config, validated. Raises ConfigError naming field, value and fix.

  `vocab_size` is the model's, or a function of the tokenizer section that gives it.
  """
  raw = _raw(config)
  tokenizer = _section('tokenizer', TokenizerConfig, dict(raw.get('tokenizer', {})), {})
  model = _model_section(dict(raw.get('model', {})),
                         vocab_size(tokenizer) if callable(vocab_size) else vocab_size)
  _trains_on(model, raw.get('data', {}).get('task', DataConfig.task))  # before the task's keys
  cfg = Config(model=model, tokenizer=tokenizer, data=_data_section(dict(raw.get('data', {}))),
               **{name: _section(name, cls, dict(raw.get(name, {})), {})
                  for name, cls in SECTIONS.items()
                  if name not in ('model', 'tokenizer', 'data', 'distributed')},
               distributed=parse_distributed(raw))
  validate(cfg, device_count, process_count)
  return cfg


RENAMED = {('model', 'window_pattern'): 'layer_pattern'}  # keys of older runs' config.json


def upgrade_saved(saved: dict[str, Any]) -> dict[str, Any]:
  """A run's config.json as this version writes it: renamed keys under their new names, keys
  added since (which a run before them used at their defaults) filled in, and the model keys of
  other families (which older versions wrote at their defaults) left out."""
  out = {}
  for name, cls in SECTIONS.items():
    section = {RENAMED.get((name, k), k): v for k, v in saved.get(name, {}).items()}
    if name in ('model', 'data'):  # other families' / tasks' keys at their defaults
      cls = (models.config_class(section.get('family', models.DEFAULT_FAMILY)) if name == 'model'
             else tasks.data_config_class(section.get('task', DataConfig.task)))
      section = {k: v for k, v in section.items() if k in _names(cls)}
    defaults = {f.name: f.default for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}
    out[name] = json.loads(json.dumps({**defaults, **section}))  # tuples as JSON has them
  return {**saved, **out}


def model_from_dict(model: dict[str, Any]) -> ModelConfig:
  """The model section of a config.json (as upgrade_saved gives it) as its family's config."""
  cls = models.config_class(model.get('family', models.DEFAULT_FAMILY))
  return cls(**{f.name: model[f.name] for f in dataclasses.fields(cls) if f.init})


def _positive(section: Any, prefix: str, names: Sequence[str]) -> None:
  for name in names:
    value = getattr(section, name)
    require(value > 0, f'{prefix}.{name}', value, 'must be positive')


def _trains_on(m: ModelConfig, task: str) -> None:
  trains_on = models.family(m).tasks
  require(task in trains_on, 'data.task', task, f'a model.family={m.family!r} trains on {trains_on}')


def validate(cfg: Config, device_count: int, process_count: int = 1) -> None:
  m, d, t = cfg.model, cfg.data, cfg.train
  _positive(d, 'data', ['seq_len'])
  models.validate(m, d.seq_len)
  _trains_on(m, d.task)
  tasks.validate(d)
  require(0.0 < d.val_fraction < 1.0, 'data.val_fraction', d.val_fraction,
          'must be in (0, 1)')
  _positive(t, 'train', ['steps', 'batch_size', 'log_every', 'eval_every', 'eval_batches',
                         'checkpoint_every', 'keep_checkpoints'])
  require(t.learning_rate > 0, 'train.learning_rate', t.learning_rate, 'must be positive')
  require(0 <= t.warmup_steps < t.steps, 'train.warmup_steps', t.warmup_steps,
          f'must be in [0, train.steps={t.steps})')
  require(0.0 <= t.min_lr_ratio <= 1.0, 'train.min_lr_ratio', t.min_lr_ratio, 'must be in [0, 1]')
  require(t.schedule in SCHEDULES, 'train.schedule', t.schedule, f'choose one of {SCHEDULES}')
  require(0.0 < t.decay_fraction <= 1.0, 'train.decay_fraction', t.decay_fraction,
          'must be in (0, 1]: the share of train.steps the wsd schedule decays over')
  decay_start = t.steps - round(t.decay_fraction * t.steps)
  require(t.schedule != 'wsd' or t.warmup_steps <= decay_start, 'train.warmup_steps',
          t.warmup_steps, f'must end by the wsd decay\'s first step, {decay_start} (train.steps '
          f'{t.steps} x (1 - train.decay_fraction {t.decay_fraction}))')
  require(t.optimizer in OPTIMIZERS, 'train.optimizer', t.optimizer, f'choose one of {OPTIMIZERS}')
  require(t.muon_learning_rate > 0, 'train.muon_learning_rate', t.muon_learning_rate,
          'must be positive')
  require(0.0 <= t.muon_momentum < 1.0, 'train.muon_momentum', t.muon_momentum,
          'must be in [0, 1)')
  require(t.muon_momentum_warmup >= 0, 'train.muon_momentum_warmup', t.muon_momentum_warmup,
          'give 0 (none) or more steps')
  require(t.peak_flops >= 0, 'train.peak_flops', t.peak_flops, 'use 0 to measure it')
  require(cfg.eval.stride >= 0, 'eval.stride', cfg.eval.stride,
          'give 0 (no strided figure) or a step in tokens, under data.seq_len')
  require(t.skip_nonfinite_steps >= 0, 'train.skip_nonfinite_steps', t.skip_nonfinite_steps,
          'how many non-finite steps to skip before stopping: give 0 (stop at the first) or more')
  require(t.num_samples >= 0 and t.sample_len >= 0, 'train.num_samples/sample_len',
          (t.num_samples, t.sample_len), 'must be >= 0')
  require(not t.wandb_project or importlib.util.find_spec('wandb') is not None,
          'train.wandb_project', t.wandb_project,
          'wandb is not installed: pip install wandb, or set train.wandb_project=\'\'')
  validate_batch(t, mesh_shape(cfg.mesh.shape, device_count), process_count)


def validate_batch(t: TrainConfig, mesh: tuple[int, int, int], process_count: int) -> None:
  """The global batch splits into processes' rows, microbatches and data x fsdp shards."""
  k, data_parallel = t.grad_accum_steps, mesh[0] * mesh[1]
  require(k >= 1, 'train.grad_accum_steps', k, 'give 1 (no accumulation) or more')
  require(t.batch_size % process_count == 0, 'train.batch_size', t.batch_size,
          f'each of the {process_count} processes reads an equal share of a batch: give a '
          f'multiple of {process_count}, e.g. {_round_up(t.batch_size, process_count)}')
  require((t.batch_size // process_count) % k == 0, 'train.grad_accum_steps', k,
          f'must divide the batch of each process, train.batch_size={t.batch_size} / '
          f'{process_count} process(es) = {t.batch_size // process_count}')
  require((t.batch_size // k) % data_parallel == 0, 'train.batch_size', t.batch_size,
          f'must be divisible by the data x fsdp mesh size {data_parallel}'
          + (f' times train.grad_accum_steps={k} (each microbatch spreads over data x fsdp)'
             if k > 1 else '')
          + f'; try train.batch_size={_round_up(t.batch_size, k * data_parallel)}')


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def mesh_shape(shape: Sequence[int], device_count: int) -> tuple[int, int, int]:
  """Resolves a (data, fsdp, tensor) shape with at most one -1 against the device count."""
  shape = tuple(shape)
  fix = (f'give 3 sizes (data, fsdp, tensor) whose product is the device count {device_count}, '
         f'e.g. mesh.shape=({device_count}, 1, 1), or -1 for one of them')
  require(len(shape) == 3 and all(isinstance(s, int) and (s > 0 or s == -1) for s in shape)
          and shape.count(-1) <= 1, 'mesh.shape', shape, fix)
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    require(device_count % known == 0, 'mesh.shape', shape, fix)
    shape = tuple(device_count // known if s == -1 else s for s in shape)
  require(math.prod(shape) == device_count, 'mesh.shape', shape,
          f'its sizes multiply to {math.prod(shape)} devices, and the run has {device_count} '
          f'(over all processes); {fix}')
  return shape  # type: ignore[return-value]
