"""The decoder-only language model: pre-norm blocks of attention and MLP, configured by
ModelConfig into GPT-2 (learned positions, LayerNorm, GELU, biases) or Llama / Mistral (RoPE,
RMSNorm, SwiGLU, grouped-query attention, sliding window in all layers or a local/global
pattern, mixture of experts), tied or untied embeddings; optionally rematerialised and
scanned over layers.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.models.layers import attention, common, kv_cache, mlp

ACTIVATION = ('batch', 'length', 'embed')


class Block(nn.Module):
  cfg: ModelConfig
  window: int | None  # this layer's attention window; None: full causal attention

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, cache: dict | None = None, index: jax.Array | int = 0,
               start_B: jax.Array | None = None):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    out_std = common.INIT_STD / math.sqrt(2 * cfg.num_layers)  # GPT-2's residual scaling
    h_BxTxD = common.norm(cfg.norm, cfg.norm_eps, dtype, 'attn_norm')(x_BxTxD)
    attended = attention.Attention(
        cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.use_bias,
        cfg.rope_theta if cfg.positions == 'rope' else 0.0, self.window, dtype, out_std,
        name='attn')(h_BxTxD, cache, index, start_B)
    h_BxTxD, cache = attended if cache is not None else (attended, None)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD + h_BxTxD, ACTIVATION)
    h_BxTxD = common.norm(cfg.norm, cfg.norm_eps, dtype, 'mlp_norm')(x_BxTxD)
    if cfg.num_experts:
      ffn = mlp.MoeMlp(cfg.num_experts, cfg.experts_per_token, cfg.mlp_dim, dtype, out_std,
                       name='moe')
    else:
      ffn = mlp.Mlp(cfg.mlp, cfg.mlp_dim, cfg.use_bias, dtype, out_std, name='mlp')
    x_BxTxD = x_BxTxD + ffn(h_BxTxD)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ACTIVATION)
    return x_BxTxD if cache is None else (x_BxTxD, cache)


def block_class(cfg: ModelConfig, decoding: bool) -> type[Block]:
  """Block, or Block rematerialised as cfg.remat asks when training (decoding keeps nothing
  for a backward pass). The parameters are the same either way."""
  if cfg.remat == 'none' or decoding:
    return Block
  return nn.remat(Block, policy=common.REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


def run_blocks(blocks: list[Block], x_BxTxD: jax.Array, caches, index, start_B):
  """The blocks in order; with caches (one per block), also their updated caches."""
  if caches is None:
    for block in blocks:
      x_BxTxD = block(x_BxTxD)
    return x_BxTxD, None
  new_caches = []
  for block, cache in zip(blocks, caches):
    x_BxTxD, cache = block(x_BxTxD, cache, index, start_B)
    new_caches.append(cache)
  return x_BxTxD, new_caches


class Period(nn.Module):
  """Blocks block_0 .. block_{P-1}: one repeat of the window pattern, the unit nn.scan
  repeats. Scanned, `caches` holds each block's cache and comes back updated."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, caches: tuple | None, index: jax.Array | int,
               start_B: jax.Array | None):
    cls = block_class(self.cfg, decoding=caches is not None)
    blocks = [cls(self.cfg, window, name=f'block_{j}')
              for j, window in enumerate(self.cfg.layer_windows[:self.cfg.period])]
    x_BxTxD, caches = run_blocks(blocks, x_BxTxD, caches, index, start_B)
    return x_BxTxD, (None if caches is None else tuple(caches))


