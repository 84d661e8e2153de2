"""The encoder-decoder: an encoder (bidirectional self-attention, MLP) reads the input, a decoder
(causal self-attention, cross-attention to the encoder's output, MLP) produces the output token
by token. EncDecConfig makes it

- T5 (the defaults): relative position bias (T5's buckets; bidirectional in the encoder, causal
  in the decoder; one table a stack, shared by its layers), RMS norm, pre-norm, no biases, no
  1 / sqrt(Dh) on the attention logits, ReLU (mlp='relu', T5) or gated GELU (mlp='geglu', T5
  v1.1) MLPs, a head tied to the shared embedding (its input times d_model^-0.5) or untied;
- the original transformer (Vaswani et al. 2017): positions='sinusoidal',
  scale_embeddings=True (embeddings times sqrt(d_model), a tied head unscaled), post_norm=True,
  norm='layernorm', use_bias=True, mlp='relu', scaled_attention=True.

  logits_BxTxV = EncDec(cfg).apply({'params': params}, tokens_BxS, decoder_tokens_BxT,
                                   padding_mask=mask_BxS)

The decoder's input is the target shifted right behind the start token (model.decoder_start_id:
T5's pad, id 0). Decoding (`Decoding`) runs
the encoder once and keeps each decoder layer's cross-attention keys and values.
Parameters: embed (shared), encoder/{position_bias, block_i/{attn_norm, attn, mlp_norm, mlp},
final_norm}, decoder/{position_bias, block_i/{self_norm, self_attn, cross_norm, cross_attn,
mlp_norm, mlp}, final_norm}, head (untied). Post-norm stacks have no final_norm.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lm.errors import require
from lm.models.base import ModelConfig
from lm.models.layers import attention, common, kv_cache, mlp

ACTIVATION = ('batch', 'length', 'embed')


@dataclasses.dataclass(frozen=True)
class EncDecConfig(ModelConfig):
  """An encoder-decoder: the common keys (lm.config.ModelConfig; num_layers is the encoder's
  depth, max_len bounds both sequences) with T5's defaults, and these."""
  POSITIONS: ClassVar[tuple[str, ...]] = ('relative', 'sinusoidal')
  family: str = dataclasses.field(default='encdec', init=False)
  positions: str = 'relative'  # relative (T5's bias) | sinusoidal (the original transformer)
  norm: str = 'rmsnorm'
  norm_eps: float = 1e-6
  mlp: str = 'relu'  # relu (T5, the original) | geglu (T5 v1.1) | gelu | gelu_exact | swiglu
  use_bias: bool = False
  num_decoder_layers: int = 0  # 0: num_layers
  relative_buckets: int = 32  # relative positions: buckets of key - query offsets
  relative_max_distance: int = 128  # offsets beyond it share the last bucket
  scaled_attention: bool = False  # logits times 1 / sqrt(Dh) (the original; T5 has none)
  post_norm: bool = False  # norm after each residual sum (the original); False: pre-norm (T5)
  tie_embeddings: bool = True  # the head is the shared embedding (T5, the original)
  scale_embeddings: bool = False  # True: embeddings times sqrt(d_model), a tied head as is
                                  # (the original); False: a tied head's input times
                                  # d_model^-0.5 (T5)
  decoder_start_id: int = 0  # the decoder's first input (T5's pad, id 0)

  @property
  def decoder_layers(self) -> int:
    return self.num_decoder_layers or self.num_layers


