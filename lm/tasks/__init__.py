"""Tasks: a data pipeline plus a loss, one file each; `make(cfg, ...)` picks `data.task`.

- `clm` (lm.tasks.clm): causal language modelling (decoders);
- `mlm_nsp` (lm.tasks.mlm_nsp): BERT's masked language modelling plus next-sentence prediction
  (encoders);
- `sft` (lm.tasks.sft): instruction tuning on packed conversations, loss on assistant turns
  (decoders);
- `span` (lm.tasks.span): T5's span corruption (encoder-decoders);
- `seq2seq` (lm.tasks.seq2seq): input/target pairs, loss on the target (encoder-decoders).

The interface is lm.tasks.base.Task. A task registers here, like a family in lm.models: its
class, which holds its data keys (`data_config`, the common DataConfig keys plus its own),
their checks (`validate`) and the tokens its step trains on (`token_counts`); lm.config asks
this registry and branches on no task name.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import flax.linen as nn

from lm.errors import ConfigError
from lm.tasks.base import DataConfig, Task, compressed_bits_per_byte
from lm.tasks.clm import CausalLM
from lm.tasks.mlm_nsp import MaskedLM
from lm.tasks.seq2seq import Seq2Seq
from lm.tasks.sft import InstructionTuning
from lm.tasks.span import SpanCorruption

TASKS = {task.name: task for task in (CausalLM, MaskedLM, InstructionTuning, Seq2Seq,
                                      SpanCorruption)}

__all__ = ['TASKS', 'DataConfig', 'Task', 'compressed_bits_per_byte', 'data_config_class',
           'load', 'make']

if TYPE_CHECKING:
  from lm.config import Config


def task_class(name: str) -> type[Task]:
  """The task called `name` (a data.task value)."""
  if name not in TASKS:
    raise ConfigError(f'data.task={name!r}: use one of {sorted(TASKS)}')
  return TASKS[name]


def data_config_class(name: str) -> type[DataConfig]:
  """The data config class of the task called `name`."""
  return task_class(name).data_config


def data_config_classes() -> dict[str, type[DataConfig]]:
  return {name: task.data_config for name, task in TASKS.items()}


def validate(data: DataConfig) -> None:
  """The task's own data keys' checks."""
  task_class(data.task).validate(data)


def load(cfg: Config, tokenizer) -> dict:
  """The splits of data.task's data (a token store, or the task's own)."""
  return TASKS[cfg.data.task].load(cfg, tokenizer)


def make(cfg: Config, model: nn.Module, tokenizer, splits: dict) -> Task:
  return TASKS[cfg.data.task](cfg, model, tokenizer, splits)