class Decoder(nn.Module):
  """tokens_BxT (int) -> logits_BxTxV (float32); with a cache (see `prefill`), also the cache,
  whose rows may be left-padded (cache['start']: the column each row's tokens begin at).
  Parameters: embed, pos_embed (learned positions), block_0 .. block_{L-1} (or, with
  scan_layers, `layers/block_j` stacked over the L / P repeats of the pattern), final_norm,
  head (untied)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, cache: dict | None = None):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    index = 0 if cache is None else cache['index']
    start_B = None if cache is None else cache['start']
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, name='embed',
                     embedding_init=common.normal(('vocab', 'embed')))
    x_BxTxD = embed(tokens_BxT)
    if cfg.positions == 'learned':
      pos_embed = nn.Embed(cfg.max_len, cfg.d_model, dtype=dtype, name='pos_embed',
                           embedding_init=common.normal((None, 'embed'), 0.01))
      columns_T = index + jnp.arange(tokens_BxT.shape[1])
      positions = (columns_T[None] if start_B is None
                   else jnp.maximum(columns_T - start_B[:, None], 0))  # padding: any position
      x_BxTxD = x_BxTxD + pos_embed(positions)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ACTIVATION)
    caches = None if cache is None else cache['layers']
    if cfg.scan_layers:
      stack = nn.scan(Period, variable_axes={'params': 0, 'intermediates': 0},
                      split_rngs={'params': True}, in_axes=(0, nn.broadcast, nn.broadcast),
                      length=cfg.num_layers // cfg.period,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BxTxD, caches = stack(cfg, name='layers')(x_BxTxD, caches, index, start_B)
    else:
      cls = block_class(cfg, decoding=cache is not None)
      blocks = [cls(cfg, window, name=f'block_{i}') for i, window in enumerate(cfg.layer_windows)]
      x_BxTxD, caches = run_blocks(blocks, x_BxTxD, caches, index, start_B)
    x_BxTxD = common.norm(cfg.norm, cfg.norm_eps, dtype, 'final_norm')(x_BxTxD)
    if cfg.tie_embeddings:
      logits_BxTxV = embed.attend(x_BxTxD)
    else:
      logits_BxTxV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, name='head',
                              kernel_init=common.normal(('embed', 'vocab')))(x_BxTxD)
    logits_BxTxV = nn.with_logical_constraint(logits_BxTxV.astype(jnp.float32),
                                              ('batch', 'length', 'vocab'))
    if cache is None:
      return logits_BxTxV
    return logits_BxTxV, {'index': index + tokens_BxT.shape[1], 'start': start_B,
                          'layers': caches}


def stack_layers(cfg: ModelConfig, params: dict) -> dict:
  """Parameters of the plain layout (block_i) in the scan_layers layout (layers/block_j with a
  leading axis of the L / P repeats): block g * P + j is layers/block_j[g]."""
  repeats, p = cfg.num_layers // cfg.period, cfg.period
  out = {k: v for k, v in params.items() if not k.startswith('block_')}
  out['layers'] = {f'block_{j}': jax.tree.map(
      lambda *xs: jnp.stack(xs), *[params[f'block_{g * p + j}'] for g in range(repeats)])
      for j in range(p)}
  return out


def unstack_layers(cfg: ModelConfig, params: dict) -> dict:
  """The inverse of stack_layers."""
  repeats, p = cfg.num_layers // cfg.period, cfg.period
  out = {k: v for k, v in params.items() if k != 'layers'}
  for g in range(repeats):
    for j in range(p):
      out[f'block_{g * p + j}'] = jax.tree.map(lambda x, g=g: x[g], params['layers'][f'block_{j}'])
  return out


# --- the decoding interface: init_cache, prefill, decode_step ------------------------------

def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> dict:
  """An empty cache for sequences of up to max_len positions (prompt included). A layer with a
  sliding window keeps `window` slots whatever max_len is."""
  dtype = jnp.dtype(cfg.dtype)
  make = lambda window: kv_cache.init_kv_cache(batch_size, max_len, cfg.kv_heads, cfg.head_dim,
                                             window, dtype)
  if cfg.scan_layers:  # per block of the period, stacked over its repeats
    repeats = cfg.num_layers // cfg.period
    stacked = lambda c: jax.tree.map(lambda x: jnp.broadcast_to(x, (repeats, *x.shape)), c)
    caches = tuple(stacked(make(w)) for w in cfg.layer_windows[:cfg.period])
  else:
    caches = [make(w) for w in cfg.layer_windows]
  return {'index': jnp.zeros((), jnp.int32), 'start': jnp.zeros((batch_size,), jnp.int32),
          'layers': caches}


def select_rows(cfg: ModelConfig, cache: dict, rows_N: jax.Array) -> dict:
  """The cache of rows rows_N of the batch (beam search gives each prompt's beams a copy of its
  row, then reorders them with reorder_beams, which moves no rows)."""
  def take(x):  # a block [B * K, S, Dh], scanned [repeats, B * K, S, Dh]: rows_N of B
    lead, (slots, head_dim) = x.shape[:-3], x.shape[-2:]
    x_BxKxSxDh = x.reshape(*lead, cache['start'].shape[0], -1, slots, head_dim)
    return jnp.take(x_BxKxSxDh, rows_N, axis=len(lead)).reshape(*lead, -1, slots, head_dim)
  take_kv = lambda c: {**c, 'k': tuple(map(take, c['k'])), 'v': tuple(map(take, c['v']))}
  return {**cache, 'start': cache['start'][rows_N],
          'layers': type(cache['layers'])(take_kv(c) for c in cache['layers'])}


def reorder_beams(cache: dict, parent_PxR: jax.Array) -> dict:
  """The cache once beam j of prompt p continues beam parent_PxR[p, j] (the B = P * R rows of
  the cache being P prompts' R beams): no key or value moves. Each layer keeps a table
  `beam_row` [P, R, S] of the row of its prompt that holds each beam's slot s (read by
  kv_cache.attention_over_blocks); the beams take their parents' tables, and the slot the next
  decode step writes is each beam's own row. Without a table yet, each beam's slots start in
  its own row (the rows of a prompt then hold the same keys, as select_rows leaves them)."""
  prompts, beams = parent_PxR.shape
  own_PxR = jnp.broadcast_to(jnp.arange(beams, dtype=jnp.int32), (prompts, beams))

  def layer(c):
    lead, slots = c['pos'].shape[:-1], c['pos'].shape[-1]  # lead: scanned layers' repeats
    shape = (*lead, prompts, beams, slots)
    rows = c['beam_row'] if 'beam_row' in c else jnp.broadcast_to(own_PxR[..., None], shape)
    rows = jnp.take_along_axis(rows, jnp.broadcast_to(parent_PxR[..., None], shape), axis=-2)
    rows = rows.at[..., cache['index'] % slots].set(jnp.broadcast_to(own_PxR, shape[:-1]))
    return {**c, 'beam_row': rows}
  return {**cache, 'layers': type(cache['layers'])(layer(c) for c in cache['layers'])}


def prefill(cfg: ModelConfig, params, tokens_BxT: jax.Array, max_len: int,
            lengths_B: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Runs the prompts, returns their logits_BxTxV and the cache to continue from. With
  `lengths_B`, the prompts are left-padded: row b's prompt is its last lengths_B[b] tokens, its
  positions count from there, and every row's next token goes in the same column T."""
  batch, length = tokens_BxT.shape
  if length > max_len:
    raise ValueError(f'a prompt of {length} tokens does not fit max_len={max_len}')
  cache = init_cache(cfg, batch, max_len)
  if lengths_B is not None:
    cache['start'] = (length - jnp.asarray(lengths_B)).astype(jnp.int32)
  return Decoder(cfg).apply({'params': params}, tokens_BxT, cache)


