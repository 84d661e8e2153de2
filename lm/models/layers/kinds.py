"""The layer kinds a decoder mixes by model.layer_pattern, one letter each: LAYER_KINDS[letter]
-> LayerKind. A kind is registered here once, with everything the decoder asks of it; the
decoder branches on no letter.

  G  attention       causal self-attention over every earlier position
  L  window          causal self-attention over the last model.window positions
  M  mamba           Mamba-1's selective SSM (ssm.MambaMixer)
  S  s4d             S4D, a linear time-invariant diagonal SSM (ssm.S4DMixer)
  D  mamba2          Mamba-2, the state-space duality layer (mamba2.Mamba2Mixer)

A new kind is one file under lm/models/layers/ (its mixer, its empty decoding state, its FLOP
count, its own config keys as a frozen dataclass) and one entry below.

Every mixer follows one contract (`Mixer`), in training and in decoding alike; every decoding
state follows `LayerState` (kv_cache.KVCache, ssm.ScanState). The kinds read the model config
by the common keys (lm.config.ModelConfig: d_model, num_heads, dtype, ...), the decoder's
`window`, and the keys their own dataclass declares; they know no family. A parameter that
takes no weight decay says so where it is declared (common.no_decay), in the kind's file.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.errors import require
from lm.models.layers import attention, common, kv_cache, mamba2, ssm


class Mixer(Protocol):
  """A layer's token mixer. `state` None (training): returns (y_BxTxD, None). With a decoding
  state: the T new columns start at column `index`, row b's tokens begin at column start_B[b]
  (left padding before it is never seen), and it returns the state after them. Packed
  training rows pass `segment_ids_BxT` (nothing crosses a segment) and `positions_BxT` (each
  token's position in its segment). An attending kind's mixer with model.value_residual also
  takes `first_values_BxTxKxDh` and returns its own values third (attention.Attention)."""

  def __call__(self, h_BxTxD: jax.Array, state: Any = None, *, index: jax.Array | int = 0,
               start_B: jax.Array | None = None, segment_ids_BxT: jax.Array | None = None,
               positions_BxT: jax.Array | None = None) -> tuple[jax.Array, Any]: ...


class LayerState(Protocol):
  """A layer's decoding state (a pytree): `take_rows` keeps rows rows_N of a batch of `batch`
  rows; `reorder` makes beam j of prompt p continue beam parent_PxR[p, j]."""

  def take_rows(self, rows_N: jax.Array, batch: int) -> LayerState: ...

  def reorder(self, parent_PxR: jax.Array, index: jax.Array) -> LayerState: ...


@dataclasses.dataclass(frozen=True)
class LayerKind:
  name: str  # what the docs, the Hugging Face modules and the errors call it
  description: str
  mixer: Callable[[Any, float], nn.Module]  # (model cfg, out_std) -> its Mixer, named as the
                                            # scope of its parameters
  init_state: Callable[[Any, int, int], LayerState]  # (cfg, batch, max_len) -> empty state
  matmul_params: Callable[[Any], int]  # (cfg) -> weights its mixer multiplies a token by
  flops_per_token: Callable[[Any, int], float]  # (cfg, seq_len) -> its other training FLOPs
                                                # a token (attention's scores, a scan's work)
  attends: bool = False  # attention: needs positions, a state that grows up to max_len
  windowed: bool = False  # sees only its last model.window positions
  norm: str = 'mixer_norm'  # the name of the pre-norm before it
  keys: tuple[type, ...] = ()  # frozen dataclasses of the config keys it reads beyond the
                              # common ones (DecoderConfig's bases)
  validate: Callable[[Any, int | None], None] = lambda cfg, seq_len: None  # ConfigError


def _attention(window: bool) -> Callable[[Any, float], nn.Module]:
  def make(cfg, out_std: float) -> nn.Module:
    return attention.Attention(
        cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.use_bias,
        cfg.rope_theta if cfg.positions == 'rope' else 0.0, cfg.window if window else None,
        jnp.dtype(cfg.dtype), out_std, qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
        value_residual=cfg.value_residual, name='attn')
  return make


def _kv_cache(window: bool) -> Callable[[Any, int, int], LayerState]:
  return lambda cfg, batch, max_len: kv_cache.init_kv_cache(
      batch, max_len, cfg.kv_heads, cfg.head_dim, cfg.window if window else None,
      jnp.dtype(cfg.dtype))


def _validate_window(cfg, seq_len: int | None) -> None:
  """A pattern that names L needs a window (the default pattern '', all L, without a window is
  full causal attention)."""
  require(cfg.window is not None or not cfg.layer_pattern, 'model.layer_pattern',
          cfg.layer_pattern,
          'local (L) layers need model.window; set it, or use only G')


def _attention_matmul_params(cfg) -> int:
  return common.block_matmul_params(cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.mlp, 0)


def _scores(window: bool) -> Callable[[Any, int], float]:
  """Attention's scores and weighted values over every key a query may see (seq_len, or the
  window), as in PaLM's MFU: not halved for causality."""
  def flops(cfg, seq_len: int) -> float:
    keys = min(seq_len, cfg.window) if window and cfg.window is not None else seq_len
    return common.attention_flops_per_token(keys, cfg.num_heads, cfg.head_dim)
  return flops


LAYER_KINDS: dict[str, LayerKind] = {
    'G': LayerKind('attention', 'global attention', _attention(False), _kv_cache(False),
                   _attention_matmul_params, _scores(False), attends=True, norm='attn_norm'),
    'L': LayerKind('window', 'sliding-window attention (model.window)', _attention(True),
                   _kv_cache(True), _attention_matmul_params, _scores(True), attends=True,
                   windowed=True, norm='attn_norm', validate=_validate_window),
    'M': LayerKind('mamba', 'Mamba (selective SSM)', ssm.mamba_mixer, ssm.mamba_state,
                   ssm.mamba_matmul_params, ssm.mamba_scan_flops, keys=(ssm.ScanKeys,),
                   validate=ssm.validate_mamba),
    'S': LayerKind('s4d', 'S4D (linear time-invariant SSM)', ssm.s4d_mixer, ssm.s4d_state,
                   ssm.s4d_matmul_params, ssm.s4d_scan_flops, keys=(ssm.ScanKeys,),
                   validate=ssm.validate_s4d),
    'D': LayerKind('mamba2', 'Mamba-2 (state-space duality)', mamba2.mixer, mamba2.init_state,
                   mamba2.matmul_params, mamba2.scan_flops,
                   keys=(ssm.ScanKeys, mamba2.Mamba2Keys), validate=mamba2.validate),
}


def config_keys() -> tuple[type, ...]:
  """The kinds' key dataclasses, each once, in registry order: the bases of DecoderConfig."""
  out = []
  for kind in LAYER_KINDS.values():
    out += [keys for keys in kind.keys if keys not in out]
  return tuple(out)


def describe() -> str:
  return ', '.join(f'{letter} {kind.description}' for letter, kind in LAYER_KINDS.items())
