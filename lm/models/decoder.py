"""The decoder-only language model: pre-norm blocks of a mixer and an MLP, configured by
DecoderConfig into GPT-2 (learned positions, LayerNorm, GELU, biases) or Llama / Mistral (RoPE,
RMSNorm, SwiGLU, grouped-query attention, sliding window in all layers or a local/global
pattern, mixture of experts), Mamba (scan layers, no MLP) or hybrids: the mixer of each layer
is a letter of model.layer_pattern, a kind of lm.models.layers.kinds.LAYER_KINDS, which this
module asks for everything a kind decides. Tied or untied embeddings; optionally
rematerialised and scanned over layers.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm import backend
from lm.errors import require
from lm.models.base import ModelConfig
from lm.models.layers import common, mlp
from lm.models.layers.kinds import LAYER_KINDS, LayerKind, config_keys, describe

ACTIVATION = ('batch', 'length', 'embed')


@dataclasses.dataclass(frozen=True)
class DecoderConfig(*reversed(config_keys()), ModelConfig):
  """A decoder-only model: the common keys (lm.config.ModelConfig), the keys of its layer kinds
  (each kind's dataclass, e.g. ssm.ScanKeys: state_size, d_conv, expand, ...) and these."""
  family: str = dataclasses.field(default='decoder', init=False)
  window: int | None = None  # sliding window: a query sees its last `window` positions; None: all
  layer_pattern: str = ''  # a letter a layer (LAYER_KINDS), repeated over the depth: G global
                           # attention, L sliding window, M Mamba, S S4D; '': all L
  tie_embeddings: bool = True
  num_experts: int = 0  # mixture of SwiGLU experts in every block; 0: a dense MLP
  experts_per_token: int = 2
  moe_aux_coef: float = 0.01  # weight of the load-balancing loss in the objective
  moe_capacity_factor: float = 0.0  # training: each expert takes at most ceil(c N k / E) of a
                                    # batch's N tokens' assignments, the rest dropped (logged:
                                    # moe_dropped); evaluation and decoding drop none; 0: none
  scan_layers: bool = False  # nn.scan over the layers (one compiled period): fast compiles of deep models
  qk_norm: bool = False  # attention: RMS-normalised queries and keys, each head's
  logit_softcap: float = 0.0  # logits c tanh(logits / c) (Gemma 2); 0: none
  zero_init_out: bool = False  # every block's output projections start at zero
  embed_skip: bool = False  # each block's input a x + b x0, x0 the embeddings; (a, b) learned
                            # per block from (1, 0)
  value_residual: bool = False  # every attention layer after the first attends with a v + b v1,
                                # v1 the first's values; (a, b) learned per layer from (0.5, 0.5);
                                # nothing without attention layers

  @property
  def unmapped_options(self) -> tuple[str, ...]:
    """The options set that no Hugging Face architecture of lm.hf has (it refuses them)."""
    return tuple(name for name in ('qk_norm', 'logit_softcap', 'embed_skip', 'value_residual')
                 if getattr(self, name))

  @property
  def period(self) -> int:
    """Layers in one repeat of layer_pattern: the unit that scan_layers repeats."""
    return len(self.layer_pattern) or 1

  @property
  def layer_kinds(self) -> str:
    """The letter of each layer (LAYER_KINDS): layer_pattern repeated over the depth."""
    pattern = self.layer_pattern or 'L'
    return ''.join(pattern[i % len(pattern)] for i in range(self.num_layers))

  @property
  def kinds(self) -> tuple[LayerKind, ...]:
    """The LayerKind of each layer."""
    return tuple(LAYER_KINDS[letter] for letter in self.layer_kinds)

  @property
  def layer_windows(self) -> tuple[int | None, ...]:
    """The attention window of each layer (None: full causal attention, or a scan layer)."""
    return tuple(self.window if kind.windowed else None for kind in self.kinds)

  @property
  def has_attention(self) -> bool:
    return any(kind.attends for kind in self.kinds)


def validate(m: DecoderConfig, seq_len: int | None) -> None:
  """The decoder's own keys, each of its layer kinds' (LayerKind.validate), and with `seq_len`
  the length of its training sequences; errors name field, value, fix."""
  require(m.window is None or m.window >= 1, 'model.window', m.window,
          'a query sees its last `window` positions, itself included: give >= 1, or leave it '
          'unset (None) for full causal attention')
  require(set(m.layer_pattern) <= set(LAYER_KINDS), 'model.layer_pattern', m.layer_pattern,
          f"use one letter a layer: {describe()}, e.g. 'LLLG' or 'MMMG'")
  for letter in sorted(set(m.layer_kinds), key=list(LAYER_KINDS).index):
    LAYER_KINDS[letter].validate(m, seq_len)
  require(not m.scan_layers or m.num_layers % m.period == 0, 'model.num_layers', m.num_layers,
          f'scan_layers repeats model.layer_pattern={m.layer_pattern!r}: num_layers must be a '
          f'multiple of its length {m.period}')
  require(m.positions != 'none' or not m.has_attention, 'model.positions', m.positions,
          f'layer_pattern={m.layer_pattern!r} has attention layers, which need positions: '
          'use rope or learned')
  if m.num_experts:
    require(m.num_experts >= 1 and 1 <= m.experts_per_token <= m.num_experts,
            'model.experts_per_token', m.experts_per_token,
            f'must be in [1, model.num_experts={m.num_experts}]')
    require(m.mlp == 'swiglu', 'model.mlp', m.mlp, 'experts are SwiGLU MLPs: use swiglu')
  require(not (m.value_residual and m.scan_layers and m.has_attention), 'model.value_residual',
          m.value_residual, 'the first attention layer\'s values must reach every later one, '
          'which one scanned period cannot carry: set model.scan_layers=False, or '
          'model.value_residual=False')
  require(m.logit_softcap >= 0, 'model.logit_softcap', m.logit_softcap,
          'give a cap above 0 (e.g. 30), or 0 for none')
  require(m.num_experts >= 0 and m.moe_aux_coef >= 0, 'model.num_experts/moe_aux_coef',
          (m.num_experts, m.moe_aux_coef), 'must be >= 0')
  require(m.moe_capacity_factor >= 0, 'model.moe_capacity_factor', m.moe_capacity_factor,
          'give a factor above 0 (e.g. 1.25: each expert takes 1.25x its even share of the '
          'tokens), or 0 to drop no token')
  if seq_len is None:
    return
  require(seq_len <= m.max_len or not m.has_attention and m.positions != 'learned',
          'data.seq_len', seq_len,
          f'exceeds model.max_len={m.max_len}; lower data.seq_len or raise model.max_len')


class Block(nn.Module):
  """norm, mixer, residual; then norm, MLP (or experts), residual, unless mlp_dim = 0.
  `cache` is this layer's decoding state (LayerKind.init_state), None in training. With
  cfg.embed_skip the block's input is a x + b x0_BxTxD (the embeddings), (a, b) its parameter
  `embed_skip`, from (1, 0). With cfg.value_residual an attention layer takes
  first_values_BxTxKxDh, the first attention layer's values (None: this is the first). Returns
  (x_BxTxD, cache, router_stats, first_values_BxTxKxDh): router_stats a mixture of experts'
  (mean router probabilities_E, share of assignments_E) over the tokens (mlp.MoeMlp), else
  (); first_values those to pass on (this layer's own if it is the first attention layer)."""
  cfg: DecoderConfig
  kind: str  # a letter of LAYER_KINDS

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, cache=None, index: jax.Array | int = 0,
               start_B: jax.Array | None = None, segment_ids_BxT: jax.Array | None = None,
               positions_BxT: jax.Array | None = None, x0_BxTxD: jax.Array | None = None,
               first_values_BxTxKxDh: jax.Array | None = None):
    cfg, dtype, kind = self.cfg, jnp.dtype(self.cfg.dtype), LAYER_KINDS[self.kind]
    if cfg.embed_skip:
      gates = self.param('embed_skip', common.no_decay(lambda *_: jnp.array([1.0, 0.0]), (None,)),
                         (2,))
      x_BxTxD = gates[0].astype(dtype) * x_BxTxD + gates[1].astype(dtype) * x0_BxTxD
    out_std = (0.0 if cfg.zero_init_out  # GPT-2's residual scaling, or none at all
               else common.INIT_STD / math.sqrt(2 * cfg.num_layers))
    h_BxTxD = common.norm(cfg.norm, cfg.norm_eps, dtype, kind.norm)(x_BxTxD)
    shares_values = cfg.value_residual and kind.attends
    values = {'first_values_BxTxKxDh': first_values_BxTxKxDh} if shares_values else {}
    out = kind.mixer(cfg, out_std)(h_BxTxD, cache, index=index, start_B=start_B,
                                   segment_ids_BxT=segment_ids_BxT, positions_BxT=positions_BxT,
                                   **values)
    h_BxTxD, cache = out[:2]
    if shares_values and first_values_BxTxKxDh is None:
      first_values_BxTxKxDh = out[2]
    x_BxTxD = nn.with_logical_constraint(x_BxTxD + h_BxTxD, ACTIVATION)
    if not cfg.mlp_dim:
      return x_BxTxD, cache, (), first_values_BxTxKxDh
    h_BxTxD = common.norm(cfg.norm, cfg.norm_eps, dtype, 'mlp_norm')(x_BxTxD)
    if cfg.num_experts:
      h_BxTxD, stats = mlp.MoeMlp(cfg.num_experts, cfg.experts_per_token, cfg.mlp_dim, dtype,
                                  out_std, cfg.moe_capacity_factor, name='moe')(h_BxTxD)
    else:
      h_BxTxD, stats = mlp.Mlp(cfg.mlp, cfg.mlp_dim, cfg.use_bias, dtype, out_std,
                               name='mlp')(h_BxTxD), ()
    x_BxTxD = nn.with_logical_constraint(x_BxTxD + h_BxTxD, ACTIVATION)
    return x_BxTxD, cache, stats, first_values_BxTxKxDh


