"""Model families: `build(config)` returns the Flax module of a typed model config; the
counting functions dispatch on its family."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.models import decoder, encoder


def build(cfg: ModelConfig) -> nn.Module:
  return encoder.Encoder(cfg) if cfg.family == 'encoder' else decoder.Decoder(cfg)


def abstract_params(model: nn.Module):
  """The boxed parameters of `model` (ShapeDtypeStructs with their logical axes and tags),
  computed without memory."""
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))['params']


def train_flops_per_token(cfg: ModelConfig, seq_len: int, mask_rate: float = 1.0) -> float:
  """Training FLOPs per token; an encoder's vocabulary projection runs on the share
  `mask_rate` of the tokens (the masked ones)."""
  if cfg.family == 'encoder':
    return encoder.train_flops_per_token(cfg, seq_len, mask_rate)
  return decoder.train_flops_per_token(cfg, seq_len)
