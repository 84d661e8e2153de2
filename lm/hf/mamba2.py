"""Mamba2ForCausalLM: pre-RMSNorm blocks of a Mamba-2 mixer (no MLP, no positions), tied or
untied head; torch Linear weights [out, in] (in_proj's output: z, x, B, C, dt side by side, as
lm's), the depthwise Conv1d weight [I + 2GN, 1, d_conv], the gated norm's weight `norm`."""
from __future__ import annotations

import math

from lm.errors import ConfigError
from lm.hf import mamba
from lm.hf.convert import Rule, same
from lm.models import DecoderConfig

MODEL_TYPES = {'mamba2': 'Mamba2ForCausalLM'}
REQUIRES = 'Mamba-2 is layer_pattern D with mlp_dim=0, positions none, rmsnorm'
CONFIG = DecoderConfig  # the lm family config whose models this architecture maps
IGNORED = ()


def fits(cfg: DecoderConfig) -> str | None:
  ok = ({kind.name for kind in cfg.kinds}, cfg.mlp_dim, cfg.positions, cfg.norm) == (
      {'mamba2'}, 0, 'none', 'rmsnorm')
  return 'mamba2' if ok and not cfg.unmapped_options else None


def config_from_hf(hf: dict, where: str) -> DecoderConfig:
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ConfigError(f'{where}: hidden_act={hf["hidden_act"]!r}; Mamba-2\'s activation is SiLU')
  limit = tuple(_number(v) for v in hf.get('time_step_limit', (0.0, math.inf)))
  if limit != (0.0, math.inf):
    raise ConfigError(f'{where}: time_step_limit={limit}; lm\'s Mamba-2 does not clamp the '
                      'time step (transformers\' default (0.0, inf))')
  d_model, expand = hf['hidden_size'], hf.get('expand', 2)
  head_dim = hf.get('head_dim', 64)
  if hf.get('num_heads', expand * d_model // head_dim) * head_dim != expand * d_model:
    raise ConfigError(f'{where}: num_heads={hf["num_heads"]} x head_dim={head_dim} != '
                      f'expand={expand} x hidden_size={d_model}; the file is inconsistent')
  return DecoderConfig(
      vocab_size=hf['vocab_size'], num_layers=hf['num_hidden_layers'], d_model=d_model,
      num_heads=1, mlp_dim=0, positions='none', norm='rmsnorm',
      norm_eps=hf.get('layer_norm_epsilon', 1e-5), use_bias=hf.get('use_bias', False),
      layer_pattern='D', state_size=hf.get('state_size', 128), d_conv=hf.get('conv_kernel', 4),
      expand=expand, ssm_head_dim=head_dim, ngroups=hf.get('n_groups', 8),
      dt_min=hf.get('time_step_min', 0.001), dt_max=hf.get('time_step_max', 0.1),
      conv_bias=hf.get('use_conv_bias', True), scan_chunk=hf.get('chunk_size', 256),
      tie_embeddings=hf.get('tie_word_embeddings', False),
      max_len=hf.get('max_position_embeddings', 2048))


def _number(value) -> float:
  """A float of config.json; transformers writes infinity as {'__float__': 'Infinity'}."""
  return float(value['__float__'] if isinstance(value, dict) else value)


def config_to_hf(cfg: DecoderConfig) -> dict:
  return {**mamba.backbone_config_to_hf(cfg), 'head_dim': cfg.ssm_head_dim,
          'num_heads': cfg.inner // cfg.ssm_head_dim, 'n_groups': cfg.ngroups,
          'chunk_size': cfg.scan_chunk}


normalize = mamba.normalize  # older checkpoints name the embedding `backbone.embedding`


def rules(cfg: DecoderConfig) -> list[Rule]:
  return mamba.backbone_rules(cfg, 'mamba2', lambda m, x: [
      same(m + 'dt_bias', x + 'dt_bias'), same(m + 'A_log', x + 'A_log'), same(m + 'D', x + 'D'),
      same(m + 'norm_scale', x + 'norm.weight')])
