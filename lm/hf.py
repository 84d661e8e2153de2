"""Hugging Face checkpoints in and out: local directories of config.json plus safetensors.

  cfg, params = lm.hf.load('path/to/hf_model')  # GPT2LMHeadModel, LlamaForCausalLM,
  logits_BxTxV = lm.models.build(cfg).apply(     # MistralForCausalLM, MixtralForCausalLM
      {'params': params}, tokens_BxT)
  lm.hf.save(cfg, params, 'path/out')                # transformers' from_pretrained reads it

  cfg, params = lm.hf.load('path/to/bert')       # BertForPreTraining
  mlm_logits_BxTxV, nsp_logits_Bx2 = lm.models.build(cfg).apply(
      {'params': params}, tokens_BxT, segment_ids=segment_ids_BxT, padding_mask=mask_BxT)

Weights are converted exactly (float32); nothing is downloaded. `transformers` itself is not
needed: the config.json fields are read and written here.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from lm.checkpoint import write_atomic
from lm.config import ConfigError, ModelConfig, validate_model
from lm import models
from lm.models import decoder

ARCHITECTURES = {'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM',
                 'mistral': 'MistralForCausalLM', 'mixtral': 'MixtralForCausalLM',
                 'bert': 'BertForPreTraining'}
BERT_ACTIVATIONS = {'gelu': 'gelu_exact', 'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu'}
WEIGHTS = 'model.safetensors'


def load_config(path: str | os.PathLike) -> ModelConfig:
  """The ModelConfig of a local Hugging Face model directory, weights unread."""
  return config_from_hf(_read_config(Path(path)), Path(path))


def load(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) of a local Hugging Face model directory, in the plain layer layout
  (stack them with lm.models.decoder.stack_layers for scan_layers)."""
  directory = Path(path)
  hf = _read_config(directory)
  cfg = config_from_hf(hf, directory)
  state = _read_weights(directory)
  convert = {'gpt2': _gpt2_from_hf, 'bert': _bert_from_hf}.get(hf['model_type'], _llama_from_hf)
  return cfg, _check_shapes(cfg, convert(cfg, state, directory), directory)


def save(cfg: ModelConfig, params: Any, path: str | os.PathLike) -> None:
  """Writes config.json and model.safetensors that `transformers` loads."""
  from safetensors.numpy import save_file
  model_type = architecture_of(cfg)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), nn.meta.unbox(params))
  if cfg.scan_layers:
    params = decoder.unstack_layers(cfg, params)
  state = {'gpt2': _gpt2_to_hf, 'bert': _bert_to_hf}.get(model_type, _llama_to_hf)(cfg, params)
  directory = Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
            str(directory / (WEIGHTS + '.tmp')), metadata={'format': 'pt'})
  os.replace(directory / (WEIGHTS + '.tmp'), directory / WEIGHTS)
  write_atomic(directory / 'config.json', json.dumps(config_to_hf(cfg), indent=2))


def architecture_of(cfg: ModelConfig) -> str:
  """The Hugging Face model_type that has exactly this architecture."""
  if cfg.family == 'encoder':
    if (cfg.positions, cfg.norm, cfg.use_bias, cfg.post_norm) == (
        'learned', 'layernorm', True, True) and cfg.mlp != 'swiglu' and (
        cfg.kv_heads == cfg.num_heads):
      return 'bert'
    raise ConfigError(
        f'model: positions={cfg.positions}, norm={cfg.norm}, mlp={cfg.mlp}, '
        f'use_bias={cfg.use_bias}, post_norm={cfg.post_norm}, num_kv_heads={cfg.num_kv_heads}: '
        'BERT is learned/layernorm/gelu_exact (or gelu) with biases, post-norm, multi-head')
  if len(set(cfg.layer_windows)) > 1:
    raise ConfigError(f'model.window_pattern={cfg.window_pattern!r}: the supported Hugging Face '
                      'architectures use one window in every layer; use a pattern of one letter')
  if (cfg.positions, cfg.norm, cfg.mlp, cfg.use_bias, cfg.layer_windows[0]) == (
      'learned', 'layernorm', 'gelu', True, None) and cfg.kv_heads == cfg.num_heads:
    return 'gpt2'
  if (cfg.positions, cfg.norm, cfg.mlp) == ('rope', 'rmsnorm', 'swiglu') and not (
      cfg.num_experts and cfg.use_bias):
    return ('mixtral' if cfg.num_experts else
            'mistral' if cfg.layer_windows[0] is not None else 'llama')
  raise ConfigError(
      f'model: positions={cfg.positions}, norm={cfg.norm}, mlp={cfg.mlp}, '
      f'use_bias={cfg.use_bias}, window={cfg.window}: no supported Hugging Face architecture '
      'has this combination; GPT-2 is learned/layernorm/gelu with biases, Llama and Mistral '
      'rope/rmsnorm/swiglu')


