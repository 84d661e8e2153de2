"""What lm does differently by backend, in one place; most of it is for XLA:CPU:

- `import lm` sets XLA_FLAGS so that XLA:CPU runs float32 matmuls with Eigen, not YNNPACK
  (jaxlib 0.10-0.11's default): Eigen's run the train step faster on the CPUs measured
  (experiments/README.md, Train step). The flag only touches the CPU backend and takes effect
  if set before JAX starts one; a value of the user's own in XLA_FLAGS wins.
- `decoding_jit`: a decoding loop over at most 4 rows compiles with YNNPACK's matmuls on CPU
  (a decode step multiplies those rows by each weight matrix, which YNNPACK does faster; at 8
  rows Eigen's are faster: experiments/README.md, Sampling and Where lm trails).
- `is_cpu()`: the decoder lays out its weights for the CPU's decode loops
  (lm.models.decoder.decoding_params: an untied head copy, transposed MLP down kernels).
- `fused_attention()`: on GPU and TPU attention runs through jax.nn.dot_product_attention (cuDNN
  where it applies); on CPU, lm's blocked attention.

This module imports jax only inside its functions: `import lm` runs it before JAX starts.
"""
from __future__ import annotations

import functools
import os

CPU_MATMUL_FLAG = '--xla_cpu_experimental_ynn_fusion_type='
_SET_BY_LM = 'LM_XLA_FLAGS'  # the XLA_FLAGS lm set, so that a child process (a test worker)
# that inherits them does not take lm's choice for the user's
USER_CHOSE_CPU_MATMULS = (CPU_MATMUL_FLAG.split('=')[0] in os.environ.get('XLA_FLAGS', '')
                          and os.environ.get('XLA_FLAGS') != os.environ.get(_SET_BY_LM))
YNN_MATMULS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


def set_cpu_matmul_flags() -> None:
  """Eigen's matmuls for XLA:CPU, unless the user's XLA_FLAGS chose (run by `import lm`)."""
  if not USER_CHOSE_CPU_MATMULS and CPU_MATMUL_FLAG not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_MATMUL_FLAG}".strip()
    os.environ[_SET_BY_LM] = os.environ['XLA_FLAGS']


def is_cpu() -> bool:
  import jax
  return jax.default_backend() == 'cpu'


def fused_attention() -> bool:
  """Whether attention runs through jax.nn.dot_product_attention (GPU, TPU)."""
  import jax
  return jax.default_backend() in ('gpu', 'tpu')


YNN_MAX_ROWS = 4  # a decoding loop over at most this many rows takes YNNPACK's matmuls


def decoding_jit(rows=None, **jit_kwargs):
  """jax.jit for a decoding loop: on CPU, a loop over few rows (`rows(*args, **kwargs)` at most
  YNN_MAX_ROWS; every call if `rows` is None) compiles with YNNPACK's matmuls, not the Eigen ones
  `import lm` picks for training, unless the user's XLA_FLAGS chose; other backends, and more
  rows, compile as jax.jit would. (GPT-2 shape, greedy: YNNPACK 410 / 493 tokens/s at 1 / 2 rows
  against Eigen's 400 / 408, 629 / 945 at 4 / 8 against 681 / 1094; 4 beams of one prompt 113
  against 109, so 4 rows stay with YNNPACK: experiments/README.md.)"""
  import jax

  def wrap(fn):
    plain = jax.jit(fn, **jit_kwargs)
    ynn = jax.jit(fn, **jit_kwargs, compiler_options=YNN_MATMULS)

    def jitted(args, kwargs):
      few = rows is None or rows(*args, **kwargs) <= YNN_MAX_ROWS
      return ynn if is_cpu() and not USER_CHOSE_CPU_MATMULS and few else plain

    @functools.wraps(fn)
    def call(*args, **kwargs):
      return jitted(args, kwargs)(*args, **kwargs)
    call.lower = lambda *args, **kwargs: jitted(args, kwargs).lower(*args, **kwargs)
    return call
  return wrap
