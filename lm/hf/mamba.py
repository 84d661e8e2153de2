"""MambaForCausalLM: pre-RMSNorm blocks of a Mamba-1 mixer (no MLP, no positions), tied or untied
head, with or without the projections' biases; torch Linear weights [out, in], the depthwise
Conv1d weight [I, 1, d_conv]."""
from __future__ import annotations

from lm.errors import ConfigError
from lm.models import DecoderConfig
from lm.hf.convert import Rule, depthwise_conv, linear, same

MODEL_TYPES = {'mamba': 'MambaForCausalLM'}
REQUIRES = 'Mamba is layer_pattern M with mlp_dim=0, positions none, rmsnorm'
CONFIG = DecoderConfig  # the lm family config whose models this architecture maps
IGNORED = ()

def fits(cfg: DecoderConfig) -> str | None:
  ok = ({kind.name for kind in cfg.kinds}, cfg.mlp_dim, cfg.positions, cfg.norm) == (
      {'mamba'}, 0, 'none', 'rmsnorm')
  return 'mamba' if ok and not cfg.unmapped_options else None

def config_from_hf(hf: dict, where: str) -> DecoderConfig:
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ConfigError(f'{where}: hidden_act={hf["hidden_act"]!r}; Mamba\'s activation is SiLU')
  d_model, rank = hf['hidden_size'], hf.get('time_step_rank', 'auto')
  return DecoderConfig(
      vocab_size=hf['vocab_size'], num_layers=hf['num_hidden_layers'], d_model=d_model,
      num_heads=1, mlp_dim=0, positions='none', norm='rmsnorm',
      norm_eps=hf.get('layer_norm_epsilon', 1e-5), use_bias=hf.get('use_bias', False),
      layer_pattern='M', state_size=hf.get('state_size', 16), d_conv=hf.get('conv_kernel', 4),
      expand=hf.get('expand', 2), dt_rank=0 if rank == 'auto' else int(rank),
      dt_min=hf.get('time_step_min', 0.001), dt_max=hf.get('time_step_max', 0.1),
      conv_bias=hf.get('use_conv_bias', True), tie_embeddings=hf.get('tie_word_embeddings', True),
      max_len=hf.get('max_position_embeddings', 2048))

def backbone_config_to_hf(cfg: DecoderConfig) -> dict:
  """The config.json keys MambaForCausalLM and Mamba2ForCausalLM share."""
  return {'tie_word_embeddings': cfg.tie_embeddings,
          'hidden_size': cfg.d_model, 'num_hidden_layers': cfg.num_layers,
          'state_size': cfg.state_size, 'expand': cfg.expand, 'conv_kernel': cfg.d_conv,
          'use_bias': cfg.use_bias, 'use_conv_bias': cfg.conv_bias, 'hidden_act': 'silu',
          'layer_norm_epsilon': cfg.norm_eps, 'time_step_min': cfg.dt_min,
          'time_step_max': cfg.dt_max, 'residual_in_fp32': True}


def config_to_hf(cfg: DecoderConfig) -> dict:
  return {**backbone_config_to_hf(cfg), 'intermediate_size': cfg.inner,
          'time_step_rank': cfg.time_step_rank}


def normalize(tensors: dict, cfg) -> dict:
  """Older checkpoints name the embedding `backbone.embedding`."""
  return {k.replace('backbone.embedding.', 'backbone.embeddings.'): v for k, v in tensors.items()}


def backbone_rules(cfg: DecoderConfig, scope: str, mixer_rules) -> list[Rule]:
  """The name map MambaForCausalLM and Mamba2ForCausalLM share: embeddings, final norm,
  untied head, each layer's norm, the mixer's in_proj, conv1d and out_proj (with their biases);
  mixer_rules(ours, theirs) adds the mixer's own under block_i/`scope`/ and
  backbone.layers.i.mixer."""
  out = [same('embed/embedding', 'backbone.embeddings.weight'),
         same('final_norm/scale', 'backbone.norm_f.weight')]
  if not cfg.tie_embeddings:
    out.append(linear('head/kernel', 'lm_head.weight'))
  for i in range(cfg.num_layers):
    b, h = f'block_{i}/', f'backbone.layers.{i}.'
    m, x = f'{b}{scope}/', h + 'mixer.'
    out += [same(b + 'mixer_norm/scale', h + 'norm.weight'),
            linear(m + 'in_proj/kernel', x + 'in_proj.weight'),
            depthwise_conv(m + 'conv_kernel', x + 'conv1d.weight'),
            linear(m + 'out_proj/kernel', x + 'out_proj.weight'), *mixer_rules(m, x)]
    if cfg.conv_bias:
      out.append(same(m + 'conv_bias', x + 'conv1d.bias'))
    if cfg.use_bias:
      out += [same(m + 'in_proj/bias', x + 'in_proj.bias'),
              same(m + 'out_proj/bias', x + 'out_proj.bias')]
  return out


def rules(cfg: DecoderConfig) -> list[Rule]:
  return backbone_rules(cfg, 'mamba', lambda m, x: [
      linear(m + 'x_proj/kernel', x + 'x_proj.weight'),
      linear(m + 'dt_kernel', x + 'dt_proj.weight'), same(m + 'dt_bias', x + 'dt_proj.bias'),
      same(m + 'A_log', x + 'A_log'), same(m + 'D', x + 'D')])
