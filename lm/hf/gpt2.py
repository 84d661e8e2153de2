"""GPT2LMHeadModel: learned positions, LayerNorm, the tanh GELU, biases; Conv1D weights [in, out]
and query, key and value fused in one c_attn."""
from __future__ import annotations

from lm.errors import ConfigError
from lm.models import DecoderConfig
from lm.hf.convert import Rule, concat, conv1d, flat, linear, same

MODEL_TYPES = {'gpt2': 'GPT2LMHeadModel'}
REQUIRES = 'GPT-2 is learned positions, layernorm, gelu, biases, multi-head, no window'
CONFIG = DecoderConfig  # the lm family config whose models this architecture maps
IGNORED = (r'\.attn\.(masked_)?bias$',)  # causal-mask buffers of older checkpoints


def fits(cfg: DecoderConfig) -> str | None:
  ok = (all(kind.attends for kind in cfg.kinds), cfg.positions, cfg.norm, cfg.mlp,
        cfg.use_bias, cfg.window, cfg.num_experts) == (
      True, 'learned', 'layernorm', 'gelu', True, None, 0)
  return ('gpt2' if ok and cfg.kv_heads == cfg.num_heads and cfg.mlp_dim
          and not cfg.unmapped_options else None)


def config_from_hf(hf: dict, where: str) -> DecoderConfig:
  act = hf.get('activation_function', 'gelu_new')
  if act not in ('gelu_new', 'gelu_pytorch_tanh'):
    raise ConfigError(f'{where}: activation_function={act!r}; lm\'s GPT-2 MLP is the tanh '
                      'GELU (gelu_new)')
  return DecoderConfig(
      vocab_size=hf['vocab_size'], num_layers=hf['n_layer'], d_model=hf['n_embd'],
      num_heads=hf['n_head'], mlp_dim=hf.get('n_inner') or 4 * hf['n_embd'],
      max_len=hf['n_positions'], norm_eps=hf.get('layer_norm_epsilon', 1e-5),
      tie_embeddings=hf.get('tie_word_embeddings', True))


def config_to_hf(cfg: DecoderConfig) -> dict:
  return {'tie_word_embeddings': cfg.tie_embeddings,
          'n_layer': cfg.num_layers, 'n_embd': cfg.d_model, 'n_head': cfg.num_heads,
          'n_inner': cfg.mlp_dim, 'n_positions': cfg.max_len, 'layer_norm_epsilon': cfg.norm_eps,
          'activation_function': 'gelu_new', 'resid_pdrop': 0.0, 'embd_pdrop': 0.0,
          'attn_pdrop': 0.0}


def normalize(tensors: dict, cfg) -> dict:
  """Some GPT-2 checkpoints name their tensors without the `transformer.` prefix."""
  return {(k if k.startswith(('transformer.', 'lm_head.')) else 'transformer.' + k): v
          for k, v in tensors.items()}


def norm(ours: str, theirs: str) -> list[Rule]:
  return [same(ours + '/scale', theirs + '.weight'), same(ours + '/bias', theirs + '.bias')]


def rules(cfg: DecoderConfig) -> list[Rule]:
  t = 'transformer.'
  out = [same('embed/embedding', t + 'wte.weight'), same('pos_embed/embedding', t + 'wpe.weight'),
         *norm('final_norm', t + 'ln_f')]
  if not cfg.tie_embeddings:
    out.append(linear('head/kernel', 'lm_head.weight'))
  for i in range(cfg.num_layers):
    b, h = f'block_{i}/', f'{t}h.{i}.'
    qkv = [f'{b}attn/{n}' for n in ('query', 'key', 'value')]
    out += [concat([q + '/kernel' for q in qkv], h + 'attn.c_attn.weight', axis=1),
            concat([q + '/bias' for q in qkv], h + 'attn.c_attn.bias', axis=0),
            conv1d(b + 'attn/out/kernel', h + 'attn.c_proj.weight', num_in=2),
            flat(b + 'attn/out/bias', h + 'attn.c_proj.bias'),
            *norm(b + 'attn_norm', h + 'ln_1'), *norm(b + 'mlp_norm', h + 'ln_2'),
            conv1d(b + 'mlp/up/kernel', h + 'mlp.c_fc.weight'),
            same(b + 'mlp/up/bias', h + 'mlp.c_fc.bias'),
            conv1d(b + 'mlp/down/kernel', h + 'mlp.c_proj.weight'),
            same(b + 'mlp/down/bias', h + 'mlp.c_proj.bias')]
  return out