def block_class(cfg: DecoderConfig, decoding: bool) -> type[Block]:
  """Block, or Block rematerialised as cfg.remat asks when training (decoding keeps nothing
  for a backward pass). The parameters are the same either way."""
  if cfg.remat == 'none' or decoding:
    return Block
  return nn.remat(Block, policy=common.REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


def run_blocks(blocks: list[Block], x_BxTxD: jax.Array, caches, index, start_B,
               segment_ids_BxT=None, positions_BxT=None, x0_BxTxD=None):
  """The blocks in order: x, their updated caches (None in training) and each block's router
  statistics (Block); x0_BxTxD: the embeddings, for cfg.embed_skip. The first attention
  layer's values reach the later ones (cfg.value_residual)."""
  new_caches, stats, first_values_BxTxKxDh = [], [], None
  for i, block in enumerate(blocks):
    cache = None if caches is None else caches[i]
    x_BxTxD, cache, block_stats, first_values_BxTxKxDh = block(
        x_BxTxD, cache, index, start_B, segment_ids_BxT, positions_BxT, x0_BxTxD,
        first_values_BxTxKxDh)
    new_caches.append(cache)
    stats.append(block_stats)
  return x_BxTxD, None if caches is None else new_caches, stats


class Period(nn.Module):
  """Blocks block_0 .. block_{P-1}: one repeat of the window pattern, the unit nn.scan
  repeats. Scanned, `caches` holds each block's cache and comes back updated."""
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, caches: tuple | None, index: jax.Array | int,
               start_B: jax.Array | None, segment_ids_BxT: jax.Array | None,
               positions_BxT: jax.Array | None, x0_BxTxD: jax.Array | None):
    cls = block_class(self.cfg, decoding=caches is not None)
    blocks = [cls(self.cfg, kind, name=f'block_{j}')
              for j, kind in enumerate(self.cfg.layer_kinds[:self.cfg.period])]
    x_BxTxD, caches, stats = run_blocks(blocks, x_BxTxD, caches, index, start_B,
                                        segment_ids_BxT, positions_BxT, x0_BxTxD)
    return x_BxTxD, (None if caches is None else tuple(caches), tuple(stats))


