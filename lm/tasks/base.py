"""The interface of a task: a data pipeline plus a loss, what the one training loop
(lm.train) trains on.

Each task gives the loop the same things: `loss_fn(params, batch, rng) -> (loss, metrics)`,
`eval_fn(params, batch, rng) -> sums` whose sums over a split `metrics(sums)` turns into
numbers, the shapes of a batch, a checkpointable training iterator, fixed evaluation batches,
and the lines of its final report; and, where a batch is made from the step's key (span
corruption), `prepare(rng, batch) -> batch`. Causal batches carry `inputs`, `targets` and
`loss_mask` (the targets the loss counts), so every causal task shares objectives.clm_loss.
"""
from __future__ import annotations

import abc
import dataclasses
import gzip
import lzma
from typing import TYPE_CHECKING, Any, ClassVar

import flax.linen as nn
import grain
import jax
import numpy as np

from lm import models
from lm.data import store
from lm.models import TokenCounts

if TYPE_CHECKING:
  from lm.config import Config


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The data keys of every task (data.*). Each task's own frozen config adds its keys to these
  (its `data_config`), so a config lists only its task's keys."""
  paths: tuple[str, ...] = ()  # globs of text or JSONL files; empty: the Python stdlib sources
  seq_len: int = 256
  val_fraction: float = 0.02
  cache_dir: str = ''  # empty: ~/.cache/lm/tokens
  task: str = 'clm'  # the task (lm.tasks.TASKS): clm | sft | mlm_nsp | span | seq2seq


def shuffled_indices(count: int, seed: int) -> grain.MapDataset:
  """Example indices 0..count-1, shuffled anew every epoch, endless."""
  return grain.MapDataset.range(count).shuffle(seed=seed).repeat()


def batched(ds: grain.MapDataset, batch_size: int, process_index: int, process_count: int
            ) -> grain.IterDataset:
  """This host's rows of each global batch (batch_size rows) as a checkpointable iterator.

  Global batch b is examples b*batch_size .. (b+1)*batch_size - 1 of `ds` whatever the process
  count: process p takes every process_count-th of them from p. `ds` is sliced after every map,
  so an example's randomness (grain's per-index seeds) does not depend on the process count
  either, and the iterator's state (batches read) means the same on any process count."""
  ds = ds[process_index::process_count].batch(batch_size // process_count, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))


def spread(count: int, batch_size: int, max_batches: int | None) -> np.ndarray:
  """All `count` example indices in order, or `max_batches` worth spread evenly over them."""
  if max_batches is not None and max_batches * batch_size < count:
    return np.linspace(0, count - 1, max_batches * batch_size).round().astype(int)
  return np.arange(count)


def stacked(rows: list[dict[str, np.ndarray]], batch_size: int,
            filler: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
  """`rows` in batches of batch_size, the last filled with `filler` rows (no loss reads them)."""
  rows = rows + [filler] * (-len(rows) % batch_size)
  return [{k: np.stack([r[k] for r in rows[i:i + batch_size]]) for k in filler}
          for i in range(0, len(rows), batch_size)]


def compressed_bits_per_byte(text: bytes, context: bytes | None = None) -> dict[str, float]:
  """Bits per byte of gzip -9 and xz -9 on `text`: baselines for val/bpb. With `context` (the
  training text), also xz -9e given it, a compressor that has read what the model trained on:
  the bytes xz -9e adds for `text` after `context`, len(xz(context + text)) - len(xz(context))."""
  out = {'gzip -9': 8 * len(gzip.compress(text, 9)) / len(text),
         'xz -9': 8 * len(lzma.compress(text, preset=9)) / len(text)}
  if context is not None:
    xz = lambda data: len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    out['xz -9e given train'] = 8 * (xz(context + text) - xz(context)) / len(text)
  return out


class Task(abc.ABC):
  """The interface; see the module docstring. A subclass sets `name`, `loss_fn`, `eval_fn`,
  and either `layout` (the token store it reads) or its own `load`; and, beside them, its data
  keys (`data_config`), their checks (`validate`) and the tokens a step trains on
  (`token_counts`)."""
  name: str
  data_config: ClassVar[type[DataConfig]] = DataConfig  # the common keys plus its own
  layout: str  # lm.data.store's layout: 'documents' or 'lines'
  loss_fn: Any
  eval_fn: Any
  prepare: Any = None  # prepare(rng, batch) -> batch: randomness drawn over the whole batch
                       # inside the train step, before it is split into microbatches

  @classmethod
  def load(cls, cfg: Config, tokenizer) -> dict[str, Any]:
    """The splits (train, val) this task reads: by default the token store of its layout."""
    return store.load_or_build(cfg.data, tokenizer, cls.layout)

  def __init__(self, cfg: Config, model: nn.Module, tokenizer, splits: dict[str, store.Split]):
    self.cfg, self.model, self.tokenizer, self.splits = cfg, model, tokenizer, splits

  @staticmethod
  def validate(data: DataConfig) -> None:
    """Its own data keys' checks (ConfigError naming field, value, fix); the common keys are
    lm.config's."""

  @staticmethod
  def token_counts(data: DataConfig) -> TokenCounts:
    """What one row of a step trains on, for the FLOP count: data.seq_len tokens."""
    return TokenCounts(data.seq_len)

  def train_flops_per_token(self) -> float:
    """Training FLOPs per token of data.seq_len (lm.models.train_flops_per_token)."""
    return models.train_flops_per_token(self.cfg.model, self.token_counts(self.cfg.data))

  @abc.abstractmethod
  def batch_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global shapes and dtypes of one training batch."""

  def eval_batch_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of one evaluation batch: a training batch's, unless the task says."""
    return self.batch_shapes()

  @abc.abstractmethod
  def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
    """Endless, checkpointable batches of this host's rows."""

  @abc.abstractmethod
  def eval_batches(self, max_batches: int | None) -> list[dict[str, np.ndarray]]:
    """Fixed validation batches (all of the split for None)."""

  def final_evals(self) -> dict[str, list[dict[str, np.ndarray]]]:
    """Further evaluations of the final report, by name; their metrics join the plain
    evaluation's as NAME_METRIC (clm with eval.stride: 'strided'). None by default."""
    return {}

  @abc.abstractmethod
  def metrics(self, sums: dict[str, float]) -> dict[str, float]:
    """Sums of eval_fn over a split -> its metrics."""

  @abc.abstractmethod
  def report(self, params, val: dict[str, float], mesh, base=None
             ) -> tuple[dict[str, float], list[str]]:
    """The final numbers beyond `val` and the lines that show them; `base` is the starting
    model's (params, val metrics) of a run with train.init_from, else None."""
