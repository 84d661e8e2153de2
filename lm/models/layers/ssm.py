"""State-space scan layers: the Mamba-1 selective SSM mixer and the linear time-invariant S4D.

Both run `h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t`, `y_t = C_t . h_t` per channel, with a
diagonal A of N states. Training runs the whole sequence at once (Mamba: a scan; S4D: the
causal convolution its fixed kernel implies, by FFT); decoding runs the recurrence one token at
a time from a state of fixed size, so a step costs the same at any position.

Three implementations of the selective scan (`scan`): `sequential` (jax.lax.scan, the
discretisation fused into each step, nothing of size [B, T, I, N] materialised), `parallel`
(jax.lax.associative_scan over [B, T, I, N]) and `chunked` (parallel within chunks of
`chunk` steps, sequential across them, each chunk recomputed in the backward pass).
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lm.errors import require
from lm.models.layers.common import INIT_STD, matrix, normal, no_decay, zeros

SCANS = ('sequential', 'parallel', 'chunked')


@dataclasses.dataclass(frozen=True)
class ScanKeys:
  """The config keys of the scan layers (model.*; the decoder's config inherits them)."""
  state_size: int = 16  # scan layers: N, the states per channel (Mamba-2: per head)
  d_conv: int = 4  # Mamba: the causal convolution's width
  expand: int = 2  # Mamba: inner width I = expand * d_model
  dt_rank: int = 0  # Mamba-1: the rank R of the time step's projection; 0: ceil(d_model / 16)
  dt_min: float = 0.001  # scan layers: the time step at init is log-uniform in [dt_min, dt_max]
  dt_max: float = 0.1
  conv_bias: bool = True  # Mamba: a bias in the convolution
  scan: str = 'sequential'  # Mamba-1's selective scan: sequential | parallel | chunked
  scan_chunk: int = 64  # chunked scans: steps a chunk (parallel within, sequential across)

  @property
  def inner(self) -> int:
    """Mamba's inner width I."""
    return self.expand * self.d_model

  @property
  def time_step_rank(self) -> int:
    return self.dt_rank or math.ceil(self.d_model / 16)


# --- the selective scan ---------------------------------------------------------------------

def _combine(left, right):
  """(a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2."""
  a1, b1 = left
  a2, b2 = right
  return a1 * a2, a2 * b1 + b2


def _parallel(u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN, C_BxTxN, h_BxIxN, keep_BxT):
  dA_BxTxIxN = jnp.exp(dt_BxTxI[..., None] * A_IxN) * keep_BxT[..., None, None]
  dBu_BxTxIxN = (dt_BxTxI * u_BxTxI)[..., None] * B_BxTxN[:, :, None, :]
  dBu_BxTxIxN = dBu_BxTxIxN.at[:, 0].add(dA_BxTxIxN[:, 0] * h_BxIxN)
  _, h_BxTxIxN = jax.lax.associative_scan(_combine, (dA_BxTxIxN, dBu_BxTxIxN), axis=1)
  y_BxTxI = jnp.einsum('btin,btn->bti', h_BxTxIxN, C_BxTxN)
  return y_BxTxI, h_BxTxIxN[:, -1]


def _time_major(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, 0, 1)


def _sequential_states(u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN, C_BxTxN, h_BxIxN, keep_BxT,
                       save: bool):
  """The recurrence step by step, the discretisation fused into each step: y, the final state
  and, if `save`, each step's state before its update, h_{t-1} ([T, B, I, N], for the
  backward pass)."""
  def step(h_BxIxN, inputs):
    u_BxI, dt_BxI, B_BxN, C_BxN, keep_B = inputs
    before_BxIxN = h_BxIxN
    h_BxIxN = (jnp.exp(dt_BxI[..., None] * A_IxN) * keep_B[:, None, None] * h_BxIxN
               + (dt_BxI * u_BxI)[..., None] * B_BxN[:, None, :])
    y_BxI = jnp.sum(h_BxIxN * C_BxN[:, None, :], -1)
    return h_BxIxN, ((y_BxI, before_BxIxN) if save else (y_BxI,))
  h_BxIxN, outputs = jax.lax.scan(step, h_BxIxN, tuple(map(_time_major, (
      u_BxTxI, dt_BxTxI, B_BxTxN, C_BxTxN, keep_BxT))))
  return (_time_major(outputs[0]), h_BxIxN, *outputs[1:])


@jax.custom_vjp
def _sequential(u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN, C_BxTxN, h_BxIxN, keep_BxT):
  return _sequential_states(u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN, C_BxTxN, h_BxIxN, keep_BxT,
                            False)


def _sequential_fwd(u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN, C_BxTxN, h_BxIxN, keep_BxT):
  y_BxTxI, h_BxIxN, before_TxBxIxN = _sequential_states(u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN,
                                                        C_BxTxN, h_BxIxN, keep_BxT, True)
  return (y_BxTxI, h_BxIxN), (u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN, C_BxTxN, keep_BxT,
                              before_TxBxIxN)


def _sequential_bwd(residuals, grads):
  """The backward pass as one reverse scan over the saved states: g_t = dL/dh_t flows back
  through exp(dt_{t+1} A); each step's gradients of u, dt, B and C, and A's summed. (jax's
  derivative of the scan stores exp(dt A) as well; how much slower: experiments/README.md.)"""
  u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN, C_BxTxN, keep_BxT, before_TxBxIxN = residuals
  dy_BxTxI, dh_BxIxN = grads

  def step(carry, inputs):
    g_BxIxN, dA_IxN = carry  # g: exp(dt_{t+1} A) dL/dh_{t+1}, the gradient reaching h_t
    u_BxI, dt_BxI, B_BxN, C_BxN, keep_B, dy_BxI, before_BxIxN = inputs
    a_BxIxN = jnp.exp(dt_BxI[..., None] * A_IxN) * keep_B[:, None, None]
    bu_BxIxN = u_BxI[..., None] * B_BxN[:, None, :]
    h_BxIxN = a_BxIxN * before_BxIxN + dt_BxI[..., None] * bu_BxIxN
    g_BxIxN = g_BxIxN + dy_BxI[..., None] * C_BxN[:, None, :]
    gah_BxIxN = g_BxIxN * a_BxIxN * before_BxIxN
    ddt_BxI = jnp.sum(gah_BxIxN * A_IxN + g_BxIxN * bu_BxIxN, -1)
    du_BxI = jnp.sum(g_BxIxN * B_BxN[:, None, :], -1) * dt_BxI
    dB_BxN = jnp.sum(g_BxIxN * (dt_BxI * u_BxI)[..., None], 1)
    dC_BxN = jnp.sum(h_BxIxN * dy_BxI[..., None], 1)
    dA_IxN = dA_IxN + jnp.sum(gah_BxIxN * dt_BxI[..., None], 0)
    return (g_BxIxN * a_BxIxN, dA_IxN), (du_BxI, ddt_BxI, dB_BxN, dC_BxN)
  inputs = tuple(map(_time_major, (u_BxTxI, dt_BxTxI, B_BxTxN, C_BxTxN, keep_BxT,
                                   dy_BxTxI))) + (before_TxBxIxN,)
  (dh0_BxIxN, dA_IxN), grads_T = jax.lax.scan(step, (dh_BxIxN, jnp.zeros_like(A_IxN)), inputs,
                                              reverse=True)
  du, ddt, dB, dC = map(_time_major, grads_T)
  return du, ddt, dA_IxN, dB, dC, dh0_BxIxN, jnp.zeros_like(keep_BxT)


_sequential.defvjp(_sequential_fwd, _sequential_bwd)


def _chunked(u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN, C_BxTxN, h_BxIxN, keep_BxT, chunk: int):
  batch, length = u_BxTxI.shape[:2]
  chunks = length // chunk
  split = lambda x: jnp.swapaxes(x.reshape(batch, chunks, chunk, *x.shape[2:]), 0, 1)

  @jax.checkpoint  # the backward pass recomputes a chunk's [B, c, I, N] instead of storing it
  def step(h_BxIxN, inputs):
    u, dt, B, C, keep = inputs
    y_BxCxI, h_BxIxN = _parallel(u, dt, A_IxN, B, C, h_BxIxN, keep)
    return h_BxIxN, y_BxCxI
  h_BxIxN, y_KxBxCxI = jax.lax.scan(step, h_BxIxN, tuple(map(split, (
      u_BxTxI, dt_BxTxI, B_BxTxN, C_BxTxN, keep_BxT))))
  return jnp.swapaxes(y_KxBxCxI, 0, 1).reshape(u_BxTxI.shape), h_BxIxN


def selective_scan(u_BxTxI: jax.Array, dt_BxTxI: jax.Array, A_IxN: jax.Array,
                   B_BxTxN: jax.Array, C_BxTxN: jax.Array, h_BxIxN: jax.Array | None = None, *,
                   scan: str = 'chunked', chunk: int = 64,
                   keep_BxT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """y_BxTxI and the final state h_BxIxN of h_t = exp(dt_t A) h_{t-1} + (dt_t u_t) B_t,
  y_t = h_t C_t (channel i of u, dt and h; B_t and C_t shared by the channels), from h_0
  (zeros if None). In float32. Where `keep_BxT` is False (a packed segment's first token) the
  state restarts: h_{t-1} is taken as 0. `chunked` pads a length that `chunk` does not divide
  with steps of dt = 0, which leave the state as it is."""
  f32 = lambda x: x.astype(jnp.float32)
  u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN, C_BxTxN = map(f32, (u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN,
                                                      C_BxTxN))
  batch, length, inner = u_BxTxI.shape
  if h_BxIxN is None:
    h_BxIxN = jnp.zeros((batch, inner, A_IxN.shape[1]), jnp.float32)
  keep_BxT = jnp.ones((batch, length), jnp.float32) if keep_BxT is None else f32(keep_BxT)
  args = (u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN, C_BxTxN, f32(h_BxIxN), keep_BxT)
  if scan == 'sequential' or length == 1:
    return _sequential(*args)
  if scan == 'parallel':
    return _parallel(*args)
  if scan != 'chunked':
    raise ValueError(f'scan={scan!r}: use sequential, parallel or chunked')
  chunk = min(chunk, length)
  pad = -length % chunk
  if pad:
    widen = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2),
                              constant_values=1 if x.ndim == 2 else 0)
    args = (*map(widen, args[:2]), A_IxN, *map(widen, args[3:5]), args[5], widen(args[6]))
  y_BxTxI, h_BxIxN = _chunked(*args, chunk=chunk)
  return y_BxTxI[:, :length], h_BxIxN


