"""The registry of model families. A family registers its frozen config class (the common
lm.models.base.ModelConfig keys plus its own), its Flax module (`build`), its training FLOPs per
token, the tasks it trains on, the checks of its own config keys and, if it generates, its
decoding interface; nothing outside this module branches on a family's name.

  cfg = lm.models.DecoderConfig(vocab_size=259, layer_pattern='MMMG', mlp_dim=0, ...)
  cfg = lm.models.EncDecConfig(vocab_size=32128, mlp='geglu', tie_embeddings=False, ...)  # T5
  model = lm.models.build(cfg)                 # the family's nn.Module
  d = lm.models.decoding(cfg)                  # prefill, decode_step, reorder, expand, prepare
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.errors import ConfigError
from lm.models import decoder, encdec, encoder
from lm.models.base import RUN_CHOICES, ModelConfig, TokenCounts, validate_common
from lm.models.decoder import DecoderConfig
from lm.models.encdec import EncDecConfig
from lm.models.encoder import EncoderConfig


class Decoding(Protocol):
  """The decoding interface of a family that generates (decoder.Decoding, encdec.Decoding),
  all that lm.sampling knows of a model. The state is a pytree whose per-layer states follow
  lm.models.layers.kinds.LayerState (take_rows, reorder)."""

  @property
  def max_len(self) -> int | None:
    """The longest sequence it decodes (None: no bound)."""

  def prompt_room(self, max_new_tokens: int) -> int | None:
    """The longest prompt that leaves room for max_new_tokens (None: no bound)."""

  def new_tokens_room(self, prompt_len: int) -> int | None:
    """The most new tokens after a prompt of prompt_len (None: no bound)."""

  def prepare(self, params, rows: int):
    """params laid out for decoding `rows` rows on this device."""

  def prefill(self, params, prompts_BxT: jax.Array, lengths_B: jax.Array | None,
              max_len: int) -> tuple[jax.Array, Any]:
    """Row b's prompt is the last lengths_B[b] columns of prompts_BxT (left-padded): the
    logits_BxV of each row's next token and the state to continue from."""

  def decode_step(self, params, token_B: jax.Array, state: Any) -> tuple[jax.Array, Any]:
    """One new token a row: logits_BxV and the state after it."""

  def expand(self, state: Any, beams: int) -> Any:
    """The state of B rows as B * beams rows (row b * beams + j: beam j of row b)."""

  def reorder(self, state: Any, parent_PxR: jax.Array) -> Any:
    """Beam j of prompt p continues beam parent_PxR[p, j]."""


@dataclasses.dataclass(frozen=True)
class Family:
  config: type[ModelConfig]  # its frozen config dataclass: ModelConfig's keys plus its own
  build: Callable[[ModelConfig], nn.Module]
  train_flops_per_token: Callable[[ModelConfig, TokenCounts], float]
  tasks: tuple[str, ...]  # the data.task values it trains on (lm.tasks)
  validate: Callable[[ModelConfig, int | None], None]  # its own keys' checks, and (with
                                                      # data.seq_len) its sequences' (ConfigError)
  decoding: Callable[[ModelConfig], Decoding] | None = None  # None: it does not generate
  plain_layout: Callable[[ModelConfig, dict], dict] = lambda cfg, params: params
  layout_for: Callable[[ModelConfig, dict], dict] = lambda cfg, params: params
  encoding: Callable[[ModelConfig], Any] | None = None  # mlm_logits, hidden (encoder.Encoding);
                                                       # None: no fill_mask or embed
  run_choices: tuple[str, ...] = RUN_CHOICES  # model keys a run keeps from its config when it
                                              # starts from a pretrained model


DEFAULT_FAMILY = 'decoder'  # a model section without model.family

FAMILIES = {
    'decoder': Family(DecoderConfig, decoder.Decoder,
                      lambda cfg, c: decoder.train_flops_per_token(cfg, c.seq_len),
                      ('clm', 'sft'), decoder.validate, decoder.Decoding,
                      decoder.plain_layout, decoder.layout_for,
                      run_choices=RUN_CHOICES + ('scan_layers', 'moe_aux_coef',
                                                   'moe_capacity_factor')),
    'encoder': Family(EncoderConfig, encoder.Encoder,
                      lambda cfg, c: encoder.train_flops_per_token(cfg, c.seq_len, c.predicted),
                      ('mlm_nsp',), encoder.validate, encoding=encoder.Encoding),
    'encdec': Family(EncDecConfig, encdec.EncDec,
                     lambda cfg, c: encdec.train_flops_per_token(cfg, c.seq_len,
                                                                 target_len=c.target_len),
                     ('span', 'seq2seq'), encdec.validate, encdec.Decoding),
}


