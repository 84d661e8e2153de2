"""lm: a JAX/Flax research codebase for language models."""
import os

# XLA:CPU in jaxlib 0.10-0.11 hands float32 matmuls to YNNPACK by default; Eigen's run the
# train step faster on the CPUs measured (experiments/README.md, Train step). The
# flag only touches the CPU backend and takes effect if set before JAX starts one; a value of
# the user's own in XLA_FLAGS wins. (The decoding loops compile with YNNPACK's matmuls:
# lm.sampling.decoding_jit.)
CPU_MATMUL_FLAG = '--xla_cpu_experimental_ynn_fusion_type='
_SET_BY_LM = 'LM_XLA_FLAGS'  # the XLA_FLAGS lm set, so that a child process (a test worker)
# that inherits them does not take lm's choice for the user's
USER_CHOSE_CPU_MATMULS = (CPU_MATMUL_FLAG.split('=')[0] in os.environ.get('XLA_FLAGS', '')
                          and os.environ.get('XLA_FLAGS') != os.environ.get(_SET_BY_LM))
if not USER_CHOSE_CPU_MATMULS and CPU_MATMUL_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_MATMUL_FLAG}".strip()
  os.environ[_SET_BY_LM] = os.environ['XLA_FLAGS']