# --- decoding states -------------------------------------------------------------------------

@flax.struct.dataclass
class ScanState:
  """A scan layer's decoding state, the same size at any position: `ssm` [B, C, N] and, for
  Mamba, `conv` [B, d_conv - 1, I] (the convolution's last inputs; None for S4D). Scanned
  layers stack both on a leading axis."""
  ssm: jax.Array
  conv: jax.Array | None = None

  def take_rows(self, rows_N: jax.Array, batch: int) -> ScanState:
    del batch  # every array is [..., B, x, y]
    return jax.tree.map(lambda x: jnp.take(x, rows_N, axis=x.ndim - 3), self)

  def reorder(self, parent_PxR: jax.Array, index: jax.Array) -> ScanState:
    """Beam j of prompt p continues beam parent_PxR[p, j]: its row takes the parent's state."""
    del index
    prompts, beams = parent_PxR.shape
    return self.take_rows((jnp.arange(prompts)[:, None] * beams + parent_PxR).reshape(-1),
                          prompts * beams)


def mamba_state(cfg, batch: int, max_len: int) -> ScanState:
  """Mamba's empty decoding state: the conv window [B, d_conv - 1, I] and the SSM state
  [B, I, N], the same size at any max_len."""
  del max_len
  return ScanState(
      nn.with_logical_constraint(jnp.zeros((batch, cfg.inner, cfg.state_size), jnp.float32),
                                 ('batch', 'inner', 'state')),  # channels as the parameters'
      nn.with_logical_constraint(jnp.zeros((batch, cfg.d_conv - 1, cfg.inner),
                                           jnp.dtype(cfg.dtype)), ('batch', 'conv', 'inner')))