def validate(m: EncDecConfig, seq_len: int | None) -> None:
  """The encoder-decoder's own keys; errors name field, value, fix."""
  require(m.num_decoder_layers >= 0, 'model.num_decoder_layers', m.num_decoder_layers,
          'give the decoder depth, or 0 for model.num_layers')
  require(m.kv_heads == m.num_heads, 'model.num_kv_heads', m.num_kv_heads,
          'the encoder-decoder is multi-head: give 0 (num_heads)')
  require(m.mlp_dim > 0, 'model.mlp_dim', m.mlp_dim, 'the encoder-decoder has MLPs: give > 0')
  require(0 <= m.decoder_start_id < m.vocab_size, 'model.decoder_start_id', m.decoder_start_id,
          f'must be an id of the vocabulary [0, {m.vocab_size}), e.g. 0 (T5)')
  if m.positions == 'relative':
    require(m.relative_buckets >= 4 and m.relative_buckets % 2 == 0, 'model.relative_buckets',
            m.relative_buckets, 'give an even number >= 4, e.g. 32 (T5)')
    require(m.relative_max_distance > m.relative_buckets // 2, 'model.relative_max_distance',
            m.relative_max_distance,
            f'must exceed the exact buckets relative_buckets / 2 = {m.relative_buckets // 2}, '
            'e.g. 128 (T5)')
  require(seq_len is None or seq_len <= m.max_len, 'data.seq_len', seq_len,
          f'exceeds model.max_len={m.max_len}; lower data.seq_len or raise model.max_len')


def _dtype(cfg: EncDecConfig):
  return jnp.dtype(cfg.dtype)


def _norm(cfg: EncDecConfig, name: str) -> nn.Module:
  return common.norm(cfg.norm, cfg.norm_eps, _dtype(cfg), name)


def _out_std(cfg: EncDecConfig, layers: int) -> float:
  return common.INIT_STD if cfg.post_norm else common.INIT_STD / math.sqrt(2 * layers)


def _mlp(cfg: EncDecConfig, out_std: float) -> nn.Module:
  return mlp.Mlp(cfg.mlp, cfg.mlp_dim, cfg.use_bias, _dtype(cfg), out_std, name='mlp')


def _position_bias(cfg: EncDecConfig, bidirectional: bool) -> nn.Module | None:
  if cfg.positions != 'relative':
    return None
  return attention.RelativePositionBias(cfg.relative_buckets, cfg.relative_max_distance,
                                        cfg.num_heads, bidirectional, name='position_bias')


class EncoderBlock(nn.Module):
  """Bidirectional self-attention (with the stack's position bias), then the MLP."""
  cfg: EncDecConfig

  @nn.compact
  def __call__(self, x_BxSxD: jax.Array, valid_BxS: jax.Array,
               bias_HxSxS: jax.Array | None) -> jax.Array:
    cfg = self.cfg
    out_std = _out_std(cfg, cfg.num_layers)
    attn = attention.Attention(cfg.num_heads, cfg.num_heads, cfg.head_dim, cfg.use_bias, 0.0,
                               None, _dtype(cfg), out_std, causal=False,
                               scaled=cfg.scaled_attention, name='attn')
    sublayers = (('attn_norm',
                  lambda h: attn(h, key_valid_BxT=valid_BxS, bias_HxTxS=bias_HxSxS)[0]),
                 ('mlp_norm', _mlp(cfg, out_std)))
    for norm_name, sublayer in sublayers:
      x_BxSxD = nn.with_logical_constraint(
          common.residual(x_BxSxD, sublayer, _norm(cfg, norm_name), cfg.post_norm), ACTIVATION)
    return x_BxSxD


