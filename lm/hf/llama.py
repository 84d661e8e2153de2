"""LlamaForCausalLM, MistralForCausalLM (a sliding window), MixtralForCausalLM (experts): RoPE,
RMSNorm, SwiGLU, grouped-query attention; torch Linear weights [out, in]."""
from __future__ import annotations

import numpy as np

from lm.errors import ConfigError
from lm.models import DecoderConfig
from lm.hf.convert import Rule, concat, flat, linear, same, swap_last

MODEL_TYPES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
               'mixtral': 'MixtralForCausalLM'}
REQUIRES = ('Llama and Mistral are rope, rmsnorm, swiglu (Mixtral: with experts and no '
            'biases), one window in every layer')
CONFIG = DecoderConfig  # the lm family config whose models this architecture maps
IGNORED = ()


def fits(cfg: DecoderConfig) -> str | None:
  if (not cfg.mlp_dim or not all(kind.attends for kind in cfg.kinds) or len(set(cfg.kinds)) > 1
      or cfg.unmapped_options):
    return None
  if (cfg.positions, cfg.norm, cfg.mlp) != ('rope', 'rmsnorm', 'swiglu') or (
      cfg.num_experts and cfg.use_bias):
    return None
  window = cfg.layer_windows[0]
  return 'mixtral' if cfg.num_experts else 'mistral' if window is not None else 'llama'


def config_from_hf(hf: dict, where: str) -> DecoderConfig:
  model_type = hf['model_type']
  rope = hf.get('rope_parameters') or {}
  rope_type = rope.get('rope_type', (hf.get('rope_scaling') or {}).get('rope_type', 'default'))
  if rope_type != 'default' or hf.get('hidden_act', 'silu') != 'silu':
    raise ConfigError(f'{where}: rope_type={rope_type!r}, hidden_act='
                      f'{hf.get("hidden_act")!r}; lm supports default RoPE and SiLU')
  if hf.get('attention_bias', False) != hf.get('mlp_bias', False):
    raise ConfigError(f'{where}: attention_bias != mlp_bias; lm has one use_bias')
  heads = hf['num_attention_heads']
  if hf.get('head_dim') not in (None, hf['hidden_size'] // heads):
    raise ConfigError(f'{where}: head_dim={hf["head_dim"]} is not hidden_size / '
                      'num_attention_heads, which lm requires')
  return DecoderConfig(
      vocab_size=hf['vocab_size'], num_layers=hf['num_hidden_layers'],
      d_model=hf['hidden_size'], num_heads=heads,
      num_kv_heads=hf.get('num_key_value_heads') or heads,
      mlp_dim=hf['intermediate_size'], max_len=hf.get('max_position_embeddings', 2048),
      positions='rope', rope_theta=rope.get('rope_theta', hf.get('rope_theta', 10000.0)),
      norm='rmsnorm', norm_eps=hf.get('rms_norm_eps', 1e-6), mlp='swiglu',
      use_bias=hf.get('attention_bias', False),
      window=hf.get('sliding_window') if model_type != 'llama' else None,
      num_experts=hf['num_local_experts'] if model_type == 'mixtral' else 0,
      experts_per_token=hf.get('num_experts_per_tok', 2),
      moe_aux_coef=hf.get('router_aux_loss_coef', 0.01),
      tie_embeddings=hf.get('tie_word_embeddings', False))


def config_to_hf(cfg: DecoderConfig) -> dict:
  out = {'tie_word_embeddings': cfg.tie_embeddings,
         'num_hidden_layers': cfg.num_layers, 'hidden_size': cfg.d_model,
         'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.kv_heads,
         'head_dim': cfg.head_dim, 'intermediate_size': cfg.mlp_dim,
         'max_position_embeddings': cfg.max_len, 'hidden_act': 'silu',
         'rms_norm_eps': cfg.norm_eps, 'attention_bias': cfg.use_bias, 'mlp_bias': cfg.use_bias,
         'rope_theta': cfg.rope_theta,
         'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta}}
  if fits(cfg) in ('mistral', 'mixtral'):
    out['sliding_window'] = cfg.layer_windows[0]
  if cfg.num_experts:
    out.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
               router_aux_loss_coef=cfg.moe_aux_coef)
  return out


def normalize(tensors: dict, cfg) -> dict:
  """Mixtral checkpoints written before transformers 5 hold each expert's w1 (gate), w3 (up)
  and w2 (down) under block_sparse_moe: fused here into gate_up_proj [E, 2F, D] and down_proj
  [E, D, F], as transformers 5 holds them."""
  legacy = sorted({k.split('block_sparse_moe.')[0] for k in tensors if 'block_sparse_moe.' in k})
  if not legacy:
    return tensors
  tensors = dict(tensors)
  for h in legacy:
    m = h + 'block_sparse_moe.'
    experts = sorted({int(k[len(m + 'experts.'):].split('.')[0]) for k in tensors
                      if k.startswith(m + 'experts.')})
    take = lambda e, w: tensors.pop(f'{m}experts.{e}.{w}.weight')
    tensors[h + 'mlp.experts.gate_up_proj'] = np.stack(
        [np.concatenate([take(e, 'w1'), take(e, 'w3')], axis=0) for e in experts])
    tensors[h + 'mlp.experts.down_proj'] = np.stack([take(e, 'w2') for e in experts])
    tensors[h + 'mlp.gate.weight'] = tensors.pop(m + 'gate.weight')
  return tensors


def rules(cfg: DecoderConfig) -> list[Rule]:
  out = [same('embed/embedding', 'model.embed_tokens.weight'),
         same('final_norm/scale', 'model.norm.weight')]
  if not cfg.tie_embeddings:
    out.append(linear('head/kernel', 'lm_head.weight'))
  for i in range(cfg.num_layers):
    b, h = f'block_{i}/', f'model.layers.{i}.'
    out += [same(b + 'attn_norm/scale', h + 'input_layernorm.weight'),
            same(b + 'mlp_norm/scale', h + 'post_attention_layernorm.weight')]
    for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj'),
                         ('out', 'o_proj')):
      out.append(linear(f'{b}attn/{ours}/kernel', f'{h}self_attn.{theirs}.weight',
                        num_in=2 if ours == 'out' else 1))
      if cfg.use_bias:
        out.append(flat(f'{b}attn/{ours}/bias', f'{h}self_attn.{theirs}.bias'))
    if cfg.num_experts:  # gate_up [E, 2F, D] is gate and up [E, D, F] side by side
      to_ours = lambda w: np.swapaxes(w, 1, 2)
      out += [linear(b + 'moe/router', h + 'mlp.gate.weight'),
              concat([b + 'moe/gate', b + 'moe/up'], h + 'mlp.experts.gate_up_proj', axis=2,
                     to_theirs=to_ours, to_ours=to_ours),
              swap_last(b + 'moe/down', h + 'mlp.experts.down_proj')]
      continue
    for name in ('gate', 'up', 'down'):
      out.append(linear(f'{b}mlp/{name}/kernel', f'{h}mlp.{name}_proj.weight'))
      if cfg.use_bias:
        out.append(same(f'{b}mlp/{name}/bias', f'{h}mlp.{name}_proj.bias'))
  return out