def s4d_state(cfg, batch: int, max_len: int) -> ScanState:
  """S4D's empty decoding state: the SSM state [B, D, N]."""
  del max_len
  return ScanState(nn.with_logical_constraint(
      jnp.zeros((batch, cfg.d_model, cfg.state_size), jnp.float32), ('batch', 'inner', 'state')))


# --- the causal depthwise convolution -------------------------------------------------------

def causal_conv(x_BxTxI: jax.Array, kernel_KxI: jax.Array, window_BxWxI: jax.Array | None = None,
                segment_ids_BxT: jax.Array | None = None):
  """y_t = sum_k kernel[k] * x_{t - (K - 1) + k}, per channel, the inputs before t = 0 taken
  from window_BxWxI (the last W = K - 1 inputs before this call; zeros if None); with
  `segment_ids_BxT`, only the inputs of t's own segment. Returns y and the new window."""
  taps = kernel_KxI.shape[0]
  batch, length, inner = x_BxTxI.shape
  if window_BxWxI is None:
    window_BxWxI = jnp.zeros((batch, taps - 1, inner), x_BxTxI.dtype)
  full_BxWTxI = jnp.concatenate([window_BxWxI.astype(x_BxTxI.dtype), x_BxTxI], axis=1)
  tap = lambda k: full_BxWTxI[:, k:k + length]
  if segment_ids_BxT is not None:  # (the window before t = 0 is zeros: any segment will do)
    ids_BxWT = jnp.pad(segment_ids_BxT, ((0, 0), (taps - 1, 0)), constant_values=-1)
    same = lambda k: (ids_BxWT[:, k:k + length] == segment_ids_BxT)[..., None]
    tap = lambda k, tap=tap: jnp.where(same(k), tap(k), 0)
  y_BxTxI = sum(tap(k) * kernel_KxI[k] for k in range(taps))
  return y_BxTxI, full_BxWTxI[:, full_BxWTxI.shape[1] - (taps - 1):]