class Decoder(nn.Module):
  """tokens_BxT (int) -> logits_BxTxV (float32); with a cache (see `prefill`), also the cache,
  whose rows may be left-padded (cache['start']: the column each row's tokens begin at).
  With `with_aux` (training), also the model's auxiliary losses, name -> (value, weight in the
  objective): a mixture of experts' load-balancing loss `moe_aux` (weight moe_aux_coef; left
  out at weight 0) and, with a capacity, the share of assignments dropped `moe_dropped` (weight
  0: logged, not trained on); {} for a model without them.
  Packed training rows pass `segment_ids` and `positions` [B, T]: a token attends to (and a
  scan layer carries its state within) its own segment only, at its position in it.
  Parameters: embed, pos_embed (learned positions), block_0 .. block_{L-1} (or, with
  scan_layers, `layers/block_j` stacked over the L / P repeats of the pattern), final_norm,
  head (untied)."""
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, cache: dict | None = None,
               segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
               with_aux: bool = False):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    if cfg.moe_capacity_factor and not with_aux:  # a capacity is for training: evaluation and
      cfg = dataclasses.replace(cfg, moe_capacity_factor=0.0)  # decoding drop no token
    index = 0 if cache is None else cache['index']
    start_B = None if cache is None else cache['start']
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, name='embed',
                     embedding_init=common.normal(('vocab', 'embed')))
    x_BxTxD = embed(tokens_BxT)
    if cfg.positions == 'learned':
      pos_embed = nn.Embed(cfg.max_len, cfg.d_model, dtype=dtype, name='pos_embed',
                           embedding_init=common.normal((None, 'embed'), 0.01))
      columns_T = index + jnp.arange(tokens_BxT.shape[1])
      if positions is None:
        positions = (columns_T[None] if start_B is None
                     else jnp.maximum(columns_T - start_B[:, None], 0))  # padding: any position
      x_BxTxD = x_BxTxD + pos_embed(positions)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ACTIVATION)
    x0_BxTxD = x_BxTxD if cfg.embed_skip else None
    caches = None if cache is None else cache['layers']
    if cfg.scan_layers:
      stack = nn.scan(Period, variable_axes={'params': 0},
                      split_rngs={'params': True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast,
                               nn.broadcast),
                      length=cfg.num_layers // cfg.period,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BxTxD, (caches, stats) = stack(cfg, name='layers')(x_BxTxD, caches, index, start_B,
                                                           segment_ids, positions, x0_BxTxD)
    else:
      cls = block_class(cfg, decoding=cache is not None)
      blocks = [cls(cfg, kind, name=f'block_{i}') for i, kind in enumerate(cfg.layer_kinds)]
      x_BxTxD, caches, stats = run_blocks(blocks, x_BxTxD, caches, index, start_B, segment_ids,
                                          positions, x0_BxTxD)
    x_BxTxD = common.norm(cfg.norm, cfg.norm_eps, dtype, 'final_norm')(x_BxTxD)
    if cfg.tie_embeddings:
      logits_BxTxV = embed.attend(x_BxTxD)
    else:
      logits_BxTxV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, name='head',
                              kernel_init=common.normal(('embed', 'vocab')))(x_BxTxD)
    logits_BxTxV = nn.with_logical_constraint(logits_BxTxV.astype(jnp.float32),
                                              ('batch', 'length', 'vocab'))
    if cfg.logit_softcap:
      logits_BxTxV = cfg.logit_softcap * jnp.tanh(logits_BxTxV / cfg.logit_softcap)
    if cache is not None:
      return logits_BxTxV, {'index': index + tokens_BxT.shape[1], 'start': start_B,
                            'layers': caches}
    if not with_aux:
      return logits_BxTxV
    moe = [s for s in stats if s]  # each (probs_E, shares_E, dropped), [R, ...] when scanned
    aux = {}
    if moe and cfg.moe_aux_coef:
      aux['moe_aux'] = (mlp.load_balancing_loss([p for p, _, _ in moe], [f for _, f, _ in moe]),
                        cfg.moe_aux_coef)
    if moe and cfg.moe_capacity_factor:  # the mean over layers of each layer's dropped share
      aux['moe_dropped'] = (jnp.mean(jnp.concatenate([d.reshape(-1) for _, _, d in moe])), 0.0)
    return logits_BxTxV, aux


