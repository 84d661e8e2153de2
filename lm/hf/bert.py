"""BertForPreTraining: post-LayerNorm blocks, learned positions and segments, the exact (or tanh)
GELU, a pooler, the MLM transform and the next-sentence head; torch Linear weights [out, in]."""
from __future__ import annotations

from lm.errors import ConfigError
from lm.models import EncoderConfig
from lm.hf.convert import Rule, copies, flat, linear, same

MODEL_TYPES = {'bert': 'BertForPreTraining'}
REQUIRES = ('BERT is an encoder: learned positions, layernorm, gelu_exact (or gelu), biases, '
            'post_norm=True, multi-head')
CONFIG = EncoderConfig  # the lm family config whose models this architecture maps
IGNORED = (r'^bert\.embeddings\.position_ids$',)  # a buffer of older checkpoints
ACTIVATIONS = {'gelu': 'gelu_exact', 'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu'}


def fits(cfg: EncoderConfig) -> str | None:
  ok = (cfg.positions, cfg.norm, cfg.use_bias, cfg.post_norm) == (
      'learned', 'layernorm', True, True)
  return 'bert' if ok and cfg.mlp in ('gelu', 'gelu_exact') and cfg.kv_heads == cfg.num_heads else None


def config_from_hf(hf: dict, where: str) -> EncoderConfig:
  act = hf.get('hidden_act', 'gelu')
  if act not in ACTIVATIONS:
    raise ConfigError(f'{where}: hidden_act={act!r}; lm\'s BERT takes {sorted(ACTIVATIONS)}')
  if hf.get('position_embedding_type', 'absolute') != 'absolute':
    raise ConfigError(f'{where}: position_embedding_type={hf["position_embedding_type"]!r}; '
                      'lm\'s BERT has absolute (learned) positions')
  if not hf.get('tie_word_embeddings', True):
    raise ConfigError(f'{where}: tie_word_embeddings=false; lm\'s MLM decoder is the token '
                      'embedding')
  return EncoderConfig(
      vocab_size=hf['vocab_size'], num_layers=hf['num_hidden_layers'],
      d_model=hf['hidden_size'], num_heads=hf['num_attention_heads'],
      mlp_dim=hf['intermediate_size'], max_len=hf.get('max_position_embeddings', 512),
      norm_eps=hf.get('layer_norm_eps', 1e-12), mlp=ACTIVATIONS[act], post_norm=True,
      num_segments=hf.get('type_vocab_size', 2))


def config_to_hf(cfg: EncoderConfig) -> dict:
  return {'tie_word_embeddings': True,  # the MLM decoder is the token embedding
          'num_hidden_layers': cfg.num_layers, 'hidden_size': cfg.d_model,
          'num_attention_heads': cfg.num_heads, 'intermediate_size': cfg.mlp_dim,
          'hidden_act': {'gelu_exact': 'gelu', 'gelu': 'gelu_new'}[cfg.mlp],
          'max_position_embeddings': cfg.max_len, 'type_vocab_size': cfg.num_segments,
          'layer_norm_eps': cfg.norm_eps, 'position_embedding_type': 'absolute',
          'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0, 'pad_token_id': None}


def normalize(tensors: dict, cfg) -> dict:
  return tensors


def dense(ours: str, theirs: str, num_in: int = 1) -> list[Rule]:
  bias = flat if ours.endswith(('query', 'key', 'value')) else same
  return [linear(ours + '/kernel', theirs + '.weight', num_in), bias(ours + '/bias', theirs + '.bias')]


def norm(ours: str, theirs: str) -> list[Rule]:
  return [same(ours + '/scale', theirs + '.weight'), same(ours + '/bias', theirs + '.bias')]


def rules(cfg: EncoderConfig) -> list[Rule]:
  e = 'bert.embeddings.'
  out = [same('embed/embedding', e + 'word_embeddings.weight'),
         same('pos_embed/embedding', e + 'position_embeddings.weight'),
         same('segment_embed/embedding', e + 'token_type_embeddings.weight'),
         *norm('embed_norm', e + 'LayerNorm'),
         *norm('mlm_norm', 'cls.predictions.transform.LayerNorm'),
         copies('mlm_bias', ('cls.predictions.bias', 'cls.predictions.decoder.bias')),
         *dense('pooler', 'bert.pooler.dense'),
         *dense('mlm_transform', 'cls.predictions.transform.dense'),
         *dense('nsp', 'cls.seq_relationship')]
  for i in range(cfg.num_layers):  # a block's attn_norm follows attention (post-norm)
    b, h = f'block_{i}/', f'bert.encoder.layer.{i}.'
    out += [*dense(b + 'attn/query', h + 'attention.self.query'),
            *dense(b + 'attn/key', h + 'attention.self.key'),
            *dense(b + 'attn/value', h + 'attention.self.value'),
            *dense(b + 'attn/out', h + 'attention.output.dense', num_in=2),
            *dense(b + 'mlp/up', h + 'intermediate.dense'),
            *dense(b + 'mlp/down', h + 'output.dense'),
            *norm(b + 'attn_norm', h + 'attention.output.LayerNorm'),
            *norm(b + 'mlp_norm', h + 'output.LayerNorm')]
  return out