# --- the layers -----------------------------------------------------------------------------

def inverse_softplus(x: jax.Array) -> jax.Array:
  return x + jnp.log(-jnp.expm1(-x))


def log_uniform_dt(dt_min: float, dt_max: float, floor: float = 1e-4):
  """Initialiser of a time step drawn log-uniformly in [dt_min, dt_max] (at least `floor`)."""
  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, dtype)
    return jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)),
                       floor)
  return init


def dt_bias_init(dt_min: float, dt_max: float):
  """Initialiser of a time step's bias: the inverse softplus of a log-uniform dt in
  [dt_min, dt_max] (Mamba's), so that softplus(bias) is that dt."""
  return lambda key, shape: inverse_softplus(log_uniform_dt(dt_min, dt_max)(key, shape))


def s4d_real_log_a(key, shape, dtype=jnp.float32):
  """A_log with A = -exp(A_log) = -(1, 2, ..., N) in every channel (S4D-Real)."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=dtype)), shape)


def segment_starts(segment_ids_BxT: jax.Array | None) -> jax.Array | None:
  """False at each token whose segment differs from the token before it (a packed row's
  segments), where a scan's state restarts; None without segments."""
  if segment_ids_BxT is None:
    return None
  return jnp.pad(segment_ids_BxT[:, 1:] == segment_ids_BxT[:, :-1], ((0, 0), (1, 0)),
                 constant_values=True)


def valid_columns(length: int, index: jax.Array | int,
                  start_B: jax.Array | None) -> jax.Array | None:
  """False at the left padding of T = length columns from column `index` (rows begin at
  start_B): padding never enters a scan's state. None without padding."""
  if start_B is None:
    return None
  return (index + jnp.arange(length))[None] >= start_B[:, None]


def mask_padding(x_BxTxC: jax.Array, valid_BxT: jax.Array | None) -> jax.Array:
  return x_BxTxC if valid_BxT is None else jnp.where(valid_BxT[..., None], x_BxTxC, 0)


