"""Tasks: a data pipeline plus a loss, one file each; `make(cfg, ...)` picks `data.task`.

- `clm` (lm.tasks.clm): causal language modelling (decoders);
- `mlm_nsp` (lm.tasks.mlm_nsp): BERT's masked language modelling plus next-sentence prediction
  (encoders);
- `sft` (lm.tasks.sft): instruction tuning on packed conversations, loss on assistant turns
  (decoders);
- `span` (lm.tasks.span): T5's span corruption (encoder-decoders);
- `seq2seq` (lm.tasks.seq2seq): input/target pairs, loss on the target (encoder-decoders).

The interface is lm.tasks.base.Task.
"""
from __future__ import annotations

import flax.linen as nn

from lm.config import Config
from lm.tasks.base import Task, compressed_bits_per_byte
from lm.tasks.clm import CausalLM
from lm.tasks.mlm_nsp import MaskedLM
from lm.tasks.seq2seq import Seq2Seq
from lm.tasks.sft import InstructionTuning
from lm.tasks.span import SpanCorruption

TASKS = {task.name: task for task in (CausalLM, MaskedLM, InstructionTuning, Seq2Seq,
                                      SpanCorruption)}

__all__ = ['TASKS', 'Task', 'compressed_bits_per_byte', 'load', 'make']


def load(cfg: Config, tokenizer) -> dict:
  """The splits of data.task's data (a token store, or the task's own)."""
  return TASKS[cfg.data.task].load(cfg, tokenizer)


def make(cfg: Config, model: nn.Module, tokenizer, splits: dict) -> Task:
  return TASKS[cfg.data.task](cfg, model, tokenizer, splits)