def layout_for(cfg: DecoderConfig, params: dict) -> dict:
  """Parameters of the plain layout (block_i) in cfg's layout: with scan_layers, layers/block_j
  with a leading axis of the L / P repeats (block g * P + j is layers/block_j[g])."""
  if not cfg.scan_layers:
    return params
  repeats, p = cfg.num_layers // cfg.period, cfg.period
  out = {k: v for k, v in params.items() if not k.startswith('block_')}
  out['layers'] = {f'block_{j}': jax.tree.map(
      lambda *xs: jnp.stack(xs), *[params[f'block_{g * p + j}'] for g in range(repeats)])
      for j in range(p)}
  return out


def plain_layout(cfg: DecoderConfig, params: dict) -> dict:
  """The inverse of layout_for."""
  if not cfg.scan_layers:
    return params
  repeats, p = cfg.num_layers // cfg.period, cfg.period
  out = {k: v for k, v in params.items() if k != 'layers'}
  for g in range(repeats):
    for j in range(p):
      out[f'block_{g * p + j}'] = jax.tree.map(lambda x, g=g: x[g], params['layers'][f'block_{j}'])
  return out


# --- the decoding interface: init_cache, prefill, decode_step ------------------------------

def init_cache(cfg: DecoderConfig, batch_size: int, max_len: int) -> dict:
  """An empty cache for sequences of up to max_len positions (prompt included): per layer, its
  kind's empty state (a KV cache, which with a sliding window keeps `window` slots whatever
  max_len is; a scan layer's state, the same size at any length)."""
  if cfg.scan_layers:  # per block of the period, stacked over its repeats
    repeats = cfg.num_layers // cfg.period
    stacked = lambda c: jax.tree.map(lambda x: jnp.broadcast_to(x, (repeats, *x.shape)), c)
    caches = tuple(stacked(kind.init_state(cfg, batch_size, max_len))
                   for kind in cfg.kinds[:cfg.period])
  else:
    caches = [kind.init_state(cfg, batch_size, max_len) for kind in cfg.kinds]
  return {'index': jnp.zeros((), jnp.int32), 'start': jnp.zeros((batch_size,), jnp.int32),
          'layers': caches}