class MambaMixer(nn.Module):
  """Mamba-1's selective SSM mixer, as the paper and transformers' MambaMixer:
  in_proj D -> 2I (x and the gate z); depthwise causal conv1d over d_conv steps (with bias) and
  SiLU; x_proj I -> (dt of rank R, B and C of N each); dt_proj R -> I and softplus;
  A = -exp(A_log); the selective scan of exp(dt A) and dt B x; y + D x; times SiLU(z); out_proj
  I -> D. Initialised as Mamba: A_log = log(1..N), D = 1, the dt bias the inverse softplus of
  a log-uniform dt in [dt_min, dt_max], dt_proj's kernel uniform in +-R^-0.5.

  A Mixer (lm.models.layers.kinds): x_BxTxD -> (y_BxTxD, state); the state a ScanState (conv
  [B, d_conv - 1, I], ssm [B, I, N]). Left padding never enters the state; `segment_ids_BxT`
  (packed rows) restart the state and the convolution at each segment."""
  inner: int
  state_size: int
  d_conv: int
  dt_rank: int
  use_bias: bool = False
  conv_bias: bool = True
  dt_min: float = 0.001
  dt_max: float = 0.1
  scan: str = 'chunked'
  chunk: int = 64
  dtype: jnp.dtype = jnp.float32
  out_std: float = INIT_STD

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, state: ScanState | None = None, *,
               index: jax.Array | int = 0, start_B: jax.Array | None = None,
               segment_ids_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None):
    del positions_BxT  # the scan orders the tokens itself
    valid_BxT = valid_columns(x_BxTxD.shape[1], index, start_B)
    d_model, inner, n, rank = x_BxTxD.shape[-1], self.inner, self.state_size, self.dt_rank
    def dense(features: int, axes: tuple, name: str, use_bias: bool, std: float = INIT_STD,
              init=matrix):  # x_proj, the time step's and B's and C's, is the scan's: normal
      return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, name=name,
                      kernel_init=init(axes, std), bias_init=zeros(axes[1:]))
    xz_BxTx2I = dense(2 * inner, ('embed', 'inner'), 'in_proj', self.use_bias)(x_BxTxD)
    u_BxTxI = mask_padding(xz_BxTx2I[..., :inner], valid_BxT)
    z_BxTxI = xz_BxTx2I[..., inner:]
    bound = 1 / math.sqrt(self.d_conv)  # PyTorch's Conv1d default: fan-in d_conv
    kernel_KxI = self.param('conv_kernel', nn.with_logical_partitioning(
        uniform(bound), ('conv', 'inner')), (self.d_conv, inner))
    u_BxTxI, window = causal_conv(u_BxTxI, kernel_KxI.astype(self.dtype),
                                  None if state is None else state.conv, segment_ids_BxT)
    if self.conv_bias:
      u_BxTxI = u_BxTxI + self.param('conv_bias', zeros(('inner',)), (inner,)).astype(self.dtype)
    u_BxTxI = mask_padding(nn.silu(u_BxTxI), valid_BxT)
    u_BxTxI = nn.with_logical_constraint(u_BxTxI, ('batch', 'length', 'inner'))
    dbc_BxTxRN2 = dense(rank + 2 * n, ('inner', None), 'x_proj', False,
                        init=normal)(u_BxTxI)
    dt_BxTxR, B_BxTxN, C_BxTxN = jnp.split(dbc_BxTxRN2, [rank, rank + n], axis=-1)
    dt_kernel = self.param('dt_kernel', nn.with_logical_partitioning(
        uniform(rank ** -0.5), ('dt_rank', 'inner')), (rank, inner))
    dt_bias = self.param('dt_bias', no_decay(dt_bias_init(self.dt_min, self.dt_max), ('inner',)),
                         (inner,))
    dt_BxTxI = jax.nn.softplus(
        jnp.einsum('btr,ri->bti', dt_BxTxR.astype(jnp.float32), dt_kernel) + dt_bias)
    A_log = self.param('A_log', no_decay(s4d_real_log_a, ('inner', 'state')), (inner, n))
    D = self.param('D', no_decay(nn.initializers.ones_init(), ('inner',)), (inner,))
    y_BxTxI, h_BxIxN = selective_scan(
        u_BxTxI, dt_BxTxI, -jnp.exp(A_log), B_BxTxN, C_BxTxN,
        None if state is None else state.ssm, scan=self.scan, chunk=self.chunk,
        keep_BxT=segment_starts(segment_ids_BxT))
    y_BxTxI = (y_BxTxI + u_BxTxI.astype(jnp.float32) * D) * nn.silu(z_BxTxI.astype(jnp.float32))
    y_BxTxD = dense(d_model, ('inner', 'embed'), 'out_proj', self.use_bias,
                    self.out_std)(y_BxTxI.astype(self.dtype))
    return y_BxTxD, None if state is None else ScanState(h_BxIxN, window)


def uniform(bound: float):
  """Initialiser uniform in [-bound, bound]."""
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def s4d_kernel(dt_C: jax.Array, A_CxN: jax.Array, B_CxN: jax.Array, C_CxN: jax.Array,
               length: int) -> jax.Array:
  """The convolution kernel K[l, c] = sum_n C[c, n] Bbar[c, n] Abar[c, n]^l, l < length, of
  the zero-order-hold discretisation Abar = exp(dt A), Bbar = (Abar - 1) / A * B."""
  dA_CxN = dt_C[:, None] * A_CxN
  Bbar_CxN = jnp.expm1(dA_CxN) / A_CxN * B_CxN
  powers_LxCxN = jnp.exp(jnp.arange(length, dtype=jnp.float32)[:, None, None] * dA_CxN)
  return jnp.einsum('lcn,cn->lc', powers_LxCxN, C_CxN * Bbar_CxN)


