"""ModelConfig, the keys every family's model has, and their checks (the families' registry,
lm.models, adds each family's own)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from lm.errors import require

DTYPES = ('float32', 'bfloat16')
POSITIONS = ('learned', 'rope', 'none')
NORMS = ('layernorm', 'rmsnorm')
MLPS = ('gelu', 'gelu_exact', 'relu', 'relu2', 'swiglu', 'geglu')
REMATS = ('none', 'full', 'dots')
RUN_CHOICES = ('dtype', 'remat')  # keys of how a model runs, not what it is: a run starting from
                                  # a pretrained model keeps its own (Family.run_choices)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The keys every family's model has. Each family's own frozen config adds its keys to these
  (lm.models.DecoderConfig, lm.models.EncoderConfig; the registry maps model.family to it), so
  a config lists only its family's keys. `vocab_size` comes from the tokenizer, not the user."""
  POSITIONS: ClassVar[tuple[str, ...]] = POSITIONS  # the model.positions a family takes
  vocab_size: int
  family: str = dataclasses.field(default='', init=False)  # fixed by the family's class
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  num_kv_heads: int = 0  # key/value heads; 0: num_heads (multi-head), 1: multi-query
  mlp_dim: int = 1024  # 0: blocks without an MLP (as Mamba-1's)
  max_len: int = 256
  positions: str = 'learned'  # learned | rope | none (a scan layer orders the tokens itself)
  rope_theta: float = 10000.0
  norm: str = 'layernorm'  # layernorm | rmsnorm
  norm_eps: float = 1e-5
  mlp: str = 'gelu'  # gelu (tanh approximation, GPT-2) | gelu_exact (erf, BERT) | relu |
                     # swiglu (Llama) | geglu (T5 v1.1's gated GELU)
  use_bias: bool = True  # biases of every projection
  dtype: str = 'float32'  # compute dtype; parameters stay float32
  remat: str = 'none'  # recompute in the backward pass: none | full (each block) | dots (all but matmuls)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads


@dataclasses.dataclass(frozen=True)
class TokenCounts:
  """What one row of a training step holds, as its task counts it (Task.token_counts), for a
  family's FLOP count: `seq_len` input tokens; of them the share `predicted` whose output
  projection runs (an encoder's masked tokens; 1 for a causal model); `target_len` decoder
  tokens beside them (an encoder-decoder's targets; None for the others)."""
  seq_len: int
  predicted: float = 1.0
  target_len: int | None = None


def validate_common(m: ModelConfig) -> None:
  """The common keys' checks; errors name field, value, fix."""
  for key in ('num_layers', 'd_model', 'num_heads', 'max_len'):
    require(getattr(m, key) > 0, f'model.{key}', getattr(m, key), 'must be positive')
  require(m.mlp_dim >= 0, 'model.mlp_dim', m.mlp_dim, 'give the MLP width, or 0 for no MLP')
  require(m.d_model % m.num_heads == 0, 'model.d_model', m.d_model,
          f'must be divisible by model.num_heads={m.num_heads}; '
          f'try model.d_model={max(1, round(m.d_model / m.num_heads)) * m.num_heads}')
  for key, options in (('positions', type(m).POSITIONS), ('norm', NORMS), ('mlp', MLPS),
                       ('remat', REMATS), ('dtype', DTYPES)):
    require(getattr(m, key) in options, f'model.{key}', getattr(m, key), f'use one of {options}')
  require(m.num_kv_heads >= 0 and m.num_heads % m.kv_heads == 0, 'model.num_kv_heads',
          m.num_kv_heads, f'must divide model.num_heads={m.num_heads} (0 means num_heads)')
  require(m.positions != 'rope' or m.head_dim % 2 == 0, 'model.d_model', m.d_model,
          f'RoPE rotates pairs: head width d_model / num_heads = {m.head_dim} must be even')
  require(m.rope_theta > 0 and m.norm_eps > 0, 'model.rope_theta/norm_eps',
          (m.rope_theta, m.norm_eps), 'must be positive')
