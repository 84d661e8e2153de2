"""T5ForConditionalGeneration: the original T5 (ReLU MLPs, a head tied to the shared embedding,
its input times d_model^-0.5) and T5 v1.1 (gated-GELU MLPs, an untied head); relative position
bias in the first layer of each stack, RMS norm, no biases; torch Linear weights [out, in]."""
from __future__ import annotations

import numpy as np

from lm.errors import ConfigError
from lm.models import EncDecConfig
from lm.hf.convert import Rule, copies, linear, same

MODEL_TYPES = {'t5': 'T5ForConditionalGeneration'}
REQUIRES = ('T5 is an encdec: relative positions, rmsnorm, pre-norm, no biases, unscaled '
            'attention, scale_embeddings=False, relu or geglu, multi-head')
CONFIG = EncDecConfig  # the lm family config whose models this architecture maps
IGNORED = ()
MLPS = {'relu': 'relu', 'gated-gelu': 'geglu'}  # feed_forward_proj -> model.mlp


def fits(cfg: EncDecConfig) -> str | None:
  ok = (cfg.positions, cfg.norm, cfg.use_bias, cfg.scaled_attention, cfg.post_norm,
        cfg.scale_embeddings) == ('relative', 'rmsnorm', False, False, False, False)
  return 't5' if ok and cfg.mlp in MLPS.values() and cfg.kv_heads == cfg.num_heads else None


def config_from_hf(hf: dict, where: str) -> EncDecConfig:
  proj = hf.get('feed_forward_proj', 'relu')
  if proj not in MLPS:
    raise ConfigError(f'{where}: feed_forward_proj={proj!r}; lm\'s T5 takes {sorted(MLPS)}')
  heads, d_model = hf['num_heads'], hf['d_model']
  if hf['d_kv'] * heads != d_model:
    raise ConfigError(f'{where}: d_kv={hf["d_kv"]} x num_heads={heads} != d_model={d_model}; '
                      'lm\'s heads split d_model')
  # The head is untied where the config says tie_word_embeddings=false (T5 v1.1) or, as
  # transformers 5 writes it, scale_decoder_outputs=false.
  tied = hf.get('tie_word_embeddings', True) is not False and hf.get(
      'scale_decoder_outputs', True) is not False
  return EncDecConfig(
      vocab_size=hf['vocab_size'], num_layers=hf['num_layers'],
      num_decoder_layers=hf.get('num_decoder_layers') or hf['num_layers'], d_model=d_model,
      num_heads=heads, mlp_dim=hf['d_ff'], max_len=hf.get('n_positions', 512),
      relative_buckets=hf.get('relative_attention_num_buckets', 32),
      relative_max_distance=hf.get('relative_attention_max_distance', 128),
      norm_eps=hf.get('layer_norm_epsilon', 1e-6), mlp=MLPS[proj], tie_embeddings=tied,
      decoder_start_id=hf.get('decoder_start_token_id', hf.get('pad_token_id')) or 0)


def config_to_hf(cfg: EncDecConfig) -> dict:
  return {'tie_word_embeddings': cfg.tie_embeddings, 'd_model': cfg.d_model,
          'd_kv': cfg.head_dim, 'd_ff': cfg.mlp_dim, 'num_layers': cfg.num_layers,
          'num_decoder_layers': cfg.decoder_layers, 'num_heads': cfg.num_heads,
          'relative_attention_num_buckets': cfg.relative_buckets,
          'relative_attention_max_distance': cfg.relative_max_distance,
          'layer_norm_epsilon': cfg.norm_eps,
          'feed_forward_proj': {v: k for k, v in MLPS.items()}[cfg.mlp],
          'dropout_rate': 0.0, 'is_encoder_decoder': True, 'n_positions': cfg.max_len,
          'decoder_start_token_id': cfg.decoder_start_id, 'pad_token_id': cfg.decoder_start_id}


def normalize(tensors: dict, cfg: EncDecConfig) -> dict:
  """An untied head that transformers 5 saved tied to the embedding (no lm_head.weight) reads
  the embedding; a tied model's lm_head.weight equal to the embedding is dropped."""
  tensors = dict(tensors)
  if not cfg.tie_embeddings and 'lm_head.weight' not in tensors and 'shared.weight' in tensors:
    tensors['lm_head.weight'] = tensors['shared.weight']
  head, shared = tensors.get('lm_head.weight'), tensors.get('shared.weight')
  if cfg.tie_embeddings and head is not None and shared is not None and np.array_equal(head, shared):
    del tensors['lm_head.weight']
  return tensors


def attention(ours: str, theirs: str) -> list[Rule]:
  return [linear(f'{ours}/{name}/kernel', f'{theirs}.{t}.weight', 2 if name == 'out' else 1)
          for name, t in (('query', 'q'), ('key', 'k'), ('value', 'v'), ('out', 'o'))]


def mlp(cfg: EncDecConfig, ours: str, theirs: str) -> list[Rule]:
  names = ((('gate', 'wi_0'), ('up', 'wi_1')) if cfg.mlp == 'geglu' else (('up', 'wi'),))
  return [linear(f'{ours}/{name}/kernel', f'{theirs}.{t}.weight')
          for name, t in (*names, ('down', 'wo'))]


def rules(cfg: EncDecConfig) -> list[Rule]:
  out = [copies('embed/embedding', ('shared.weight', 'encoder.embed_tokens.weight',
                                    'decoder.embed_tokens.weight'))]
  if not cfg.tie_embeddings:
    out.append(linear('head/kernel', 'lm_head.weight'))
  for stack, layers in (('encoder', cfg.num_layers), ('decoder', cfg.decoder_layers)):
    out += [same(f'{stack}/final_norm/scale', f'{stack}.final_layer_norm.weight'),
            same(f'{stack}/position_bias/embedding',
                 f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight')]
    for i in range(layers):
      b, h = f'{stack}/block_{i}/', f'{stack}.block.{i}.layer.'
      if stack == 'encoder':
        out += [same(b + 'attn_norm/scale', h + '0.layer_norm.weight'),
                *attention(b + 'attn', h + '0.SelfAttention'),
                same(b + 'mlp_norm/scale', h + '1.layer_norm.weight'),
                *mlp(cfg, b + 'mlp', h + '1.DenseReluDense')]
      else:
        out += [same(b + 'self_norm/scale', h + '0.layer_norm.weight'),
                *attention(b + 'self_attn', h + '0.SelfAttention'),
                same(b + 'cross_norm/scale', h + '1.layer_norm.weight'),
                *attention(b + 'cross_attn', h + '1.EncDecAttention'),
                same(b + 'mlp_norm/scale', h + '2.layer_norm.weight'),
                *mlp(cfg, b + 'mlp', h + '2.DenseReluDense')]
  return out