def fft_causal_conv(u_BxTxC: jax.Array, kernel_TxC: jax.Array) -> jax.Array:
  """y_t = sum_{l <= t} kernel[l] u_{t - l} per channel, by FFT of length 2T (no wrap-around)."""
  length = u_BxTxC.shape[1]
  spectrum = (jnp.fft.rfft(u_BxTxC, 2 * length, axis=1)
              * jnp.fft.rfft(kernel_TxC, 2 * length, axis=0))
  return jnp.fft.irfft(spectrum, 2 * length, axis=1)[:, :length]


class S4DMixer(nn.Module):
  """S4D, the linear time-invariant diagonal SSM, one per model channel (S4D-Real: A real,
  -exp(A_log) initialised to -(1..N)): zero-order-hold discretisation Abar = exp(dt A),
  Bbar = (Abar - 1) / A * B, with a learned time step per channel (log-uniform in
  [dt_min, dt_max] at init); y = K * u + D u with the kernel K of `s4d_kernel` (FFT), then
  GELU and an output projection D -> D. Decoding runs the same system as a recurrence from
  a ScanState (ssm [B, D, N]); left padding never enters it. A Mixer
  (lm.models.layers.kinds)."""
  state_size: int
  dt_min: float = 0.001
  dt_max: float = 0.1
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  out_std: float = INIT_STD

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, state: ScanState | None = None, *,
               index: jax.Array | int = 0, start_B: jax.Array | None = None,
               segment_ids_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None):
    del positions_BxT  # the recurrence orders the tokens itself
    valid_BxT = valid_columns(x_BxTxD.shape[1], index, start_B)
    channels, n = x_BxTxD.shape[-1], self.state_size
    log_dt = self.param('log_dt', no_decay(
        lambda key, shape: jnp.log(log_uniform_dt(self.dt_min, self.dt_max)(key, shape)),
        ('embed',)), (channels,))
    A_log = self.param('A_log', no_decay(s4d_real_log_a, ('embed', 'state')), (channels, n))
    B = self.param('B', nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                     ('embed', 'state')), (channels, n))
    C = self.param('C', normal(('embed', 'state'), n ** -0.5), (channels, n))
    D = self.param('D', no_decay(nn.initializers.ones_init(), ('embed',)), (channels,))
    u_BxTxC = mask_padding(x_BxTxD.astype(jnp.float32), valid_BxT)
    dt_C, A_CxN = jnp.exp(log_dt), -jnp.exp(A_log)
    if state is None and segment_ids_BxT is None:
      y_BxTxC = fft_causal_conv(u_BxTxC, s4d_kernel(dt_C, A_CxN, B, C, u_BxTxC.shape[1]))
    else:  # the recurrence: the same system, step by step (restarting at each segment)
      Bbar_CxN = jnp.expm1(dt_C[:, None] * A_CxN) / A_CxN * B
      h_BxCxN = (jnp.zeros((u_BxTxC.shape[0], channels, n), jnp.float32) if state is None
                 else state.ssm)
      y_BxTxC, h_BxCxN = _lti_recurrence(u_BxTxC, dt_C, A_CxN, Bbar_CxN, C, h_BxCxN,
                                         segment_starts(segment_ids_BxT))
      state = None if state is None else ScanState(h_BxCxN)
    y_BxTxC = jax.nn.gelu(y_BxTxC + u_BxTxC * D)
    y_BxTxD = nn.Dense(channels, dtype=self.dtype, use_bias=self.use_bias, name='out_proj',
                       kernel_init=matrix(('inner', 'embed'), self.out_std),
                       bias_init=zeros(('embed',)))(y_BxTxC.astype(self.dtype))
    return y_BxTxD, state