class DecoderBlock(nn.Module):
  """Causal self-attention (with the stack's position bias; in decoding over a KV cache), then
  cross-attention to the encoder's output (keys and values from `cross_keys_values`), then the
  MLP."""
  cfg: EncDecConfig

  def setup(self):
    cfg = self.cfg
    out_std = _out_std(cfg, cfg.decoder_layers)
    self.self_norm, self.cross_norm, self.mlp_norm = (
        _norm(cfg, name) for name in ('self_norm', 'cross_norm', 'mlp_norm'))
    self.self_attn = attention.Attention(cfg.num_heads, cfg.num_heads, cfg.head_dim,
                                         cfg.use_bias, 0.0, None, _dtype(cfg), out_std,
                                         causal=True, scaled=cfg.scaled_attention)
    self.cross_attn = attention.CrossAttention(cfg.num_heads, cfg.head_dim, cfg.d_model,
                                               cfg.use_bias, _dtype(cfg), out_std,
                                               scaled=cfg.scaled_attention)
    self.mlp = _mlp(cfg, out_std)

  def cross_keys_values(self, memory_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.cross_attn.keys_values(memory_BxSxD)

  def __call__(self, x_BxTxD: jax.Array, cross_k: jax.Array, cross_v: jax.Array,
               memory_valid_BxS: jax.Array, bias_HxTxS: jax.Array | None,
               cache: kv_cache.KVCache | None = None, index: jax.Array | int = 0):
    """x_BxTxD -> y_BxTxD; with a cache (decoding, T = 1), also the updated cache."""
    post = self.cfg.post_norm
    new_cache = []

    def self_attention(h_BxTxD):
      if cache is None:
        return self.self_attn(h_BxTxD, bias_HxTxS=bias_HxTxS)[0]
      y_BxTxD, updated = self.self_attn(h_BxTxD, cache, index=index, bias_HxTxS=bias_HxTxS)
      new_cache.append(updated)
      return y_BxTxD
    cross = lambda h_BxTxD: self.cross_attn.attend(h_BxTxD, cross_k, cross_v, memory_valid_BxS)
    for norm, sublayer in ((self.self_norm, self_attention), (self.cross_norm, cross),
                           (self.mlp_norm, self.mlp)):
      x_BxTxD = nn.with_logical_constraint(common.residual(x_BxTxD, sublayer, norm, post),
                                           ACTIVATION)
    return x_BxTxD if cache is None else (x_BxTxD, new_cache[0])


def _block(cls, cfg: EncDecConfig, decoding: bool):
  """cls, rematerialised as cfg.remat asks when training."""
  if cfg.remat == 'none' or decoding:
    return cls
  return nn.remat(cls, policy=common.REMAT_POLICIES[cfg.remat])


class TextEncoder(nn.Module):
  """Embedded inputs x_BxSxD (valid_BxS False at padding) -> the memory, memory_BxSxD."""
  cfg: EncDecConfig

  @nn.compact
  def __call__(self, x_BxSxD: jax.Array, valid_BxS: jax.Array) -> jax.Array:
    cfg = self.cfg
    bias = _position_bias(cfg, bidirectional=True)
    columns_S = jnp.arange(x_BxSxD.shape[1])
    bias_HxSxS = None if bias is None else bias(columns_S, columns_S)
    block = _block(EncoderBlock, cfg, decoding=False)
    for i in range(cfg.num_layers):
      x_BxSxD = block(cfg, name=f'block_{i}')(x_BxSxD, valid_BxS, bias_HxSxS)
    return x_BxSxD if cfg.post_norm else _norm(cfg, 'final_norm')(x_BxSxD)


class TextDecoder(nn.Module):
  """Embedded decoder inputs and the encoder's memory -> the final hidden states."""
  cfg: EncDecConfig
  decoding: bool = False

  def setup(self):
    cfg = self.cfg
    self.position_bias = _position_bias(cfg, bidirectional=False)
    block = _block(DecoderBlock, cfg, self.decoding)
    self.blocks = [block(cfg, name=f'block_{i}') for i in range(cfg.decoder_layers)]
    if not cfg.post_norm:
      self.final_norm = _norm(cfg, 'final_norm')

  def _bias(self, queries_T: jax.Array, keys_S: jax.Array) -> jax.Array | None:
    return None if self.position_bias is None else self.position_bias(queries_T, keys_S)

  def _final(self, x_BxTxD: jax.Array) -> jax.Array:
    return x_BxTxD if self.cfg.post_norm else self.final_norm(x_BxTxD)

  def cross_keys_values(self, memory_BxSxD: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """Each layer's cross-attention (k_BxSxHxDh, v_BxSxHxDh) of the memory."""
    return [block.cross_keys_values(memory_BxSxD) for block in self.blocks]

  def __call__(self, x_BxTxD: jax.Array, memory_BxSxD: jax.Array,
               memory_valid_BxS: jax.Array) -> jax.Array:
    columns_T = jnp.arange(x_BxTxD.shape[1])
    bias_HxTxT = self._bias(columns_T, columns_T)
    for block in self.blocks:
      x_BxTxD = block(x_BxTxD, *block.cross_keys_values(memory_BxSxD), memory_valid_BxS,
                      bias_HxTxT)
    return self._final(x_BxTxD)

  def step(self, x_Bx1xD: jax.Array, layers: list, memory_valid_BxS: jax.Array,
           index: jax.Array) -> tuple[jax.Array, list]:
    """One decoder column (`index`) over each layer's DecoderLayerState."""
    slots = layers[0].self_kv.pos.shape[-1]  # slot p holds column p (no window)
    bias_Hx1xS = self._bias(index[None], jnp.arange(slots))
    new = []
    for block, layer in zip(self.blocks, layers):
      x_Bx1xD, self_kv = block(x_Bx1xD, jnp.swapaxes(layer.cross_k, 1, 2),
                               jnp.swapaxes(layer.cross_v, 1, 2), memory_valid_BxS,
                               bias_Hx1xS, layer.self_kv, index)
      new.append(layer.replace(self_kv=self_kv))
    return self._final(x_Bx1xD), new


@flax.struct.dataclass
class DecoderLayerState:
  """One decoder layer's decoding state: its self-attention KV cache and its cross-attention
  keys and values of the encoder's output, head-major [B, H, S, Dh]: the layout a decode step's
  attention multiplies in, so that no step transposes them (on CPU a step in [B, S, H, Dh]
  spent about 40% of its time on those transposes: experiments/README.md, Encoder-decoder)."""
  self_kv: kv_cache.KVCache
  cross_k: jax.Array
  cross_v: jax.Array

  def take_rows(self, rows_N: jax.Array, batch: int) -> DecoderLayerState:
    return DecoderLayerState(self.self_kv.take_rows(rows_N, batch), self.cross_k[rows_N],
                             self.cross_v[rows_N])

  def reorder(self, parent_PxR: jax.Array, index: jax.Array) -> DecoderLayerState:
    """The beams of a prompt share its encoder output: only the self-attention cache moves."""
    return self.replace(self_kv=self.self_kv.reorder(parent_PxR, index))


class EncDec(nn.Module):
  """(tokens_BxS, decoder_tokens_BxT, padding_mask_BxS) -> logits_BxTxV (float32); see the
  module docstring. Without decoder tokens, the decoder reads the start token alone (the
  logits of the first output token)."""
  cfg: EncDecConfig
  decoding: bool = False

  def setup(self):
    cfg = self.cfg
    # Unit-scale embeddings either way: T5's of std 1, or the original's of std d_model^-0.5
    # times sqrt(d_model); so a tied head's logits start near unit scale too.
    std = cfg.d_model ** -0.5 if cfg.scale_embeddings else 1.0
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=_dtype(cfg),
                          embedding_init=common.normal(('vocab', 'embed'), std))
    self.encoder = TextEncoder(cfg)
    self.decoder = TextDecoder(cfg, self.decoding)
    if not cfg.tie_embeddings:
      self.head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=_dtype(cfg),
                           kernel_init=common.normal(('embed', 'vocab')))

  def embed_tokens(self, tokens_BxT: jax.Array, positions_BxT: jax.Array) -> jax.Array:
    x_BxTxD = self.embed(tokens_BxT)
    if self.cfg.scale_embeddings:
      x_BxTxD = x_BxTxD * math.sqrt(self.cfg.d_model)
    if self.cfg.positions == 'sinusoidal':
      x_BxTxD = x_BxTxD + common.sinusoids(positions_BxT, self.cfg.d_model).astype(x_BxTxD.dtype)
    return nn.with_logical_constraint(x_BxTxD, ACTIVATION)

  def logits(self, h_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    if cfg.tie_embeddings:
      logits_BxTxV = self.embed.attend(h_BxTxD if cfg.scale_embeddings
                                       else h_BxTxD * cfg.d_model ** -0.5)
    else:
      logits_BxTxV = self.head(h_BxTxD)
    return nn.with_logical_constraint(logits_BxTxV.astype(jnp.float32),
                                      ('batch', 'length', 'vocab'))

  def encode(self, tokens_BxS: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
    """The memory, memory_BxSxD. Padding (padding_mask False, left or right) is never
    attended, and a sinusoidal position counts the real tokens before it."""
    valid_BxS = (jnp.ones(tokens_BxS.shape, bool) if padding_mask is None
                 else padding_mask.astype(bool))
    positions_BxS = jnp.maximum(jnp.cumsum(valid_BxS, axis=1) - 1, 0)
    return self.encoder(self.embed_tokens(tokens_BxS, positions_BxS), valid_BxS)

  def __call__(self, tokens_BxS: jax.Array, decoder_tokens_BxT: jax.Array | None = None,
               padding_mask: jax.Array | None = None) -> jax.Array:
    valid_BxS = (jnp.ones(tokens_BxS.shape, bool) if padding_mask is None
                 else padding_mask.astype(bool))
    memory_BxSxD = self.encode(tokens_BxS, valid_BxS)
    if decoder_tokens_BxT is None:
      decoder_tokens_BxT = jnp.full((tokens_BxS.shape[0], 1), self.cfg.decoder_start_id,
                                    jnp.int32)
    columns_T = jnp.arange(decoder_tokens_BxT.shape[1])[None]
    x_BxTxD = self.embed_tokens(decoder_tokens_BxT, columns_T)
    return self.logits(self.decoder(x_BxTxD, memory_BxSxD, valid_BxS))

  def prefill(self, tokens_BxS: jax.Array, valid_BxS: jax.Array, slots: int
              ) -> tuple[jax.Array, dict]:
    """Runs the encoder, keeps each decoder layer's cross keys and values, and decodes the
    start token: the logits of the first output token and the state, for `slots` decoder
    columns (the start token and the new tokens)."""
    batch = tokens_BxS.shape[0]
    memory_BxSxD = self.encode(tokens_BxS, valid_BxS)
    heads = ('batch', 'heads', 'length', 'head_dim')  # on a mesh: the attention's layout
    head_major = lambda x_BxSxHxDh: nn.with_logical_constraint(jnp.swapaxes(x_BxSxHxDh, 1, 2),
                                                               heads)
    layers = [DecoderLayerState(
        kv_cache.init_kv_cache(batch, slots, self.cfg.num_heads, self.cfg.head_dim,
                               dtype=_dtype(self.cfg)), head_major(k), head_major(v))
              for k, v in self.decoder.cross_keys_values(memory_BxSxD)]
    state = {'index': jnp.zeros((), jnp.int32), 'memory_valid': valid_BxS, 'layers': layers}
    return self.step(jnp.full((batch,), self.cfg.decoder_start_id, jnp.int32), state)

  def step(self, token_B: jax.Array, state: dict) -> tuple[jax.Array, dict]:
    """One token per row in decoder column state['index']: logits_BxV and the state."""
    index = state['index']
    x_Bx1xD = self.embed_tokens(token_B[:, None], jnp.broadcast_to(index, (token_B.shape[0], 1)))
    h_Bx1xD, layers = self.decoder.step(x_Bx1xD, state['layers'], state['memory_valid'], index)
    return self.logits(h_Bx1xD)[:, 0], {**state, 'index': index + 1, 'layers': layers}


# --- the decoding interface ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Decoding:
  """The decoding interface of the encoder-decoder (lm.models.decoding): the prompt is the
  encoder's input and the new tokens the decoder's, from the start token. The state is a dict:
  'index' (the next decoder column), 'memory_valid' [B, S] (the prompt's real tokens) and
  'layers', a DecoderLayerState a decoder layer (its self-attention KVCache, its cross keys and
  values)."""
  cfg: EncDecConfig

  @property
  def max_len(self) -> int:
    """The longest sequence: a prompt holds at most this many tokens, and the start token and
    the new tokens as many."""
    return self.cfg.max_len

  def prompt_room(self, max_new_tokens: int) -> int:
    """The longest prompt that leaves room for max_new_tokens: the encoder's max_len."""
    return self.cfg.max_len

  def new_tokens_room(self, prompt_len: int) -> int:
    """The most new tokens: the decoder's max_len, less its start token."""
    return self.cfg.max_len - 1

  def prepare(self, params, rows: int):
    """params as they are (no device-specific layout)."""
    return params

  def _model(self) -> EncDec:
    return EncDec(self.cfg, decoding=True)

  def prefill(self, params, prompts_BxT: jax.Array, lengths_B: jax.Array | None,
              max_len: int) -> tuple[jax.Array, dict]:
    """Row b's prompt is the last lengths_B[b] columns of prompts_BxT (left-padded); the
    decoder gets max_len - T + 1 columns (its start token and the new tokens)."""
    batch, width = prompts_BxT.shape
    columns_T = jnp.arange(width)[None]
    valid_BxT = (jnp.ones((batch, width), bool) if lengths_B is None
                 else columns_T >= width - jnp.asarray(lengths_B)[:, None])
    return self._model().apply({'params': params}, prompts_BxT, valid_BxT,
                               max(1, max_len - width + 1), method=EncDec.prefill)

  def decode_step(self, params, token_B: jax.Array, state: dict) -> tuple[jax.Array, dict]:
    return self._model().apply({'params': params}, token_B, state, method=EncDec.step)

  def expand(self, state: dict, beams: int) -> dict:
    """The state of B rows as B * beams rows (row b * beams + j: beam j of row b)."""
    batch = state['memory_valid'].shape[0]
    rows = jnp.repeat(jnp.arange(batch), beams)
    state = {**state, 'memory_valid': state['memory_valid'][rows],
             'layers': [layer.take_rows(rows, batch) for layer in state['layers']]}
    return self.reorder(state, jnp.broadcast_to(jnp.arange(beams), (batch, beams)))

  def reorder(self, state: dict, parent_PxR: jax.Array) -> dict:
    return {**state, 'layers': [layer.reorder(parent_PxR, state['index'])
                                for layer in state['layers']]}


# --- FLOPs ---------------------------------------------------------------------------------

def encoder_flops_per_token(cfg: EncDecConfig, seq_len: int) -> float:
  """Training FLOPs of one encoder token: its blocks' matmuls and attention over seq_len keys,
  and each decoder layer's cross-attention key and value projections of it (2 D x D)."""
  block = common.block_matmul_params(cfg.d_model, cfg.d_model, cfg.mlp, cfg.mlp_dim)
  cross_kv = cfg.decoder_layers * 2 * cfg.d_model ** 2
  return (6 * (cfg.num_layers * block + cross_kv)
          + common.attention_flops_per_token(cfg.num_layers * seq_len, cfg.num_heads,
                                             cfg.head_dim))


def decoder_flops_per_token(cfg: EncDecConfig, seq_len: int, target_len: int) -> float:
  """Training FLOPs of one decoder token: self-attention, the cross-attention's query and
  output (2 D x D), the MLP, the head; attention over target_len keys (not halved for
  causality, as PaLM's MFU) and over the seq_len encoder keys."""
  block = common.block_matmul_params(cfg.d_model, cfg.d_model, cfg.mlp, cfg.mlp_dim)
  cross_qo = 2 * cfg.d_model ** 2
  return (6 * (cfg.decoder_layers * (block + cross_qo) + cfg.d_model * cfg.vocab_size)
          + common.attention_flops_per_token(cfg.decoder_layers * (target_len + seq_len),
                                             cfg.num_heads, cfg.head_dim))


def train_flops_per_token(cfg: EncDecConfig, seq_len: int, mask_rate: float = 1.0,
                          target_len: int | None = None) -> float:
  """FLOPs of a training step per encoder token (train.py multiplies by the batch's encoder
  tokens): one encoder token's plus target_len / seq_len decoder tokens' (default: as many
  decoder tokens as encoder ones)."""
  target_len = seq_len if target_len is None else target_len
  return (encoder_flops_per_token(cfg, seq_len)
          + target_len / seq_len * decoder_flops_per_token(cfg, seq_len, target_len))
