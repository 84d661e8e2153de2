"""lm: a JAX/Flax research codebase for language models."""
import os

# XLA:CPU in jaxlib 0.10-0.11 hands float32 matmuls to YNNPACK by default; Eigen's run the
# train step faster on the CPUs measured (experiments/README.md, Train step). The
# flag only touches the CPU backend and takes effect if set before JAX starts one; a value of
# the user's own in XLA_FLAGS wins. (The decoding loops compile with YNNPACK's matmuls:
# lm.sampling.decoding_jit.)
CPU_MATMUL_FLAG = '--xla_cpu_experimental_ynn_fusion_type='
USER_CHOSE_CPU_MATMULS = CPU_MATMUL_FLAG.split('=')[0] in os.environ.get('XLA_FLAGS', '')
if not USER_CHOSE_CPU_MATMULS:
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_MATMUL_FLAG}".strip()
