"""Mamba-2: the state-space duality layer (Dao and Gu, 2024), layer kind `D`.

A multi-head SSM whose A is one scalar a head: head h (P channels, the head width) runs
`h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T`, `y_t = h_t C_t + D_h x_t`, a state of P x N a
head, with B_t and C_t of N states shared by the H / G heads of each of `ngroups` G groups and
one dt_t a head. A scalar decay makes the sequence map a masked matrix (the duality), so
training runs the chunked SSD algorithm: within a chunk of Q steps, matmuls (C B^T masked by
the decays, applied to dt x); across chunks, a scan of the chunk-end states. Decoding runs the
recurrence one token at a time from a state of fixed size (conv window and SSM state).

The mixer, as state-spaces/mamba's Mamba2Simple and transformers' Mamba2Mixer: in_proj D ->
(z: I, x: I, B: G N, C: G N, dt: H); a depthwise causal conv1d over x, B and C, and SiLU;
dt = softplus(dt + dt_bias); the SSM; y + D x; the gated RMSNorm, RMS(y * SiLU(z)) over each
group's I / G channels times a scale; out_proj I -> D. I = expand * d_model = H * P.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.errors import require
from lm.models.layers import ssm
from lm.models.layers.common import INIT_STD, matrix, no_decay, zeros


@dataclasses.dataclass(frozen=True)
class Mamba2Keys:
  """Mamba-2's own config keys (model.*); it also reads ssm.ScanKeys' state_size, d_conv,
  expand, dt_min, dt_max, conv_bias and scan_chunk."""
  ssm_head_dim: int = 64  # Mamba-2: P, the channels of a head (heads H = expand * d_model / P)
  ngroups: int = 1  # Mamba-2: G, the groups of heads that share B and C


def segsum(a_BxHxKxQ: jax.Array) -> jax.Array:
  """out[..., i, j] = a[..., j + 1] + ... + a[..., i] for j <= i (0 on the diagonal), -inf
  above it: the log-decay from step j to step i, summed without subtracting cumulative sums."""
  q = a_BxHxKxQ.shape[-1]
  below = jnp.tril(jnp.ones((q, q), bool), -1)
  terms = jnp.where(below, a_BxHxKxQ[..., :, None], 0.0)  # [.., i, j]: a_i where j < i
  sums = jnp.cumsum(terms, axis=-2)
  return jnp.where(jnp.tril(jnp.ones((q, q), bool)), sums, -jnp.inf)


def ssd(x_BxTxHxP: jax.Array, dt_BxTxH: jax.Array, A_H: jax.Array, B_BxTxGxN: jax.Array,
        C_BxTxGxN: jax.Array, h_BxHxPxN: jax.Array | None = None, *, chunk: int = 64,
        segment_ids_BxT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """y_BxTxHxP (without the D skip) and the final state h_BxHxPxN of the multi-head SSM, by
  chunks of `chunk` steps (a length it does not divide is padded with dt = 0 steps, which keep
  the state), from h_0 (zeros if None). In float32. With `segment_ids_BxT` (packed rows, their
  segments contiguous) nothing crosses from one segment to the next."""
  f32 = lambda v: v.astype(jnp.float32)
  x, dt, A, Bm, Cm = map(f32, (x_BxTxHxP, dt_BxTxH, A_H, B_BxTxGxN, C_BxTxGxN))
  batch, length, heads, p = x.shape
  groups, n = Bm.shape[2:]
  if h_BxHxPxN is None:
    h_BxHxPxN = jnp.zeros((batch, heads, p, n), jnp.float32)
  sid_BxT = (jnp.zeros((batch, length), jnp.int32) if segment_ids_BxT is None
             else segment_ids_BxT)
  q = min(chunk, length)
  pad = -length % q
  if pad:
    widen = lambda v: jnp.pad(v, ((0, 0), (0, pad)) + ((0, 0),) * (v.ndim - 2))
    x, dt, Bm, Cm = map(widen, (x, dt, Bm, Cm))
    sid_BxT = jnp.pad(sid_BxT, ((0, 0), (0, pad)), mode='edge')
  k = (length + pad) // q
  heads_of = lambda v: jnp.repeat(v, heads // groups, axis=2)  # group g serves heads g*H/G..
  split = lambda v: v.reshape(batch, k, q, *v.shape[2:])
  X = split(x * dt[..., None])  # [B, K, Q, H, P]: dt x
  Bc, Cc = split(heads_of(Bm)), split(heads_of(Cm))  # [B, K, Q, H, N]
  a_BxHxKxQ = jnp.moveaxis(split(dt * A), 3, 1)  # the log-decay of each step
  cum_BxHxKxQ = jnp.cumsum(a_BxHxKxQ, -1)
  sid_BxKxQ = split(sid_BxT)
  # within a chunk: y_l = sum_{s <= l} C_l . B_s exp(a_{s+1} + .. + a_l) X_s, one segment only
  same_BxKxQxQ = sid_BxKxQ[..., :, None] == sid_BxKxQ[..., None, :]
  L_BxHxKxQxQ = jnp.exp(segsum(a_BxHxKxQ)) * same_BxKxQxQ[:, None]
  y_diag = jnp.einsum('bklhn,bkshn,bhkls,bkshp->bklhp', Cc, Bc, L_BxHxKxQxQ, X)
  # each chunk's own contribution to its end state
  last_BxKx1 = sid_BxKxQ[..., -1:]
  to_end_BxHxKxQ = (jnp.exp(cum_BxHxKxQ[..., -1:] - cum_BxHxKxQ)
                    * (sid_BxKxQ == last_BxKx1)[:, None])
  states_BxKxHxPxN = jnp.einsum('bklhn,bhkl,bklhp->bkhpn', Bc, to_end_BxHxKxQ, X)
  # across chunks: the state entering chunk k, and whether it survives to chunk k's end
  before_BxK = jnp.concatenate([sid_BxKxQ[:, :1, 0], sid_BxKxQ[:, :-1, -1]], 1)
  carry_BxK = sid_BxKxQ[..., -1] == before_BxK  # no segment starts in chunk k
  decay_BxHxK = jnp.exp(cum_BxHxKxQ[..., -1]) * carry_BxK[:, None]

  def step(h_BxHxPxN, inputs):
    decay_BxH, state_BxHxPxN = inputs
    return decay_BxH[..., None, None] * h_BxHxPxN + state_BxHxPxN, h_BxHxPxN
  h_BxHxPxN, entering_KxBxHxPxN = jax.lax.scan(
      step, f32(h_BxHxPxN), (jnp.moveaxis(decay_BxHxK, 2, 0), jnp.moveaxis(states_BxKxHxPxN, 1, 0)))
  # the entering state's part of each output: C_l . h exp(a_1 + .. + a_l), its segment only
  from_start_BxHxKxQ = jnp.exp(cum_BxHxKxQ) * (sid_BxKxQ == before_BxK[..., None])[:, None]
  y_off = jnp.einsum('bklhn,kbhpn,bhkl->bklhp', Cc, entering_KxBxHxPxN, from_start_BxHxKxQ)
  y = (y_diag + y_off).reshape(batch, k * q, heads, p)[:, :length]
  return y, h_BxHxPxN


def ssd_step(x_BxHxP: jax.Array, dt_BxH: jax.Array, A_H: jax.Array, B_BxGxN: jax.Array,
             C_BxGxN: jax.Array, h_BxHxPxN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One step of the recurrence: (y_BxHxP without the D skip, the new state), float32."""
  heads, groups = x_BxHxP.shape[1], B_BxGxN.shape[1]
  Bh_BxHxN = jnp.repeat(B_BxGxN.astype(jnp.float32), heads // groups, axis=1)
  Ch_BxHxN = jnp.repeat(C_BxGxN.astype(jnp.float32), heads // groups, axis=1)
  dt_BxH = dt_BxH.astype(jnp.float32)
  h_BxHxPxN = (jnp.exp(dt_BxH * A_H)[..., None, None] * h_BxHxPxN
               + (dt_BxH[..., None] * x_BxHxP.astype(jnp.float32))[..., None]
               * Bh_BxHxN[:, :, None, :])
  return jnp.einsum('bhpn,bhn->bhp', h_BxHxPxN, Ch_BxHxN), h_BxHxPxN


class Mamba2Mixer(nn.Module):
  """The Mamba-2 mixer (the module docstring), a Mixer (lm.models.layers.kinds): x_BxTxD ->
  (y_BxTxD, state), the state an ssm.ScanState of the conv window [B, d_conv - 1, I + 2 G N]
  and the SSM state [B, I, N] (head h's P x N in channels h P .. h P + P - 1). Initialised as
  Mamba-2: A_log = log(1..H), D = 1, the dt bias the inverse softplus of a log-uniform dt in
  [dt_min, dt_max] (at least 1e-4), the conv kernel uniform in +-d_conv^-0.5, the norm's
  scale 1. Left padding never enters the state; packed segments restart it."""
  inner: int
  state_size: int
  head_dim: int
  ngroups: int
  d_conv: int
  use_bias: bool = False
  conv_bias: bool = True
  dt_min: float = 0.001
  dt_max: float = 0.1
  chunk: int = 64
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  out_std: float = INIT_STD

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, state: ssm.ScanState | None = None, *,
               index: jax.Array | int = 0, start_B: jax.Array | None = None,
               segment_ids_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None):
    del positions_BxT  # the scan orders the tokens itself
    batch, length, d_model = x_BxTxD.shape
    inner, n, g, p = self.inner, self.state_size, self.ngroups, self.head_dim
    heads, conv_dim = inner // p, inner + 2 * g * n
    valid_BxT = ssm.valid_columns(length, index, start_B)
    zxbcdt = nn.Dense(2 * inner + 2 * g * n + heads, use_bias=self.use_bias, dtype=self.dtype,
                      name='in_proj', kernel_init=matrix(('embed', None)),
                      bias_init=zeros((None,)))(x_BxTxD)
    z_BxTxI, xbc_BxTxC, dt_BxTxH = jnp.split(zxbcdt, [inner, inner + conv_dim], axis=-1)
    kernel_KxC = self.param('conv_kernel', nn.with_logical_partitioning(
        ssm.uniform(1 / math.sqrt(self.d_conv)), ('conv', None)), (self.d_conv, conv_dim))
    xbc_BxTxC, window = ssm.causal_conv(ssm.mask_padding(xbc_BxTxC, valid_BxT),
                                        kernel_KxC.astype(self.dtype),
                                        None if state is None else state.conv, segment_ids_BxT)
    if self.conv_bias:
      xbc_BxTxC = xbc_BxTxC + self.param('conv_bias', zeros((None,)), (conv_dim,)).astype(
          self.dtype)
    xbc_BxTxC = ssm.mask_padding(nn.silu(xbc_BxTxC), valid_BxT)
    u_BxTxI, B_BxTxGN, C_BxTxGN = jnp.split(xbc_BxTxC, [inner, inner + g * n], axis=-1)
    dt_bias = self.param('dt_bias', no_decay(ssm.dt_bias_init(self.dt_min, self.dt_max), (None,)),
                         (heads,))
    A_log = self.param('A_log', no_decay(ssm.s4d_real_log_a, (None,)), (heads,))  # log(1..H)
    D = self.param('D', no_decay(nn.initializers.ones_init(), (None,)), (heads,))
    dt_BxTxH = jax.nn.softplus(dt_BxTxH.astype(jnp.float32) + dt_bias)
    A_H = -jnp.exp(A_log)
    u_BxTxHxP = u_BxTxI.reshape(batch, length, heads, p)
    B_BxTxGxN = B_BxTxGN.reshape(batch, length, g, n)
    C_BxTxGxN = C_BxTxGN.reshape(batch, length, g, n)
    h0 = None if state is None else state.ssm.reshape(batch, heads, p, n)
    if state is not None and length == 1:  # a decode step: the recurrence
      y, h = ssd_step(u_BxTxHxP[:, 0], dt_BxTxH[:, 0], A_H, B_BxTxGxN[:, 0], C_BxTxGxN[:, 0],
                      h0)
      y_BxTxHxP = y[:, None]
    else:
      y_BxTxHxP, h = ssd(u_BxTxHxP, dt_BxTxH, A_H, B_BxTxGxN, C_BxTxGxN, h0, chunk=self.chunk,
                         segment_ids_BxT=segment_ids_BxT)
    y_BxTxHxP = y_BxTxHxP + u_BxTxHxP.astype(jnp.float32) * D[:, None]
    y_BxTxI = y_BxTxHxP.reshape(batch, length, inner) * nn.silu(z_BxTxI.astype(jnp.float32))
    y_BxTxGxI = y_BxTxI.reshape(batch, length, g, inner // g)  # RMS over each group
    y_BxTxGxI = y_BxTxGxI * jax.lax.rsqrt(jnp.mean(y_BxTxGxI ** 2, -1, keepdims=True)
                                          + self.norm_eps)
    scale_I = self.param('norm_scale', no_decay(nn.initializers.ones_init(), ('inner',)),
                         (inner,))
    y_BxTxI = nn.with_logical_constraint(y_BxTxGxI.reshape(batch, length, inner) * scale_I,
                                         ('batch', 'length', 'inner'))
    y_BxTxD = nn.Dense(d_model, use_bias=self.use_bias, dtype=self.dtype, name='out_proj',
                       kernel_init=matrix(('inner', 'embed'), self.out_std),
                       bias_init=zeros(('embed',)))(y_BxTxI.astype(self.dtype))
    if state is None:
      return y_BxTxD, None
    return y_BxTxD, ssm.ScanState(h.reshape(batch, inner, n), window)


# --- what the layer-kind registry asks (lm.models.layers.kinds) ----------------------------

def heads(cfg) -> int:
  return cfg.inner // cfg.ssm_head_dim


def mixer(cfg, out_std: float) -> Mamba2Mixer:
  return Mamba2Mixer(cfg.inner, cfg.state_size, cfg.ssm_head_dim, cfg.ngroups, cfg.d_conv,
                     cfg.use_bias, cfg.conv_bias, cfg.dt_min, cfg.dt_max, cfg.scan_chunk,
                     cfg.norm_eps, jnp.dtype(cfg.dtype), out_std, name='mamba2')


def init_state(cfg, batch: int, max_len: int) -> ssm.ScanState:
  """The empty decoding state: the SSM state [B, I, N] and the conv window
  [B, d_conv - 1, I + 2 G N], the same size at any max_len."""
  del max_len
  conv_dim = cfg.inner + 2 * cfg.ngroups * cfg.state_size
  return ssm.ScanState(
      nn.with_logical_constraint(jnp.zeros((batch, cfg.inner, cfg.state_size), jnp.float32),
                                 ('batch', 'inner', 'state')),
      nn.with_logical_constraint(jnp.zeros((batch, cfg.d_conv - 1, conv_dim),
                                           jnp.dtype(cfg.dtype)), ('batch', 'conv', None)))


def matmul_params(cfg) -> int:
  """in_proj D (2I + 2GN + H) and out_proj I D."""
  width = 2 * cfg.inner + 2 * cfg.ngroups * cfg.state_size + heads(cfg)
  return cfg.d_model * width + cfg.inner * cfg.d_model


def scan_flops(cfg, seq_len: int) -> float:
  """Training FLOPs (3x the forward) of one token through the convolution (2 d_conv (I + 2GN))
  and SSD with chunks of Q = min(scan_chunk, seq_len): within its chunk, the scores C . B over
  Q steps and their weighted sum of dt x (2 Q N + 2 Q P a head); the chunk state's share and
  the entering state's output (2 P N each a head)."""
  q = min(cfg.scan_chunk, seq_len)
  conv = 2 * cfg.d_conv * (cfg.inner + 2 * cfg.ngroups * cfg.state_size)
  per_head = 2 * q * (cfg.state_size + cfg.ssm_head_dim) + 4 * cfg.ssm_head_dim * cfg.state_size
  return 3 * (conv + heads(cfg) * per_head)


def validate(m, seq_len: int | None) -> None:
  """The keys Mamba-2 reads; errors name field, value, fix."""
  for key in ('state_size', 'd_conv', 'expand', 'ssm_head_dim', 'ngroups', 'scan_chunk'):
    require(getattr(m, key) >= 1, f'model.{key}', getattr(m, key), 'must be >= 1')
  require(m.inner % m.ssm_head_dim == 0, 'model.ssm_head_dim', m.ssm_head_dim,
          f'Mamba-2 splits its inner width expand * d_model = {m.inner} into heads of '
          f'ssm_head_dim channels: give a divisor of it, e.g. {math.gcd(m.inner, 64)}')
  require(heads(m) % m.ngroups == 0, 'model.ngroups', m.ngroups,
          f'the groups share B and C among the {heads(m)} heads: give a divisor of it')
  require(0 < m.dt_min < m.dt_max, 'model.dt_min', m.dt_min,
          f'the time step at init is drawn in [dt_min, dt_max={m.dt_max}]: give '
          '0 < dt_min < dt_max, e.g. 0.001 and 0.1')
