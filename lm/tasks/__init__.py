"""Tasks: a data pipeline plus a loss, one file each; `make(cfg, ...)` picks `data.task`.

- `clm` (lm.tasks.clm): causal language modelling (decoders);
- `mlm_nsp` (lm.tasks.mlm_nsp): BERT's masked language modelling plus next-sentence prediction
  (encoders).

The interface is lm.tasks.base.Task.
"""
from __future__ import annotations

import flax.linen as nn

from lm.config import Config
from lm.data import store
from lm.tasks.base import Task, compressed_bits_per_byte
from lm.tasks.clm import CausalLM
from lm.tasks.mlm_nsp import MaskedLM

TASKS = {task.name: task for task in (CausalLM, MaskedLM)}
LAYOUTS = {'clm': 'documents', 'mlm_nsp': 'lines'}  # the token store each task reads

__all__ = ['TASKS', 'LAYOUTS', 'Task', 'compressed_bits_per_byte', 'make']


def make(cfg: Config, model: nn.Module, tokenizer, splits: dict[str, store.Split]) -> Task:
  return TASKS[cfg.data.task](cfg, model, tokenizer, splits)
