"""What every layer shares: parameter initialisers with logical axis names, norms, rotary
positions, the visibility rule of causal and sliding-window attention, fused projections, the
remat policies and the per-block parameter and attention FLOP counts."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp


INIT_STD = 0.02


REMAT_POLICIES = {'full': None,  # keep only each block's input
                  'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def block_matmul_params(d_model: int, kv_width: int, mlp: str, mlp_dim: int) -> int:
  """Weights of one attention + dense MLP block that take part in a matmul per token:
  query and output D x D, key and value D x kv_width, MLP 2 (3 gated: SwiGLU, GeGLU) x D x F."""
  gated = mlp in ('swiglu', 'geglu')
  return 2 * d_model * (d_model + kv_width) + (3 if gated else 2) * d_model * mlp_dim


def attention_flops_per_token(keys: int, num_heads: int, head_dim: int) -> int:
  """Training FLOPs of one query's scores and weighted values over `keys` keys: 2 matmuls of
  keys x Dh per head, 2 FLOPs a multiply-add forward and twice that backward (12 in all)."""
  return 12 * keys * num_heads * head_dim


def normal(axes: tuple[str | None, ...], std: float = INIT_STD):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class NoDecay(nn.LogicallyPartitioned):
  """The box of a parameter that weight decay leaves alone: biases and norm scales (and a scan
  layer's A_log, D and dt bias). Every other parameter decays."""


def no_decay(init, axes: tuple[str | None, ...]):
  """`init` whose parameter carries logical axes `axes` and the NoDecay tag."""
  return lambda *args: NoDecay(init(*args), axes)


class Matrix(nn.LogicallyPartitioned):
  """The box of a hidden weight matrix, which train.optimizer='muon' orthogonalises: the kernels
  of attention's and the MLPs' projections and of the scan layers' input and output projections
  (not embeddings, heads, routers, convolutions or a scan's own parameters, which AdamW keeps).
  Its first `inputs` axes other than MATRIX_BATCH_AXES are the side it multiplies (the
  reduction); the rest are its outputs."""
  inputs: int = flax.struct.field(default=1, pytree_node=False)


MATRIX_BATCH_AXES = ('layers', 'experts')  # stacked layers (nn.scan), experts: apart


def matrix(axes: tuple[str | None, ...], std: float = INIT_STD, inputs: int = 1):
  """normal(axes, std) for a hidden weight matrix: the same values, in a Matrix box."""
  init = nn.initializers.normal(std)
  return lambda *args: Matrix(init(*args), axes, inputs=inputs)


def matrix_axes(boxed_params: Any) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]] | None]:
  """'path/to/param' -> (its input axes, its output axes) if it is a Matrix, else None."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  out = {}
  for path, box in jax.tree_util.tree_leaves_with_path(boxed_params, is_leaf=is_box):
    if isinstance(box, Matrix):
      own = [i for i, name in enumerate(box.names) if name not in MATRIX_BATCH_AXES]
      out[param_name(path)] = (tuple(own[:box.inputs]), tuple(own[box.inputs:]))
    else:
      out[param_name(path)] = None
  return out


def decays(boxed_params: Any) -> dict[str, bool]:
  """'path/to/param' -> whether weight decay applies to it, from the boxes of an init."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return {param_name(path): not isinstance(box, NoDecay)
          for path, box in jax.tree_util.tree_leaves_with_path(boxed_params, is_leaf=is_box)}


def param_name(path: tuple) -> str:
  """'block_0/attn/query/kernel': the dict keys of a parameter's path, boxed or not."""
  return '/'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def zeros(axes: tuple[str | None, ...]):
  """Biases: zeros, not decayed."""
  return no_decay(nn.initializers.zeros_init(), axes)


def norm(kind: str, eps: float, dtype, name: str) -> nn.Module:
  """`layernorm` (scale and bias) or `rmsnorm` (scale only), over the last axis; not decayed."""
  scale_init = no_decay(nn.initializers.ones_init(), ('embed',))
  if kind == 'rmsnorm':
    return nn.RMSNorm(epsilon=eps, dtype=dtype, scale_init=scale_init, name=name)
  return nn.LayerNorm(epsilon=eps, dtype=dtype, scale_init=scale_init,
                      bias_init=zeros(('embed',)), name=name)


def residual(x_BxTxD: jax.Array, sublayer, norm: nn.Module, post_norm: bool) -> jax.Array:
  """A sublayer added to the residual stream: normalised after the sum (post-norm: the original
  transformer, BERT) or its input normalised (pre-norm)."""
  return norm(x_BxTxD + sublayer(x_BxTxD)) if post_norm else x_BxTxD + sublayer(norm(x_BxTxD))


def rope(x_BxTxHxDh: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, in the half-split layout of Llama and Hugging Face: dimension
  i and i + Dh/2 form a pair rotated by position * theta^(-2i/Dh). `positions` is [T] or, a
  position per row, [B, T]."""
  half = x_BxTxHxDh.shape[-1] // 2
  freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2 / x_BxTxHxDh.shape[-1])
  angle_Tx1xF = (positions.astype(jnp.float32)[..., None] * freq_F)[..., None, :]
  cos, sin = jnp.cos(angle_Tx1xF), jnp.sin(angle_Tx1xF)
  x1, x2 = x_BxTxHxDh[..., :half].astype(jnp.float32), x_BxTxHxDh[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxDh.dtype)


def sinusoids(positions: jax.Array, width: int) -> jax.Array:
  """The original transformer's positions (Vaswani et al. 2017): channel 2i of position p is
  sin(p / 10000^(2i / width)), channel 2i + 1 its cos. positions [...] -> [..., width]."""
  freq = 10000.0 ** (-jnp.arange(0, width, 2, dtype=jnp.float32) / width)
  angle = positions.astype(jnp.float32)[..., None] * freq
  return jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(*positions.shape, -1)[..., :width]


def visible(t: jax.Array, s: jax.Array, window: int | None) -> jax.Array:
  """Whether a query at position t sees the key at position s: s <= t, within the window."""
  return (s <= t) & ((t - s < window) if window is not None else True)


class DenseParams(nn.Module):
  """The parameters of a projection to `features` (an int, or a shape as nn.Einsum's):
  `kernel` [in_features, *features] and `bias` [*features], for a caller that fuses several
  projections of one input into one matmul. `axes` names the kernel's axes."""
  features: int | tuple[int, ...]
  use_bias: bool
  axes: tuple[str, ...]

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    kernel = self.param('kernel', matrix(self.axes), (in_features, *features))
    bias = self.param('bias', zeros(self.axes[1:]), features) if self.use_bias else None
    return kernel, bias


def fused_projection(x_BxTxD: jax.Array, params: list[tuple[jax.Array, jax.Array | None]],
                     dtype) -> jax.Array:
  """x times several projections' kernels ([D, *features] each, from DenseParams) side by side
  on their first feature axis, in one matmul, plus their biases: [B, T, sum of features[0],
  *features[1:]]."""
  kernel = jnp.concatenate([kernel for kernel, _ in params], axis=1).astype(dtype)
  y = jnp.einsum('btd,d...->bt...', x_BxTxD.astype(dtype), kernel)
  if params[0][1] is not None:
    y = y + jnp.concatenate([bias for _, bias in params]).astype(dtype)
  return y
