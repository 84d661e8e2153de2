"""The interface of a task: a data pipeline plus a loss, what the one training loop
(lm.train) trains on.

Each task gives the loop the same things: `loss_fn(params, batch, rng) -> (loss, metrics)`,
`eval_fn(params, batch, rng) -> sums` whose sums over a split `metrics(sums)` turns into
numbers, the shapes of a batch, a checkpointable training iterator, fixed evaluation batches,
and the lines of its final report. Causal batches carry `inputs`, `targets` and `loss_mask`
(the targets the loss counts), so every causal task shares objectives.clm_loss.
"""
from __future__ import annotations

import abc
import gzip
import lzma
from typing import Any

import flax.linen as nn
import grain
import jax
import numpy as np

from lm.config import Config
from lm.data import store


def compressed_bits_per_byte(text: bytes) -> dict[str, float]:
  """Bits per byte of gzip -9 and xz -9 on the same text: baselines for val/bpb."""
  return {'gzip -9': 8 * len(gzip.compress(text, 9)) / len(text),
          'xz -9': 8 * len(lzma.compress(text, preset=9)) / len(text)}


class Task(abc.ABC):
  """The interface; see the module docstring. A subclass sets `name`, `loss_fn`, `eval_fn`,
  and either `layout` (the token store it reads) or its own `load`."""
  name: str
  layout: str  # lm.data.store's layout: 'documents' or 'lines'
  loss_fn: Any
  eval_fn: Any

  @classmethod
  def load(cls, cfg: Config, tokenizer) -> dict[str, Any]:
    """The splits (train, val) this task reads: by default the token store of its layout."""
    return store.load_or_build(cfg.data, tokenizer, cls.layout)

  def __init__(self, cfg: Config, model: nn.Module, tokenizer, splits: dict[str, store.Split]):
    self.cfg, self.model, self.tokenizer, self.splits = cfg, model, tokenizer, splits

  @abc.abstractmethod
  def batch_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global shapes and dtypes of one training batch."""

  @abc.abstractmethod
  def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
    """Endless, checkpointable batches of this host's rows."""

  @abc.abstractmethod
  def eval_batches(self, max_batches: int | None) -> list[dict[str, np.ndarray]]:
    """Fixed validation batches (all of the split for None)."""

  @abc.abstractmethod
  def metrics(self, sums: dict[str, float]) -> dict[str, float]:
    """Sums of eval_fn over a split -> its metrics."""

  @abc.abstractmethod
  def report(self, params, val: dict[str, float], mesh, base=None
             ) -> tuple[dict[str, float], list[str]]:
    """The final numbers beyond `val` and the lines that show them; `base` is the starting
    model's (params, val metrics) of a run with train.init_from, else None."""
