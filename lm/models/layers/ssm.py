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

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models.layers.common import INIT_STD, normal, no_decay, zeros


# --- the selective scan ---------------------------------------------------------------------

def _combine(left, right):
  """(a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2."""
  a1, b1 = left
  a2, b2 = right
  return a1 * a2, a2 * b1 + b2


def _parallel(u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN, C_BxTxN, h_BxIxN):
  dA_BxTxIxN = jnp.exp(dt_BxTxI[..., None] * A_IxN)
  dBu_BxTxIxN = (dt_BxTxI * u_BxTxI)[..., None] * B_BxTxN[:, :, None, :]
  dBu_BxTxIxN = dBu_BxTxIxN.at[:, 0].add(dA_BxTxIxN[:, 0] * h_BxIxN)
  _, h_BxTxIxN = jax.lax.associative_scan(_combine, (dA_BxTxIxN, dBu_BxTxIxN), axis=1)
  y_BxTxI = jnp.einsum('btin,btn->bti', h_BxTxIxN, C_BxTxN)
  return y_BxTxI, h_BxTxIxN[:, -1]


def _sequential(u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN, C_BxTxN, h_BxIxN):
  def step(h_BxIxN, inputs):
    u_BxI, dt_BxI, B_BxN, C_BxN = inputs
    h_BxIxN = (jnp.exp(dt_BxI[..., None] * A_IxN) * h_BxIxN
               + (dt_BxI * u_BxI)[..., None] * B_BxN[:, None, :])
    return h_BxIxN, jnp.einsum('bin,bn->bi', h_BxIxN, C_BxN)
  time_major = lambda x: jnp.swapaxes(x, 0, 1)
  h_BxIxN, y_TxBxI = jax.lax.scan(step, h_BxIxN, tuple(map(time_major, (
      u_BxTxI, dt_BxTxI, B_BxTxN, C_BxTxN))))
  return time_major(y_TxBxI), h_BxIxN


def _chunked(u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN, C_BxTxN, h_BxIxN, chunk: int):
  batch, length = u_BxTxI.shape[:2]
  chunks = length // chunk
  split = lambda x: jnp.swapaxes(x.reshape(batch, chunks, chunk, *x.shape[2:]), 0, 1)

  @jax.checkpoint  # the backward pass recomputes a chunk's [B, c, I, N] instead of storing it
  def step(h_BxIxN, inputs):
    y_BxCxI, h_BxIxN = _parallel(*inputs[:2], A_IxN, *inputs[2:], h_BxIxN)
    return h_BxIxN, y_BxCxI
  h_BxIxN, y_KxBxCxI = jax.lax.scan(step, h_BxIxN, tuple(map(split, (
      u_BxTxI, dt_BxTxI, B_BxTxN, C_BxTxN))))
  return jnp.swapaxes(y_KxBxCxI, 0, 1).reshape(u_BxTxI.shape), h_BxIxN


def selective_scan(u_BxTxI: jax.Array, dt_BxTxI: jax.Array, A_IxN: jax.Array,
                   B_BxTxN: jax.Array, C_BxTxN: jax.Array, h_BxIxN: jax.Array | None = None, *,
                   scan: str = 'chunked', chunk: int = 64) -> tuple[jax.Array, jax.Array]:
  """y_BxTxI and the final state h_BxIxN of h_t = exp(dt_t A) h_{t-1} + (dt_t u_t) B_t,
  y_t = h_t C_t (channel i of u, dt and h; B_t and C_t shared by the channels), from h_0
  (zeros if None). In float32. `chunked` pads a length that `chunk` does not divide with steps
  of dt = 0, which leave the state as it is."""
  f32 = lambda x: x.astype(jnp.float32)
  u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN, C_BxTxN = map(f32, (u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN,
                                                      C_BxTxN))
  batch, length, inner = u_BxTxI.shape
  if h_BxIxN is None:
    h_BxIxN = jnp.zeros((batch, inner, A_IxN.shape[1]), jnp.float32)
  args = (u_BxTxI, dt_BxTxI, A_IxN, B_BxTxN, C_BxTxN, f32(h_BxIxN))
  if scan == 'sequential' or length == 1:
    return _sequential(*args)
  if scan == 'parallel':
    return _parallel(*args)
  if scan != 'chunked':
    raise ValueError(f'scan={scan!r}: use sequential, parallel or chunked')
  chunk = min(chunk, length)
  pad = -length % chunk
  if pad:
    widen = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    args = (*map(widen, args[:2]), A_IxN, *map(widen, args[3:5]), args[5])
  y_BxTxI, h_BxIxN = _chunked(*args, chunk=chunk)
  return y_BxTxI[:, :length], h_BxIxN


# --- the causal depthwise convolution -------------------------------------------------------

