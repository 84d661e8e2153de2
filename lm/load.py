"""One loader for "an lm workdir or a Hugging Face directory": what train.init_from, lm.sample,
lm.chat and the encoders (lm.encoding) start from.

  cfg, params, tokenizer = lm.load.model(Path('runs/decoder'))      # an lm run's workdir
  cfg, params, tokenizer = lm.load.model(Path('hf/llama'), 'bytes')  # a Hugging Face directory
  cfg = lm.load.model_config(path)                                   # weights unread

An lm workdir gives its newest checkpoint that reads and its own tokenizer; a Hugging Face
directory (its config.json names a model_type) gives its weights through lm.hf, and its
tokenizer must be named (lm.hf maps weights, not tokenizers), unless it holds an lm tokenizer
in tokenizer/. Parameters come in the plain layout (block_i); lm.models.layout_for gives
another config's layout.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lm import checkpoint, hf, models, tokenizers
from lm.errors import ConfigError
from lm.models import ModelConfig


def is_hugging_face(directory: Path) -> bool:
  """Whether a directory's config.json is a Hugging Face one (it names a model_type), not the
  config.json of an lm run."""
  path = Path(directory) / 'config.json'
  return path.is_file() and 'model_type' in json.loads(path.read_text())


def is_lm_workdir(path: Path) -> bool:
  """A run directory of lm.main (its config.json), not a Hugging Face directory."""
  return (Path(path) / 'config.json').is_file() and not is_hugging_face(path)


def _check(path: Path) -> None:
  if not (path / 'config.json').is_file():
    raise ConfigError(f'--workdir={str(path)!r}: no config.json; give a run directory of '
                      'python -m lm.main, or a Hugging Face model directory')


def model_config(path: Path) -> ModelConfig:
  """The model config of an lm workdir or a Hugging Face directory, checked; weights unread."""
  _check(Path(path))
  return hf.load_config(path) if is_hugging_face(path) else checkpoint.saved_model(Path(path))


def params(path: Path) -> tuple[ModelConfig, Any]:
  """(its model config, its weights in the plain layout): an lm workdir's newest checkpoint
  that reads, or a Hugging Face directory's."""
  path = Path(path)
  _check(path)
  if is_hugging_face(path):
    return hf.load(path)
  cfg = checkpoint.saved_model(path)
  return cfg, models.plain_layout(cfg, checkpoint.restore_params(path, cfg))


def tokenizer(path: Path, name: str | None = None) -> tokenizers.Tokenizer:
  """The tokenizer `name` (bytes, cl100k, a directory), else the directory's own."""
  path = Path(path)
  if not name and is_hugging_face(path) and not (path / 'tokenizer' / 'tokenizer.json').is_file():
    raise ConfigError(f'--workdir={str(path)!r} is a Hugging Face directory: name its '
                      'tokenizer with --tokenizer=bytes|cl100k|DIR')
  return tokenizers.load(name or path / 'tokenizer')


def model(path: Path, tokenizer_name: str | None = None):
  """(ModelConfig, params in the config's layout, tokenizer) of an lm workdir or a Hugging Face
  directory."""
  _check(Path(path))
  # a Hugging Face directory's tokenizer is named before its weights are read; an lm run's
  # checkpoint is read first (a run without one says so, whatever its tokenizer)
  tok = tokenizer(path, tokenizer_name) if is_hugging_face(path) else None
  cfg, plain = params(path)
  return cfg, models.layout_for(cfg, plain), tok or tokenizer(path, tokenizer_name)
