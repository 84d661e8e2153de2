"""The encoder-only language model, BERT: token, segment and position embeddings summed and
normalised; bidirectional self-attention over the real (non-padding) tokens; post-LayerNorm
blocks as the original BERT (pre-LayerNorm with model.post_norm=False); a pooler (the [CLS]
state through a tanh layer); the masked-LM head (transform, norm, a decoder tied to the token
embeddings, an output bias) and the next-sentence head.

  mlm_logits_BxTxV, nsp_logits_Bx2 = Encoder(cfg).apply({'params': params}, tokens_BxT,
                                                        segment_ids=..., padding_mask=...)
  hidden_BxTxD = Encoder(cfg).apply({'params': params}, tokens_BxT, method=Encoder.encode)
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.errors import require
from lm.models.base import ModelConfig
from lm.models.layers import attention, common, mlp

ACTIVATION = ('batch', 'length', 'embed')


@dataclasses.dataclass(frozen=True)
class EncoderConfig(ModelConfig):
  """An encoder (BERT): the common keys (lm.config.ModelConfig) and these."""
  family: str = dataclasses.field(default='encoder', init=False)
  post_norm: bool = False  # LayerNorm after each residual sum (original BERT); False: pre-norm
  num_segments: int = 2  # segment (token type) embeddings: A and B of [CLS] A [SEP] B [SEP]


class EncoderBlock(nn.Module):
  """Attention then MLP, each added to the residual stream: normalised after the sum
  (post_norm, BERT) or before the sublayer (pre-norm)."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, valid_BxT: jax.Array) -> jax.Array:
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    out_std = common.INIT_STD if cfg.post_norm else common.INIT_STD / math.sqrt(2 * cfg.num_layers)
    sublayers = (
        ('attn_norm', lambda h: attention.Attention(
            cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.use_bias,
            cfg.rope_theta if cfg.positions == 'rope' else 0.0, None, dtype, out_std,
            causal=False, name='attn')(h, key_valid_BxT=valid_BxT)[0]),
        ('mlp_norm', lambda h: mlp.Mlp(cfg.mlp, cfg.mlp_dim, cfg.use_bias, dtype, out_std,
                                          name='mlp')(h)))
    for norm_name, sublayer in sublayers:
      norm = common.norm(cfg.norm, cfg.norm_eps, dtype, norm_name)
      x_BxTxD = nn.with_logical_constraint(
          common.residual(x_BxTxD, sublayer, norm, cfg.post_norm), ACTIVATION)
    return x_BxTxD