def causal_conv(x_BxTxI: jax.Array, kernel_KxI: jax.Array, window_BxWxI: jax.Array | None = None):
  """y_t = sum_k kernel[k] * x_{t - (K - 1) + k}, per channel, the inputs before t = 0 taken
  from window_BxWxI (the last W = K - 1 inputs before this call; zeros if None). Returns y and
  the new window."""
  taps = kernel_KxI.shape[0]
  batch, length, inner = x_BxTxI.shape
  if window_BxWxI is None:
    window_BxWxI = jnp.zeros((batch, taps - 1, inner), x_BxTxI.dtype)
  full_BxWTxI = jnp.concatenate([window_BxWxI.astype(x_BxTxI.dtype), x_BxTxI], axis=1)
  y_BxTxI = sum(full_BxWTxI[:, k:k + length] * kernel_KxI[k] for k in range(taps))
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


def s4d_real_log_a(key, shape, dtype=jnp.float32):
  """A_log with A = -exp(A_log) = -(1, 2, ..., N) in every channel (S4D-Real)."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=dtype)), shape)


def mask_padding(x_BxTxC: jax.Array, valid_BxT: jax.Array | None) -> jax.Array:
  return x_BxTxC if valid_BxT is None else jnp.where(valid_BxT[..., None], x_BxTxC, 0)


class MambaMixer(nn.Module):
  """Mamba-1's selective SSM mixer, as the paper and transformers' MambaMixer:
  in_proj D -> 2I (x and the gate z); depthwise causal conv1d over d_conv steps (with bias) and
  SiLU; x_proj I -> (dt of rank R, B and C of N each); dt_proj R -> I and softplus;
  A = -exp(A_log); the selective scan of exp(dt A) and dt B x; y + D x; times SiLU(z); out_proj
  I -> D. Initialised as Mamba: A_log = log(1..N), D = 1, the dt bias the inverse softplus of
  a log-uniform dt in [dt_min, dt_max], dt_proj's kernel uniform in +-R^-0.5.

  Training: x_BxTxD -> y_BxTxD. Decoding, with `state` {'conv': [B, d_conv - 1, I],
  'ssm': [B, I, N]}: also the state after these T tokens. `valid_BxT` False marks left
  padding, which never enters the state."""
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
  def __call__(self, x_BxTxD: jax.Array, state: dict | None = None,
               valid_BxT: jax.Array | None = None):
    d_model, inner, n, rank = x_BxTxD.shape[-1], self.inner, self.state_size, self.dt_rank
    dense = lambda features, axes, name, **kw: nn.Dense(
        features, dtype=self.dtype, name=name, kernel_init=kw.pop('init', normal(axes)),
        bias_init=zeros(axes[1:]), **kw)
    xz_BxTx2I = dense(2 * inner, ('embed', 'inner'), 'in_proj', use_bias=self.use_bias)(x_BxTxD)
    u_BxTxI = mask_padding(xz_BxTx2I[..., :inner], valid_BxT)
    z_BxTxI = xz_BxTx2I[..., inner:]
    bound = 1 / math.sqrt(self.d_conv)  # PyTorch's Conv1d default: fan-in d_conv
    kernel_KxI = self.param('conv_kernel', nn.with_logical_partitioning(
        _uniform(bound), ('conv', 'inner')), (self.d_conv, inner))
    u_BxTxI, window = causal_conv(u_BxTxI, kernel_KxI.astype(self.dtype),
                                  None if state is None else state['conv'])
    if self.conv_bias:
      u_BxTxI = u_BxTxI + self.param('conv_bias', zeros(('inner',)), (inner,)).astype(self.dtype)
    u_BxTxI = mask_padding(nn.silu(u_BxTxI), valid_BxT)
    u_BxTxI = nn.with_logical_constraint(u_BxTxI, ('batch', 'length', 'inner'))
    dbc_BxTxRN2 = dense(rank + 2 * n, ('inner', None), 'x_proj', use_bias=False)(u_BxTxI)
    dt_BxTxR, B_BxTxN, C_BxTxN = jnp.split(dbc_BxTxRN2, [rank, rank + n], axis=-1)
    dt_kernel = self.param('dt_kernel', nn.with_logical_partitioning(
        _uniform(rank ** -0.5), ('dt_rank', 'inner')), (rank, inner))
    dt_bias = self.param('dt_bias', no_decay(
        lambda key, shape: inverse_softplus(log_uniform_dt(self.dt_min, self.dt_max)(key, shape)),
        ('inner',)), (inner,))
    dt_BxTxI = jax.nn.softplus(
        jnp.einsum('btr,ri->bti', dt_BxTxR.astype(jnp.float32), dt_kernel) + dt_bias)
    A_log = self.param('A_log', no_decay(s4d_real_log_a, ('inner', 'state')), (inner, n))
    D = self.param('D', no_decay(nn.initializers.ones_init(), ('inner',)), (inner,))
    y_BxTxI, h_BxIxN = selective_scan(
        u_BxTxI, dt_BxTxI, -jnp.exp(A_log), B_BxTxN, C_BxTxN,
        None if state is None else state['ssm'], scan=self.scan, chunk=self.chunk)
    y_BxTxI = (y_BxTxI + u_BxTxI.astype(jnp.float32) * D) * nn.silu(z_BxTxI.astype(jnp.float32))
    y_BxTxD = dense(d_model, ('inner', 'embed'), 'out_proj', use_bias=self.use_bias,
                    init=normal(('inner', 'embed'), self.out_std))(y_BxTxI.astype(self.dtype))
    return y_BxTxD if state is None else (y_BxTxD, {'conv': window, 'ssm': h_BxIxN})


def _uniform(bound: float):
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
  `state` {'ssm': [B, D, N]}; `valid_BxT` False marks left padding, which never enters it."""
  state_size: int
  dt_min: float = 0.001
  dt_max: float = 0.1
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  out_std: float = INIT_STD

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, state: dict | None = None,
               valid_BxT: jax.Array | None = None):
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
    if state is None:
      y_BxTxC = fft_causal_conv(u_BxTxC, s4d_kernel(dt_C, A_CxN, B, C, u_BxTxC.shape[1]))
    else:  # the recurrence: the same system, step by step
      Bbar_CxN = jnp.expm1(dt_C[:, None] * A_CxN) / A_CxN * B
      y_BxTxC, h_BxCxN = _lti_recurrence(u_BxTxC, dt_C, A_CxN, Bbar_CxN, C, state['ssm'])
      state = {'ssm': h_BxCxN}
    y_BxTxC = jax.nn.gelu(y_BxTxC + u_BxTxC * D)
    y_BxTxD = nn.Dense(channels, dtype=self.dtype, use_bias=self.use_bias, name='out_proj',
                       kernel_init=normal(('inner', 'embed'), self.out_std),
                       bias_init=zeros(('embed',)))(y_BxTxC.astype(self.dtype))
    return y_BxTxD if state is None else (y_BxTxD, state)


