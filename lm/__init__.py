"""lm: a JAX/Flax research codebase for language models."""
from lm import backend

backend.set_cpu_matmul_flags()  # before JAX starts a backend (lm.backend says why)
