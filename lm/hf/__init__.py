"""Hugging Face checkpoints in and out: local directories of config.json plus safetensors.

  cfg, params = lm.hf.load('path/to/hf_model')  # GPT2LMHeadModel, LlamaForCausalLM,
  logits_BxTxV = lm.models.build(cfg).apply(     # MistralForCausalLM, MixtralForCausalLM,
      {'params': params}, tokens_BxT)            # MambaForCausalLM, Mamba2ForCausalLM
  lm.hf.save(cfg, params, 'path/out')                # transformers' from_pretrained reads it

  cfg, params = lm.hf.load('path/to/bert')       # BertForPreTraining
  mlm_logits_BxTxV, nsp_logits_Bx2 = lm.models.build(cfg).apply(
      {'params': params}, tokens_BxT, segment_ids=segment_ids_BxT, padding_mask=mask_BxT)

  cfg, params = lm.hf.load('path/to/t5')         # T5ForConditionalGeneration (T5, v1.1)
  logits_BxTxV = lm.models.build(cfg).apply(
      {'params': params}, tokens_BxS, decoder_tokens_BxT, padding_mask=mask_BxS)

One module per architecture (gpt2, llama, bert, mamba, mamba2, t5) holds its config translation
and one declarative name map (lm.hf.convert.Rule) used both to load and to save. Weights are
converted exactly (float32); nothing is downloaded; `transformers` itself is not needed. A
checkpoint missing a tensor, holding one of the wrong shape, or holding tensors lm does not
read is an error that names them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from lm import files, models
from lm.errors import ConfigError
from lm.models import ModelConfig
from lm.hf import bert, convert, gpt2, llama, mamba, mamba2, t5
from lm.models.layers import common

MODULES = (gpt2, llama, bert, mamba, mamba2, t5)
ARCHITECTURES = {t: name for module in MODULES for t, name in module.MODEL_TYPES.items()}
WEIGHTS = 'model.safetensors'


def _module(model_type: str):
  return next(m for m in MODULES if model_type in m.MODEL_TYPES)


def load_config(path: str | os.PathLike) -> ModelConfig:
  """The ModelConfig of a local Hugging Face model directory, weights unread."""
  return config_from_hf(_read_config(Path(path)), Path(path))


def load(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) of a local Hugging Face model directory, in the plain layer layout
  (lm.models.layout_for gives the layout of a config such as scan_layers)."""
  directory = Path(path)
  hf = _read_config(directory)
  cfg = config_from_hf(hf, directory)
  module = _module(hf['model_type'])
  tensors = module.normalize(_read_weights(directory), cfg)
  shapes = {name: tuple(x.shape) for name, x in _abstract(cfg).items()}
  return cfg, convert.read(module.rules(cfg), tensors, shapes, directory, module.IGNORED)


def save(cfg: ModelConfig, params: Any, path: str | os.PathLike) -> None:
  """Writes config.json and model.safetensors that `transformers` loads."""
  from safetensors.numpy import save_file
  module = _module(architecture_of(cfg))
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), nn.meta.unbox(params))
  state = convert.write(module.rules(cfg), models.plain_layout(cfg, params))
  directory = Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  files.write_atomic(directory / WEIGHTS,
                     lambda tmp: save_file(state, str(tmp), metadata={'format': 'pt'}))
  files.write_atomic(directory / 'config.json', json.dumps(config_to_hf(cfg), indent=2))


def architecture_of(cfg: ModelConfig) -> str:
  """The Hugging Face model_type that has exactly this architecture."""
  for module in MODULES:
    model_type = isinstance(cfg, module.CONFIG) and module.fits(cfg)
    if model_type:
      return model_type
  options = [f for f in dataclasses.fields(cfg) if f.name != 'vocab_size' and (
      not isinstance(f.default, (int, float)) or isinstance(f.default, bool)
      or getattr(cfg, f.name) != f.default)]  # every choice, and the numbers off their default
  fields = ', '.join(f'{f.name}={getattr(cfg, f.name)!r}' for f in options)
  raise ConfigError(f'model: {fields}: no supported Hugging Face '
                    'architecture has this combination; ' + '; '.join(m.REQUIRES for m in MODULES))


def config_from_hf(hf: dict, directory: Path) -> ModelConfig:
  where = f'{directory}/config.json'
  model_type = hf.get('model_type')
  if model_type not in ARCHITECTURES:
    raise ConfigError(f'{where}: model_type={model_type!r} is not supported; '
                      f'lm reads {sorted(ARCHITECTURES.values())}')
  try:
    cfg = _module(model_type).config_from_hf(hf, where)
  except KeyError as e:
    raise ConfigError(f'{where}: the {model_type} config lacks {e}; the file is incomplete') from e
  models.validate(cfg)
  return cfg


def config_to_hf(cfg: ModelConfig) -> dict:
  model_type = architecture_of(cfg)
  return {'model_type': model_type, 'architectures': [ARCHITECTURES[model_type]],
          'vocab_size': cfg.vocab_size,
          'torch_dtype': 'float32',
          'bos_token_id': None, 'eos_token_id': None,  # lm's tokenizer holds its special ids
          **_module(model_type).config_to_hf(cfg)}


def _abstract(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """'path/to/param' -> its shape and dtype, for the plain layout of cfg's model."""
  abstract = nn.meta.unbox(models.abstract_params(models.build(cfg)))
  plain = jax.eval_shape(lambda params: models.plain_layout(cfg, params), abstract)
  return {common.param_name(path): x for path, x in jax.tree_util.tree_leaves_with_path(plain)}


def _read_config(directory: Path) -> dict:
  path = directory / 'config.json'
  if not path.is_file():
    raise ConfigError(f'{directory}: no config.json; give a Hugging Face model directory '
                      '(config.json plus model.safetensors)')
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ConfigError(f'{path}: not valid JSON ({e})') from e


def _read_weights(directory: Path) -> dict[str, np.ndarray]:
  """model.safetensors, or the shards its index names; float32 numpy arrays."""
  from safetensors.flax import load_file
  index = directory / (WEIGHTS + '.index.json')
  files = (sorted(set(json.loads(index.read_text())['weight_map'].values()))
           if index.is_file() else [WEIGHTS])
  tensors = {}
  for name in files:
    if not (directory / name).is_file():
      raise ConfigError(f'{directory}: no {name}; lm reads safetensors weights (save with '
                        'safe_serialization=True)')
    tensors.update({k: np.asarray(v, np.float32) for k, v in load_file(directory / name).items()})
  return tensors