def _lti_recurrence(u_BxTxC, dt_C, A_CxN, Bbar_CxN, C_CxN, h_BxCxN):
  """The S4D recurrence h_t = exp(dt A) h_{t-1} + Bbar u_t, y_t = C . h_t, step by step."""
  dA_CxN = jnp.exp(dt_C[:, None] * A_CxN)

  def step(h_BxCxN, u_BxC):
    h_BxCxN = dA_CxN * h_BxCxN + u_BxC[..., None] * Bbar_CxN
    return h_BxCxN, jnp.einsum('bcn,cn->bc', h_BxCxN, C_CxN)
  h_BxCxN, y_TxBxC = jax.lax.scan(step, h_BxCxN.astype(jnp.float32), jnp.swapaxes(u_BxTxC, 0, 1))
  return jnp.swapaxes(y_TxBxC, 0, 1), h_BxCxN


def init_state(kind: str, batch: int, d_model: int, inner: int, state_size: int,
               d_conv: int, dtype=jnp.float32) -> dict:
  """The empty decoding state of a scan layer: `M` (Mamba) the conv window and the SSM state,
  `S` (S4D) the SSM state."""
  if kind == 'M':
    return {'conv': jnp.zeros((batch, d_conv - 1, inner), dtype),
            'ssm': jnp.zeros((batch, inner, state_size), jnp.float32)}
  return {'ssm': jnp.zeros((batch, d_model, state_size), jnp.float32)}


def mamba_flops_per_token(d_model: int, inner: int, state_size: int, d_conv: int,
                          dt_rank: int) -> int:
  """Training FLOPs (forward and backward, 3x the forward) of one token through a Mamba mixer:
  the projections (2 per weight: in 2DI, x (R + 2N) I, dt R I, out I D), the convolution
  (2 d_conv I) and the scan (per state: the exponential's product, the decay, dt B u, C h:
  about 8 I N)."""
  weights = 2 * d_model * inner + (dt_rank + 2 * state_size) * inner + dt_rank * inner \
      + inner * d_model
  return 3 * (2 * weights + 2 * d_conv * inner + 8 * inner * state_size)


def s4d_flops_per_token(d_model: int, state_size: int, seq_len: int) -> float:
  """Training FLOPs of one token through an S4D mixer: the output projection (2 D^2), and the
  FFT convolution (three FFTs of length 2T per channel, about 3 * 5 * 2T log2(2T) / T FLOPs a
  token each), times 3 for the backward pass."""
  fft = 3 * 5 * 2 * math.log2(2 * max(seq_len, 1)) * d_model
  return 3 * (2 * d_model * d_model + fft + 4 * d_model)
