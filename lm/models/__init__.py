"""Model families. `build(config)` returns the Flax module of a typed model config."""
from __future__ import annotations

import flax.linen as nn

from lm.config import ModelConfig
from lm.models.decoder import Decoder


def build(cfg: ModelConfig) -> nn.Module:
  return Decoder(cfg)