def config_class(name: str) -> type[ModelConfig]:
  """The config class of the family called `name` (a model.family value)."""
  if name not in FAMILIES:
    raise ConfigError(f'model.family={name!r}: use one of {sorted(FAMILIES)}')
  return FAMILIES[name].config


def config_classes() -> dict[str, type[ModelConfig]]:
  return {name: f.config for name, f in FAMILIES.items()}


def family(cfg: ModelConfig) -> Family:
  config_class(cfg.family)  # an unknown family is a ConfigError
  return FAMILIES[cfg.family]


def validate(cfg: ModelConfig, seq_len: int | None = None) -> None:
  """The architecture options of a model config (also of one read from Hugging Face): the
  common keys (base.validate_common), then the family's own; with `seq_len`, also that the
  model takes sequences of that length. Raises ConfigError naming field, value and fix."""
  fam = family(cfg)
  validate_common(cfg)
  fam.validate(cfg, seq_len)


def pretrained(read: ModelConfig, configured: ModelConfig) -> ModelConfig:
  """The model of a run that starts from a pretrained `read` (train.init_from): its
  architecture, with the run's choices (its family's `run_choices`: dtype, remat, ...) taken
  from the run's `configured` model where that is of the same family (else the common ones)."""
  keys = family(read).run_choices if read.family == configured.family else RUN_CHOICES
  return dataclasses.replace(read, **{k: getattr(configured, k) for k in keys})


def build(cfg: ModelConfig) -> nn.Module:
  return family(cfg).build(cfg)


def decoding(cfg: ModelConfig) -> Decoding:
  """The decoding interface (`Decoding`) of a family that generates."""
  make = family(cfg).decoding
  if make is None:
    raise ConfigError(f'model.family={cfg.family!r} does not generate text; it trains on '
                      f'{family(cfg).tasks}')
  return make(cfg)


def encoding(cfg: ModelConfig):
  """The encoding interface (encoder.Encoding: mlm_logits, hidden) of a family that provides
  one; for another, a ConfigError of one line."""
  make = family(cfg).encoding
  if make is None:
    with_one = sorted(name for name, f in FAMILIES.items() if f.encoding is not None)
    raise ConfigError(f'model.family={cfg.family!r}: fill_mask and embed need a model of a family '
                      f'with an encoding interface ({", ".join(with_one)}: configs/encoder.py, '
                      'or a BertForPreTraining directory)')
  return make(cfg)


def train_flops_per_token(cfg: ModelConfig, counts: TokenCounts) -> float:
  """Training FLOPs per input token of a step whose rows hold `counts` (the task's
  token_counts): an encoder's vocabulary projection runs on the share `predicted` of the
  tokens; an encoder-decoder's step also runs target_len decoder tokens a row, their FLOPs
  spread over the seq_len encoder tokens (encdec.encoder_flops_per_token and
  decoder_flops_per_token count them apart)."""
  return family(cfg).train_flops_per_token(cfg, counts)


def plain_layout(cfg: ModelConfig, params: dict) -> dict:
  """params in the layout of one entry a layer (block_i), whatever the family's options (a
  decoder's scan_layers stacks them)."""
  return family(cfg).plain_layout(cfg, params)


def layout_for(cfg: ModelConfig, plain_params: dict) -> dict:
  """Params of the plain layout (block_i) in cfg's layout: the inverse of plain_layout."""
  return family(cfg).layout_for(cfg, plain_params)


def abstract_params(model: nn.Module):
  """The boxed parameters of `model` (ShapeDtypeStructs with their logical axes and tags),
  computed without memory."""
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))['params']


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
  """(all parameters, the embeddings' among them) of cfg's model, computed without memory.
  Embeddings: every table of nn.Embed (tokens, learned positions, segments) and every
  parameter with a vocabulary axis (an untied head, an MLM bias)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  total = embedding = 0
  for path, box in jax.tree_util.tree_leaves_with_path(abstract_params(build(cfg)),
                                                       is_leaf=is_box):
    size = box.unbox().size
    total += size
    if path[-1].key == 'embedding' or 'vocab' in (box.names or ()):
      embedding += size
  return total, embedding