class Encoder(nn.Module):
  """tokens_BxT (int) -> (mlm_logits_BxTxV, nsp_logits_Bx2), float32. `segment_ids_BxT`
  (default 0) index the segment embeddings; `padding_mask_BxT` (default all True) is False at
  padding, which no position attends to. Parameters: embed, pos_embed (learned positions),
  segment_embed, embed_norm, block_0 .. block_{L-1}, final_norm (pre-norm only), pooler,
  mlm_transform, mlm_norm, mlm_bias, nsp."""
  cfg: EncoderConfig

  def setup(self):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    dense = lambda features, axes, name: nn.Dense(
        features, dtype=dtype, name=name, kernel_init=common.normal(axes),
        bias_init=common.zeros(axes[1:]))
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype,
                          embedding_init=common.normal(('vocab', 'embed')))
    if cfg.positions == 'learned':
      self.pos_embed = nn.Embed(cfg.max_len, cfg.d_model, dtype=dtype,
                                embedding_init=common.normal((None, 'embed')))
    self.segment_embed = nn.Embed(cfg.num_segments, cfg.d_model, dtype=dtype,
                                  embedding_init=common.normal((None, 'embed')))
    self.embed_norm = common.norm(cfg.norm, cfg.norm_eps, dtype, 'embed_norm')
    block = (nn.remat(EncoderBlock, policy=common.REMAT_POLICIES[cfg.remat])
             if cfg.remat != 'none' else EncoderBlock)
    self.blocks = [block(cfg, name=f'block_{i}') for i in range(cfg.num_layers)]
    if not cfg.post_norm:
      self.final_norm = common.norm(cfg.norm, cfg.norm_eps, dtype, 'final_norm')
    self.pooler = dense(cfg.d_model, ('embed', 'mlp'), 'pooler')
    self.mlm_transform = dense(cfg.d_model, ('embed', 'mlp'), 'mlm_transform')
    self.mlm_norm = common.norm(cfg.norm, cfg.norm_eps, dtype, 'mlm_norm')
    self.mlm_bias = self.param('mlm_bias', common.zeros(('vocab',)), (cfg.vocab_size,))
    self.nsp = dense(2, ('embed', None), 'nsp')

  def encode(self, tokens_BxT: jax.Array, segment_ids: jax.Array | None = None,
             padding_mask: jax.Array | None = None) -> jax.Array:
    """The final hidden states, hidden_BxTxD."""
    valid_BxT = (jnp.ones(tokens_BxT.shape, bool) if padding_mask is None
                 else padding_mask.astype(bool))
    segment_ids_BxT = jnp.zeros_like(tokens_BxT) if segment_ids is None else segment_ids
    x_BxTxD = self.embed(tokens_BxT) + self.segment_embed(segment_ids_BxT)
    if self.cfg.positions == 'learned':
      x_BxTxD = x_BxTxD + self.pos_embed(jnp.arange(tokens_BxT.shape[1]))[None]
    x_BxTxD = nn.with_logical_constraint(self.embed_norm(x_BxTxD), ACTIVATION)
    for block in self.blocks:
      x_BxTxD = block(x_BxTxD, valid_BxT)
    return x_BxTxD if self.cfg.post_norm else self.final_norm(x_BxTxD)

  def __call__(self, tokens_BxT: jax.Array, segment_ids: jax.Array | None = None,
               padding_mask: jax.Array | None = None,
               positions_BxM: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """MLM logits at every position, or only at `positions_BxM` ([B, M, V]: the masked
    positions, as BERT's training computes the vocabulary projection only where it is scored),
    and NSP logits."""
    act = mlp.activation(self.cfg.mlp)
    hidden_BxTxD = self.encode(tokens_BxT, segment_ids, padding_mask)
    selected_BxMxD = (hidden_BxTxD if positions_BxM is None else
                      jnp.take_along_axis(hidden_BxTxD, positions_BxM[..., None], axis=1))
    h_BxMxD = self.mlm_norm(act(self.mlm_transform(selected_BxMxD)))
    mlm_logits_BxMxV = self.embed.attend(h_BxMxD).astype(jnp.float32) + self.mlm_bias
    mlm_logits_BxMxV = nn.with_logical_constraint(mlm_logits_BxMxV, ('batch', 'length', 'vocab'))
    pooled_BxD = jnp.tanh(self.pooler(hidden_BxTxD[:, 0]))
    return mlm_logits_BxMxV, self.nsp(pooled_BxD).astype(jnp.float32)


def validate(m: EncoderConfig, seq_len: int | None) -> None:
  """The encoder's own keys, and with `seq_len` the length of its training sequences; errors
  name field, value, fix."""
  require(m.num_segments >= 2, 'model.num_segments', m.num_segments,
          'the encoder embeds the segments of [CLS] A [SEP] B [SEP]: give >= 2')
  require(m.mlp_dim > 0 and m.positions != 'none', 'model.mlp_dim/positions',
          (m.mlp_dim, m.positions), 'the encoder has MLPs and positions (learned or rope)')
  require(seq_len is None or seq_len <= m.max_len, 'data.seq_len', seq_len,
          f'exceeds model.max_len={m.max_len}; lower data.seq_len or raise model.max_len')


def matmul_params(cfg: EncoderConfig, mask_rate: float = 1.0) -> float:
  """Weights in a matmul per token: the blocks, and the MLM transform and decoder for the
  share `mask_rate` of the tokens that are scored (the pooler and the NSP head run once a
  sequence, not counted)."""
  block = common.block_matmul_params(cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.mlp,
                                     cfg.mlp_dim)
  return cfg.num_layers * block + mask_rate * cfg.d_model * (cfg.d_model + cfg.vocab_size)


def train_flops_per_token(cfg: EncoderConfig, seq_len: int, mask_rate: float = 1.0) -> float:
  """6 FLOPs per matmul weight plus attention's, every query seeing all seq_len keys."""
  return 6 * matmul_params(cfg, mask_rate) + common.attention_flops_per_token(
      cfg.num_layers * seq_len, cfg.num_heads, cfg.head_dim)


@dataclasses.dataclass(frozen=True)
class Encoding:
  """The encoding interface of the encoder family (lm.models.encoding), what lm.encoding's
  fill_mask and embed use."""
  cfg: EncoderConfig

  def mlm_logits(self, params, tokens_BxT: jax.Array, padding_BxT: jax.Array) -> jax.Array:
    """The masked-LM logits_BxTxV of padded rows (padding_BxT False at padding)."""
    return Encoder(self.cfg).apply({'params': params}, tokens_BxT, padding_mask=padding_BxT)[0]

  def hidden(self, params, tokens_BxT: jax.Array, padding_BxT: jax.Array) -> jax.Array:
    """The final hidden states hidden_BxTxD of padded rows."""
    return Encoder(self.cfg).apply({'params': params}, tokens_BxT, padding_mask=padding_BxT,
                                   method='encode')