def select_rows(cache: dict, rows_N: jax.Array) -> dict:
  """The cache of rows rows_N of the batch (beam search gives each prompt's beams a copy of its
  row, then reorders them with reorder_beams, which moves no key or value)."""
  batch = cache['start'].shape[0]
  return {**cache, 'start': cache['start'][rows_N],
          'layers': type(cache['layers'])(c.take_rows(rows_N, batch) for c in cache['layers'])}


def reorder_beams(cache: dict, parent_PxR: jax.Array) -> dict:
  """The cache once beam j of prompt p continues beam parent_PxR[p, j] (the B = P * R rows of
  the cache being P prompts' R beams): each layer's state reorders itself (KVCache.reorder
  by a table of rows, moving no key or value; ScanState.reorder by taking its parents' rows)."""
  return {**cache, 'layers': type(cache['layers'])(c.reorder(parent_PxR, cache['index'])
                                                   for c in cache['layers'])}


def prefill(cfg: DecoderConfig, params, tokens_BxT: jax.Array, max_len: int,
            lengths_B: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Runs the prompts, returns their logits_BxTxV and the cache to continue from. With
  `lengths_B`, the prompts are left-padded: row b's prompt is its last lengths_B[b] tokens, its
  positions count from there, and every row's next token goes in the same column T."""
  batch, length = tokens_BxT.shape
  if length > max_len and (cfg.has_attention or cfg.positions == 'learned'):
    raise ValueError(f'a prompt of {length} tokens does not fit max_len={max_len}')
  cache = init_cache(cfg, batch, max_len)
  if lengths_B is not None:
    cache['start'] = (length - jnp.asarray(lengths_B)).astype(jnp.int32)
  return Decoder(cfg).apply({'params': params}, tokens_BxT, cache)


def decoding_params(cfg: DecoderConfig, params, rows: int) -> tuple[DecoderConfig, dict]:
  """(cfg, params) laid out for a loop of decode steps over `rows` rows on CPU: the same
  logits, faster; on accelerators nothing changes. Done once, before the loop:
  - a tied model gets its output head as a [D, V] copy of the embedding: XLA:CPU multiplies a
    few rows by the [V, D] table transposed slowly;
  - with one row, each dense MLP's down kernel [F, D] is stored transposed, as `kernel_T`
    [D, F] (`mlp.Mlp` reads either): XLA:CPU's matrix-vector product streams a kernel of
    more rows than columns faster that way, where at 2 to 8 rows it is slower so.
  (The measurements: experiments/README.md, Sampling.)"""
  if not backend.is_cpu():
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


def decode_step(cfg: DecoderConfig, params, token_B: jax.Array,
                cache: dict) -> tuple[jax.Array, dict]:
  """One new token per row, in column cache['index']: logits_BxV and the updated cache."""
  logits_Bx1xV, cache = Decoder(cfg).apply({'params': params}, token_B[:, None], cache)
  return logits_Bx1xV[:, 0], cache


@dataclasses.dataclass(frozen=True)
class Decoding:
  """The decoding interface of the decoder family (lm.models.decoding). The state is a dict:
  'index' (the next column), 'start' (each row's first column, after its left padding) and
  'layers', one typed state a layer: a kv_cache.KVCache (attention) or an ssm.ScanState (a scan
  layer's conv window and SSM state)."""
  cfg: DecoderConfig

  @property
  def max_len(self) -> int | None:
    """The longest sequence (prompt and new tokens) it decodes; None: no bound (no attention
    and no learned positions: the state has the same size at any length)."""
    return self.cfg.max_len if self.cfg.has_attention or self.cfg.positions == 'learned' else None

  def prompt_room(self, max_new_tokens: int) -> int | None:
    """The longest prompt that leaves room for max_new_tokens (None: no bound)."""
    return None if self.max_len is None else self.max_len - max_new_tokens

  def new_tokens_room(self, prompt_len: int) -> int | None:
    """The most new tokens after a prompt of prompt_len (None: no bound)."""
    return None if self.max_len is None else self.max_len - prompt_len

  def prepare(self, params, rows: int):
    """params laid out for decoding `rows` rows on this device (decoding_params)."""
    return decoding_params(self.cfg, params, rows)[1]

  def _cfg(self, params) -> DecoderConfig:  # prepared params may hold an untied head
    untied = self.cfg.tie_embeddings and 'head' in params
    return dataclasses.replace(self.cfg, tie_embeddings=False) if untied else self.cfg

  def prefill(self, params, prompts_BxT: jax.Array, lengths_B: jax.Array | None,
              max_len: int) -> tuple[jax.Array, dict]:
    """Row b's prompt is the last lengths_B[b] columns of prompts_BxT (left-padded): the
    logits of each row's next token, and the state to continue from, for up to max_len
    columns in all."""
    logits_BxTxV, state = prefill(self._cfg(params), params, prompts_BxT, max_len, lengths_B)
    return logits_BxTxV[:, -1], state

  def decode_step(self, params, token_B: jax.Array, state: dict) -> tuple[jax.Array, dict]:
    return decode_step(self._cfg(params), params, token_B, state)

  def expand(self, state: dict, beams: int) -> dict:
    """The state of B rows as B * beams rows (row b * beams + j: beam j of row b), ready for
    `reorder`."""
    batch = state['start'].shape[0]
    state = select_rows(state, jnp.repeat(jnp.arange(batch), beams))
    return reorder_beams(state, jnp.broadcast_to(jnp.arange(beams), (batch, beams)))

  def reorder(self, state: dict, parent_PxR: jax.Array) -> dict:
    """Beam j of prompt p continues beam parent_PxR[p, j] (reorder_beams)."""
    return reorder_beams(state, parent_PxR)


def matmul_params(cfg: DecoderConfig) -> int:
  """Weights that take part in a matmul per token: each layer's mixer (LayerKind.matmul_params),
  the MLPs (for a mixture of experts, the router and the experts each token uses) and the
  output head."""
  mlp = common.block_matmul_params(cfg.d_model, 0, cfg.mlp, cfg.mlp_dim) - 2 * cfg.d_model ** 2
  if cfg.num_experts and cfg.mlp_dim:  # the router, and the experts a token is sent to
    mlp += cfg.d_model * cfg.num_experts + (cfg.experts_per_token - 1) * 3 * cfg.d_model * cfg.mlp_dim
  mixers = sum(kind.matmul_params(cfg) for kind in cfg.kinds)
  return mixers + cfg.num_layers * mlp + cfg.d_model * cfg.vocab_size


def train_flops_per_token(cfg: DecoderConfig, seq_len: int) -> float:
  """Forward plus backward FLOPs of one token: 6 per matmul weight, plus each layer's other
  FLOPs as its kind counts them (LayerKind.flops_per_token: attention's scores over the keys a
  query may see, as in PaLM's MFU; a scan's work)."""
  return 6 * matmul_params(cfg) + sum(kind.flops_per_token(cfg, seq_len) for kind in cfg.kinds)