def config_from_hf(hf: dict, directory: Path) -> ModelConfig:
  where = f'{directory}/config.json'
  model_type = hf.get('model_type')
  if model_type not in ARCHITECTURES:
    raise ConfigError(f'{where}: model_type={model_type!r} is not supported; '
                      f'lm reads {sorted(ARCHITECTURES.values())}')
  try:
    if model_type == 'bert':
      cfg = _bert_config(hf, where)
    elif model_type == 'gpt2':
      act = hf.get('activation_function', 'gelu_new')
      if act not in ('gelu_new', 'gelu_pytorch_tanh'):
        raise ConfigError(f'{where}: activation_function={act!r}; lm\'s GPT-2 MLP is the tanh '
                          'GELU (gelu_new)')
      cfg = ModelConfig(
          vocab_size=hf['vocab_size'], num_layers=hf['n_layer'], d_model=hf['n_embd'],
          num_heads=hf['n_head'], mlp_dim=hf.get('n_inner') or 4 * hf['n_embd'],
          max_len=hf['n_positions'], norm_eps=hf.get('layer_norm_epsilon', 1e-5),
          tie_embeddings=hf.get('tie_word_embeddings', True))
    else:
      rope = hf.get('rope_parameters') or {}
      rope_type = rope.get('rope_type', (hf.get('rope_scaling') or {}).get('rope_type',
                                                                            'default'))
      if rope_type != 'default' or hf.get('hidden_act', 'silu') != 'silu':
        raise ConfigError(f'{where}: rope_type={rope_type!r}, hidden_act='
                          f'{hf.get("hidden_act")!r}; lm supports default RoPE and SiLU')
      if hf.get('attention_bias', False) != hf.get('mlp_bias', False):
        raise ConfigError(f'{where}: attention_bias != mlp_bias; lm has one use_bias')
      heads = hf['num_attention_heads']
      if hf.get('head_dim') not in (None, hf['hidden_size'] // heads):
        raise ConfigError(f'{where}: head_dim={hf["head_dim"]} is not hidden_size / '
                          'num_attention_heads, which lm requires')
      cfg = ModelConfig(
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
  except KeyError as e:
    raise ConfigError(f'{where}: the {model_type} config lacks {e}; the file is incomplete') from e
  validate_model(cfg)
  return cfg


def _bert_config(hf: dict, where: str) -> ModelConfig:
  act = hf.get('hidden_act', 'gelu')
  if act not in BERT_ACTIVATIONS:
    raise ConfigError(f'{where}: hidden_act={act!r}; lm\'s BERT takes {sorted(BERT_ACTIVATIONS)}')
  if hf.get('position_embedding_type', 'absolute') != 'absolute':
    raise ConfigError(f'{where}: position_embedding_type={hf["position_embedding_type"]!r}; '
                      'lm\'s BERT has absolute (learned) positions')
  if not hf.get('tie_word_embeddings', True):
    raise ConfigError(f'{where}: tie_word_embeddings=false; lm\'s MLM decoder is the token '
                      'embedding')
  return ModelConfig(
      vocab_size=hf['vocab_size'], family='encoder', num_layers=hf['num_hidden_layers'],
      d_model=hf['hidden_size'], num_heads=hf['num_attention_heads'],
      mlp_dim=hf['intermediate_size'], max_len=hf.get('max_position_embeddings', 512),
      norm_eps=hf.get('layer_norm_eps', 1e-12), mlp=BERT_ACTIVATIONS[act], post_norm=True,
      num_segments=hf.get('type_vocab_size', 2))


def config_to_hf(cfg: ModelConfig) -> dict:
  model_type = architecture_of(cfg)
  common = {'model_type': model_type, 'architectures': [ARCHITECTURES[model_type]],
            'vocab_size': cfg.vocab_size, 'tie_word_embeddings': cfg.tie_embeddings,
            'torch_dtype': 'float32',
            'bos_token_id': None, 'eos_token_id': None}  # lm's tokenizer holds its special ids
  if model_type == 'bert':
    return {**common, 'num_hidden_layers': cfg.num_layers, 'hidden_size': cfg.d_model,
            'num_attention_heads': cfg.num_heads, 'intermediate_size': cfg.mlp_dim,
            'hidden_act': {v: k for k, v in BERT_ACTIVATIONS.items()
                           if k != 'gelu_pytorch_tanh'}[cfg.mlp],
            'max_position_embeddings': cfg.max_len, 'type_vocab_size': cfg.num_segments,
            'layer_norm_eps': cfg.norm_eps, 'position_embedding_type': 'absolute',
            'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
            'pad_token_id': None}
  if model_type == 'gpt2':
    return {**common, 'n_layer': cfg.num_layers, 'n_embd': cfg.d_model,
            'n_head': cfg.num_heads, 'n_inner': cfg.mlp_dim, 'n_positions': cfg.max_len,
            'layer_norm_epsilon': cfg.norm_eps, 'activation_function': 'gelu_new',
            'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0}
  out = {**common, 'num_hidden_layers': cfg.num_layers, 'hidden_size': cfg.d_model,
         'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.kv_heads,
         'head_dim': cfg.head_dim, 'intermediate_size': cfg.mlp_dim,
         'max_position_embeddings': cfg.max_len, 'hidden_act': 'silu',
         'rms_norm_eps': cfg.norm_eps, 'attention_bias': cfg.use_bias, 'mlp_bias': cfg.use_bias,
         'rope_theta': cfg.rope_theta,
         'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta}}
  if model_type in ('mistral', 'mixtral'):
    out['sliding_window'] = cfg.layer_windows[0]
  if model_type == 'mixtral':
    out.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
               router_aux_loss_coef=cfg.moe_aux_coef)
  return out


# --- weights ------------------------------------------------------------------------------

def _linear_to_hf(kernel: np.ndarray, num_in_dims: int) -> np.ndarray:
  """Our kernel [in..., out...] -> torch Linear weight [out, in]."""
  return kernel.reshape(math.prod(kernel.shape[:num_in_dims]), -1).T


def _norm_to_hf(p: dict, prefix: str, state: dict) -> None:
  state[prefix + '.weight'] = p['scale']
  if 'bias' in p:
    state[prefix + '.bias'] = p['bias']


def _llama_to_hf(cfg: ModelConfig, p: dict) -> dict[str, np.ndarray]:
  state = {'model.embed_tokens.weight': p['embed']['embedding']}
  _norm_to_hf(p['final_norm'], 'model.norm', state)
  if not cfg.tie_embeddings:
    state['lm_head.weight'] = p['head']['kernel'].T
  for i in range(cfg.num_layers):
    b, h = p[f'block_{i}'], f'model.layers.{i}.'
    _norm_to_hf(b['attn_norm'], h + 'input_layernorm', state)
    _norm_to_hf(b['mlp_norm'], h + 'post_attention_layernorm', state)
    for ours, theirs, num_in in (('query', 'q_proj', 1), ('key', 'k_proj', 1),
                                 ('value', 'v_proj', 1), ('out', 'o_proj', 2)):
      state[f'{h}self_attn.{theirs}.weight'] = _linear_to_hf(b['attn'][ours]['kernel'], num_in)
      if cfg.use_bias:
        state[f'{h}self_attn.{theirs}.bias'] = b['attn'][ours]['bias'].reshape(-1)
    if cfg.num_experts:  # Mixtral's fused layout: gate_up [E, 2F, D], down [E, D, F]
      moe = b['moe']
      state[f'{h}mlp.gate.weight'] = moe['router'].T
      state[f'{h}mlp.experts.gate_up_proj'] = np.concatenate(
          [moe['gate'], moe['up']], axis=2).transpose(0, 2, 1)
      state[f'{h}mlp.experts.down_proj'] = moe['down'].transpose(0, 2, 1)
      continue
    for name in ('gate', 'up', 'down'):
      state[f'{h}mlp.{name}_proj.weight'] = b['mlp'][name]['kernel'].T
      if cfg.use_bias:
        state[f'{h}mlp.{name}_proj.bias'] = b['mlp'][name]['bias']
  return state


# (ours, theirs) for BERT; a block's `attn_norm` follows attention (post-norm).
BERT_BLOCK = (('attn/query', 'attention.self.query', 1), ('attn/key', 'attention.self.key', 1),
              ('attn/value', 'attention.self.value', 1), ('attn/out', 'attention.output.dense', 2),
              ('mlp/up', 'intermediate.dense', 1), ('mlp/down', 'output.dense', 1))
BERT_NORMS = (('attn_norm', 'attention.output.LayerNorm'), ('mlp_norm', 'output.LayerNorm'))
BERT_TOP = (('pooler', 'bert.pooler.dense'), ('mlm_transform', 'cls.predictions.transform.dense'),
            ('nsp', 'cls.seq_relationship'))


def _at(tree: dict, path: str):
  for key in path.split('/'):
    tree = tree[key]
  return tree


def _bert_to_hf(cfg: ModelConfig, p: dict) -> dict[str, np.ndarray]:
  e = 'bert.embeddings.'
  state = {e + 'word_embeddings.weight': p['embed']['embedding'],
           e + 'position_embeddings.weight': p['pos_embed']['embedding'],
           e + 'token_type_embeddings.weight': p['segment_embed']['embedding'],
           'cls.predictions.bias': p['mlm_bias'], 'cls.predictions.decoder.bias': p['mlm_bias']}
  _norm_to_hf(p['embed_norm'], e + 'LayerNorm', state)
  _norm_to_hf(p['mlm_norm'], 'cls.predictions.transform.LayerNorm', state)
  for ours, theirs in BERT_TOP:
    state[theirs + '.weight'], state[theirs + '.bias'] = p[ours]['kernel'].T, p[ours]['bias']
  for i in range(cfg.num_layers):
    b, h = p[f'block_{i}'], f'bert.encoder.layer.{i}.'
    for ours, theirs, num_in in BERT_BLOCK:
      state[f'{h}{theirs}.weight'] = _linear_to_hf(_at(b, ours)['kernel'], num_in)
      state[f'{h}{theirs}.bias'] = _at(b, ours)['bias'].reshape(-1)
    for ours, theirs in BERT_NORMS:
      _norm_to_hf(b[ours], h + theirs, state)
  return state


def _bert_from_hf(cfg: ModelConfig, tensors: dict, directory: Path) -> dict:
  get = _State(tensors, directory)
  e, d, heads, dh = 'bert.embeddings.', cfg.d_model, cfg.num_heads, cfg.head_dim
  shapes = {'attn/query': (d, heads, dh), 'attn/key': (d, heads, dh),
            'attn/value': (d, heads, dh), 'attn/out': (heads, dh, d)}
  p = {'embed': {'embedding': get(e + 'word_embeddings.weight')},
       'pos_embed': {'embedding': get(e + 'position_embeddings.weight')},
       'segment_embed': {'embedding': get(e + 'token_type_embeddings.weight')},
       'embed_norm': _norm_from_hf(get, e + 'LayerNorm', cfg),
       'mlm_norm': _norm_from_hf(get, 'cls.predictions.transform.LayerNorm', cfg),
       'mlm_bias': get('cls.predictions.bias')}
  for ours, theirs in BERT_TOP:
    p[ours] = {'kernel': get(theirs + '.weight').T, 'bias': get(theirs + '.bias')}
  for i in range(cfg.num_layers):
    h, block = f'bert.encoder.layer.{i}.', {'attn': {}, 'mlp': {}}
    for ours, theirs, _ in BERT_BLOCK:
      kernel, bias = get(f'{h}{theirs}.weight').T, get(f'{h}{theirs}.bias')
      if ours in shapes:
        kernel = _reshape(kernel, shapes[ours], h + theirs, directory)
        bias = _reshape(bias, shapes[ours][1:] if ours != 'attn/out' else (d,),
                        f'{h}{theirs}.bias', directory)
      group, name = ours.split('/')
      block[group][name] = {'kernel': kernel, 'bias': bias}
    for ours, theirs in BERT_NORMS:
      block[ours] = _norm_from_hf(get, h + theirs, cfg)
    p[f'block_{i}'] = block
  return p


def _gpt2_to_hf(cfg: ModelConfig, p: dict) -> dict[str, np.ndarray]:
  """GPT-2's Conv1D weights are [in, out]; query, key and value are one fused c_attn."""
  d = cfg.d_model
  state = {'transformer.wte.weight': p['embed']['embedding'],
           'transformer.wpe.weight': p['pos_embed']['embedding']}
  _norm_to_hf(p['final_norm'], 'transformer.ln_f', state)
  if not cfg.tie_embeddings:
    state['lm_head.weight'] = p['head']['kernel'].T
  for i in range(cfg.num_layers):
    b, h = p[f'block_{i}'], f'transformer.h.{i}.'
    att = b['attn']
    state[h + 'attn.c_attn.weight'] = np.concatenate(
        [att[n]['kernel'].reshape(d, d) for n in ('query', 'key', 'value')], axis=1)
    state[h + 'attn.c_attn.bias'] = np.concatenate(
        [att[n]['bias'].reshape(d) for n in ('query', 'key', 'value')])
    state[h + 'attn.c_proj.weight'] = att['out']['kernel'].reshape(d, d)
    state[h + 'attn.c_proj.bias'] = att['out']['bias']
    _norm_to_hf(b['attn_norm'], h + 'ln_1', state)
    _norm_to_hf(b['mlp_norm'], h + 'ln_2', state)
    for ours, theirs in (('up', 'c_fc'), ('down', 'c_proj')):
      state[f'{h}mlp.{theirs}.weight'] = b['mlp'][ours]['kernel']
      state[f'{h}mlp.{theirs}.bias'] = b['mlp'][ours]['bias']
  return state


class _State:
  """The tensors of a checkpoint, taken by name; a missing one is a ConfigError."""

  def __init__(self, tensors: dict[str, np.ndarray], directory: Path):
    self.tensors, self.directory, self.used = tensors, directory, set()

  def __call__(self, name: str) -> np.ndarray:
    if name not in self.tensors:
      raise ConfigError(f'{self.directory}: the weights lack {name!r}, which its config.json '
                        'implies; the checkpoint does not match its config')
    self.used.add(name)
    return self.tensors[name]


def _norm_from_hf(get: _State, prefix: str, cfg: ModelConfig) -> dict:
  out = {'scale': get(prefix + '.weight')}
  if cfg.norm == 'layernorm':
    out['bias'] = get(prefix + '.bias')
  return out


def _llama_from_hf(cfg: ModelConfig, tensors: dict, directory: Path) -> dict:
  get = _State(tensors, directory)
  d, dh = cfg.d_model, cfg.head_dim
  shapes = {'query': (d, cfg.num_heads, dh), 'key': (d, cfg.kv_heads, dh),
            'value': (d, cfg.kv_heads, dh), 'out': (cfg.num_heads, dh, d)}
  p = {'embed': {'embedding': get('model.embed_tokens.weight')},
       'final_norm': _norm_from_hf(get, 'model.norm', cfg)}
  if not cfg.tie_embeddings:
    p['head'] = {'kernel': get('lm_head.weight').T}
  for i in range(cfg.num_layers):
    h = f'model.layers.{i}.'
    attn = {}
    for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj'),
                         ('out', 'o_proj')):
      weight = get(f'{h}self_attn.{theirs}.weight')
      attn[ours] = {'kernel': _reshape(weight.T, shapes[ours], f'{h}self_attn.{theirs}', directory)}
      if cfg.use_bias:
        bias = get(f'{h}self_attn.{theirs}.bias')
        attn[ours]['bias'] = _reshape(bias, shapes[ours][1:] if ours != 'out' else (d,),
                                      f'{h}self_attn.{theirs}.bias', directory)
    p[f'block_{i}'] = {'attn_norm': _norm_from_hf(get, h + 'input_layernorm', cfg),
                       'mlp_norm': _norm_from_hf(get, h + 'post_attention_layernorm', cfg),
                       'attn': attn}
    if cfg.num_experts:
      p[f'block_{i}']['moe'] = _experts_from_hf(get, h, cfg)
      continue
    mlp = {}
    for name in ('gate', 'up', 'down'):
      mlp[name] = {'kernel': get(f'{h}mlp.{name}_proj.weight').T}
      if cfg.use_bias:
        mlp[name]['bias'] = get(f'{h}mlp.{name}_proj.bias')
    p[f'block_{i}']['mlp'] = mlp
  return p


def _experts_from_hf(get: _State, h: str, cfg: ModelConfig) -> dict:
  """Mixtral's experts: the fused layout of transformers 5, or the per-expert w1 (gate), w3
  (up), w2 (down) of checkpoints written before it."""
  f = cfg.mlp_dim
  if f'{h}mlp.experts.gate_up_proj' in get.tensors:
    gate_up_ExDx2F = get(f'{h}mlp.experts.gate_up_proj').transpose(0, 2, 1)
    return {'router': get(f'{h}mlp.gate.weight').T, 'gate': gate_up_ExDx2F[..., :f],
            'up': gate_up_ExDx2F[..., f:],
            'down': get(f'{h}mlp.experts.down_proj').transpose(0, 2, 1)}
  legacy = f'{h}block_sparse_moe.'
  stack = lambda w: np.stack([get(f'{legacy}experts.{e}.{w}.weight').T
                              for e in range(cfg.num_experts)])
  return {'router': get(legacy + 'gate.weight').T, 'gate': stack('w1'), 'up': stack('w3'),
          'down': stack('w2')}


def _gpt2_from_hf(cfg: ModelConfig, tensors: dict, directory: Path) -> dict:
  # Some GPT-2 checkpoints name tensors without the `transformer.` prefix.
  tensors = {(k if k.startswith(('transformer.', 'lm_head.')) else 'transformer.' + k): v
             for k, v in tensors.items()}
  get = _State(tensors, directory)
  d, heads, dh = cfg.d_model, cfg.num_heads, cfg.head_dim
  p = {'embed': {'embedding': get('transformer.wte.weight')},
       'pos_embed': {'embedding': get('transformer.wpe.weight')},
       'final_norm': _norm_from_hf(get, 'transformer.ln_f', cfg)}
  if not cfg.tie_embeddings:
    p['head'] = {'kernel': get('lm_head.weight').T}
  for i in range(cfg.num_layers):
    h = f'transformer.h.{i}.'
    qkv_w = _reshape(get(h + 'attn.c_attn.weight'), (d, 3 * d), h + 'attn.c_attn', directory)
    qkv_b = _reshape(get(h + 'attn.c_attn.bias'), (3 * d,), h + 'attn.c_attn.bias', directory)
    attn = {n: {'kernel': qkv_w[:, j * d:(j + 1) * d].reshape(d, heads, dh),
                'bias': qkv_b[j * d:(j + 1) * d].reshape(heads, dh)}
            for j, n in enumerate(('query', 'key', 'value'))}
    attn['out'] = {'kernel': _reshape(get(h + 'attn.c_proj.weight'), (heads, dh, d),
                                      h + 'attn.c_proj', directory),
                   'bias': get(h + 'attn.c_proj.bias')}
    mlp = {ours: {'kernel': get(f'{h}mlp.{theirs}.weight'), 'bias': get(f'{h}mlp.{theirs}.bias')}
           for ours, theirs in (('up', 'c_fc'), ('down', 'c_proj'))}
    p[f'block_{i}'] = {'attn_norm': _norm_from_hf(get, h + 'ln_1', cfg),
                       'mlp_norm': _norm_from_hf(get, h + 'ln_2', cfg),
                       'attn': attn, 'mlp': mlp}
  return p


def _reshape(x: np.ndarray, shape: tuple[int, ...], name: str, directory: Path) -> np.ndarray:
  if x.size != math.prod(shape):
    raise ConfigError(f'{directory}: {name} has shape {x.shape}, but config.json implies '
                      f'{math.prod(shape)} values ({shape}); the checkpoint does not match its '
                      'config')
  return x.reshape(shape)


def _check_shapes(cfg: ModelConfig, params: dict, directory: Path) -> dict:
  """Every tensor has the shape the model built from `cfg` expects."""
  model = models.build(cfg)
  expected = nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 1), np.int32)))['params'])
  flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  flat_given = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, want in flat_expected.items():
    got = flat_given.get(path)
    name = jax.tree_util.keystr(path)
    if got is None or tuple(got.shape) != tuple(want.shape):
      raise ConfigError(f'{directory}: weight {name} has shape '
                        f'{None if got is None else tuple(got.shape)}, but config.json implies '
                        f'{tuple(want.shape)}; the checkpoint does not match its config')
  return params


def _read_config(directory: Path) -> dict:
  path = directory / 'config.json'
  if not path.is_file():
    raise ConfigError(f'{directory}: no config.json; give a Hugging Face model directory '
                      '(config.json plus model.safetensors)')
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ConfigError(f'{path}: not valid JSON ({e})') from e


def _read_weights(directory: Path) -> dict[str, np.ndarray]:
  """model.safetensors, or the shards its index names; float32 numpy arrays."""
  from safetensors.flax import load_file
  index = directory / (WEIGHTS + '.index.json')
  files = (sorted(set(json.loads(index.read_text())['weight_map'].values()))
           if index.is_file() else [WEIGHTS])
  tensors = {}
  for name in files:
    if not (directory / name).is_file():
      raise ConfigError(f'{directory}: no {name}; lm reads safetensors weights (save with '
                        'safe_serialization=True)')
    tensors.update({k: np.asarray(v, np.float32) for k, v in load_file(directory / name).items()})
  return tensors