def _lti_recurrence(u_BxTxC, dt_C, A_CxN, Bbar_CxN, C_CxN, h_BxCxN, keep_BxT=None):
  """The S4D recurrence h_t = exp(dt A) h_{t-1} + Bbar u_t, y_t = C . h_t, step by step
  (h_{t-1} taken as 0 where keep_BxT is False)."""
  dA_CxN = jnp.exp(dt_C[:, None] * A_CxN)
  if keep_BxT is None:
    keep_BxT = jnp.ones(u_BxTxC.shape[:2], bool)

  def step(h_BxCxN, inputs):
    u_BxC, keep_B = inputs
    h_BxCxN = dA_CxN * jnp.where(keep_B[:, None, None], h_BxCxN, 0) + u_BxC[..., None] * Bbar_CxN
    return h_BxCxN, jnp.einsum('bcn,cn->bc', h_BxCxN, C_CxN)
  h_BxCxN, y_TxBxC = jax.lax.scan(step, h_BxCxN.astype(jnp.float32),
                                  (jnp.swapaxes(u_BxTxC, 0, 1), jnp.swapaxes(keep_BxT, 0, 1)))
  return jnp.swapaxes(y_TxBxC, 0, 1), h_BxCxN


# --- what the layer-kind registry asks (lm.models.layers.kinds) --------------------------

def mamba_mixer(cfg, out_std: float) -> MambaMixer:
  return MambaMixer(cfg.inner, cfg.state_size, cfg.d_conv, cfg.time_step_rank, cfg.use_bias,
                    cfg.conv_bias, cfg.dt_min, cfg.dt_max, cfg.scan, cfg.scan_chunk,
                    jnp.dtype(cfg.dtype), out_std, name='mamba')


def s4d_mixer(cfg, out_std: float) -> S4DMixer:
  return S4DMixer(cfg.state_size, cfg.dt_min, cfg.dt_max, cfg.use_bias, jnp.dtype(cfg.dtype),
                  out_std, name='s4d')


def mamba_matmul_params(cfg) -> int:
  """Mamba's projections: in 2DI, x (R + 2N) I, dt R I, out I D."""
  inner, rank, n = cfg.inner, cfg.time_step_rank, cfg.state_size
  return 2 * cfg.d_model * inner + (rank + 2 * n) * inner + rank * inner + inner * cfg.d_model


def mamba_scan_flops(cfg, seq_len: int) -> int:
  """Training FLOPs (3x the forward) of one token through Mamba's convolution (2 d_conv I) and
  scan (per state: the exponential's product, the decay, dt B u, C h: about 8 I N)."""
  del seq_len
  return 3 * (2 * cfg.d_conv * cfg.inner + 8 * cfg.inner * cfg.state_size)


def s4d_matmul_params(cfg) -> int:
  """S4D's output projection D x D."""
  return cfg.d_model * cfg.d_model


def s4d_scan_flops(cfg, seq_len: int) -> float:
  """Training FLOPs of one token through S4D's FFT convolution (three FFTs of length 2T per
  channel, about 3 * 5 * 2T log2(2T) / T FLOPs a token each) and the rest (4 D), times 3 for
  the backward pass."""
  fft = 3 * 5 * 2 * math.log2(2 * max(seq_len, 1)) * cfg.d_model
  return 3 * (fft + 4 * cfg.d_model)


def validate_s4d(m, seq_len: int | None) -> None:
  """The keys S4D reads; errors name field, value, fix."""
  require(m.state_size >= 1, 'model.state_size', m.state_size, 'must be >= 1')
  require(0 < m.dt_min < m.dt_max, 'model.dt_min', m.dt_min,
          f'the time step at init is drawn in [dt_min, dt_max={m.dt_max}]: give '
          '0 < dt_min < dt_max, e.g. 0.001 and 0.1')


def validate_mamba(m, seq_len: int | None) -> None:
  """The keys Mamba reads, and with `seq_len` that the chunked scan splits it."""
  for key in ('state_size', 'd_conv', 'expand'):
    require(getattr(m, key) >= 1, f'model.{key}', getattr(m, key), 'must be >= 1')
  require(m.dt_rank >= 0, 'model.dt_rank', m.dt_rank,
          'the rank of the time step projection must be >= 1, or 0 for ceil(d_model / 16)')
  validate_s4d(m, seq_len)
  require(m.scan in SCANS, 'model.scan', m.scan, f'use one of {SCANS}')
  require(m.scan_chunk >= 1, 'model.scan_chunk', m.scan_chunk, 'must be >= 1')
  if seq_len is not None and m.scan == 'chunked':
    require(seq_len % min(m.scan_chunk, seq_len) == 0, 'model.scan_chunk', m.scan_chunk,
            f'the chunked scan splits data.seq_len={seq_len} into chunks: give a divisor of '
            f'it, e.g. {math.gcd(m.scan_chunk, seq_len)}')