def decoding_params(cfg: ModelConfig, params, rows: int) -> tuple[ModelConfig, dict]:
  """(cfg, params) laid out for a loop of decode steps over `rows` rows on CPU: the same
  logits, faster; on accelerators nothing changes. Done once, before the loop:
  - a tied model gets its output head as a [D, V] copy of the embedding: XLA:CPU multiplies a
    few rows by the [V, D] table transposed slowly;
  - with one row, each dense MLP's down kernel [F, D] is stored transposed, as `kernel_T`
    [D, F] (`mlp.Mlp` reads either): XLA:CPU's matrix-vector product streams a kernel of
    more rows than columns faster that way, where at 2 to 8 rows it is slower so.
  (The measurements: experiments/README.md, Sampling.)"""
  if jax.default_backend() != 'cpu':
    return cfg, params
  if cfg.tie_embeddings:
    cfg = dataclasses.replace(cfg, tie_embeddings=False)
    params = {**params, 'head': {'kernel': nn.meta.unbox(params['embed']['embedding']).T}}
  if rows == 1:  # (a mixture of experts has no dense MLP: nothing to transpose)
    params = transpose_down_kernels(params)
  return cfg, params


def transpose_down_kernels(params: dict) -> dict:
  """params with every `mlp/down/kernel` [..., F, D] replaced by `mlp/down/kernel_T` [..., D, F]
  (scanned layers keep their leading axis)."""
  def walk(tree: dict, path: tuple[str, ...]) -> dict:
    if path[-2:] == ('mlp', 'down'):
      tree = dict(tree)
      tree['kernel_T'] = jnp.swapaxes(nn.meta.unbox(tree.pop('kernel')), -1, -2)
      return tree
    return {k: walk(v, path + (k,)) if isinstance(v, dict) else v for k, v in tree.items()}
  return walk(params, ())


def decode_step(cfg: ModelConfig, params, token_B: jax.Array,
                cache: dict) -> tuple[jax.Array, dict]:
  """One new token per row, in column cache['index']: logits_BxV and the updated cache."""
  logits_Bx1xV, cache = Decoder(cfg).apply({'params': params}, token_B[:, None], cache)
  return logits_Bx1xV[:, 0], cache


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that take part in a matmul per token: blocks and the output head (for a mixture
  of experts, the router and the experts each token uses)."""
  block = common.block_matmul_params(cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.mlp,
                                     cfg.mlp_dim)
  if cfg.num_experts:  # the router, and the experts a token is sent to: active parameters
    mlp = 3 * cfg.d_model * cfg.mlp_dim
    block += cfg.d_model * cfg.num_experts + (cfg.experts_per_token - 1) * mlp
  return cfg.num_layers * block + cfg.d_model * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward plus backward FLOPs of one token: 6 per matmul weight, plus attention's over all
  keys a query may see in each layer (seq_len, or that layer's window), as in PaLM's MFU: not
  halved for causality."""
  keys = sum(seq_len if w is None else min(seq_len, w) for w in cfg.layer_windows)
  return 6 * matmul_params(cfg) + common.attention_flops_per_token(keys, cfg.num_heads,
                                                                   cfg.head_dim)
