"""The registry of model families. A family registers its Flax module (`build`), its training
FLOPs per token, the tasks it trains on, the checks of its own config keys and, if it
generates, its decoding interface; nothing outside this module branches on a family's name.

  model = lm.models.build(cfg)                 # the family's nn.Module
  d = lm.models.decoding(cfg)                  # prefill, decode_step, reorder, expand, prepare
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.config import ConfigError, ModelConfig
from lm.models import decoder, encoder


@dataclasses.dataclass(frozen=True)
class Family:
  build: Callable[[ModelConfig], nn.Module]
  train_flops_per_token: Callable[[ModelConfig, int, float], float]  # (cfg, seq_len, mask_rate)
  tasks: tuple[str, ...]  # the data.task values it trains on (lm.tasks)
  validate: Callable[[ModelConfig], None]  # the checks of its own keys (ConfigError)
  decoding: Callable[[ModelConfig], Any] | None = None  # None: it does not generate


FAMILIES = {
    'decoder': Family(decoder.Decoder,
                      lambda cfg, seq_len, mask_rate: decoder.train_flops_per_token(cfg, seq_len),
                      ('clm',), decoder.validate, decoder.Decoding),
    'encoder': Family(encoder.Encoder, encoder.train_flops_per_token, ('mlm_nsp',),
                      encoder.validate),
}


def family(cfg: ModelConfig) -> Family:
  if cfg.family not in FAMILIES:
    raise ConfigError(f'model.family={cfg.family!r}: use one of {sorted(FAMILIES)}')
  return FAMILIES[cfg.family]


def build(cfg: ModelConfig) -> nn.Module:
  return family(cfg).build(cfg)


def decoding(cfg: ModelConfig):
  """The decoding interface of a family that generates (see decoder.Decoding): prefill,
  decode_step, reorder, expand, prepare, max_len."""
  make = family(cfg).decoding
  if make is None:
    raise ConfigError(f'model.family={cfg.family!r} does not generate text; it trains on '
                      f'{family(cfg).tasks}')
  return make(cfg)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, mask_rate: float = 1.0) -> float:
  """Training FLOPs per token; an encoder's vocabulary projection runs on the share
  `mask_rate` of the tokens (the masked ones)."""
  return family(cfg).train_flops_per_token(cfg, seq_len, mask_rate)


def plain_layout(cfg: ModelConfig, params: dict) -> dict:
  """params in the layout of one entry a layer (block_i), whatever cfg.scan_layers."""
  return decoder.unstack_layers(cfg, params) if cfg.scan_layers else params


def layout_for(cfg: ModelConfig, plain_params: dict) -> dict:
  """Params of the plain layout (block_i) in cfg's layout (stacked under `layers` for
  scan_layers): the inverse of plain_layout."""
  return decoder.stack_layers(cfg, plain_params) if cfg.scan_layers else plain_params


def abstract_params(model: nn.Module):
  """The boxed parameters of `model` (ShapeDtypeStructs with their logical axes and tags),
  computed without memory."""
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))['params']
