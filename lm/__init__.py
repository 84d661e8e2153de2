"""lm: a JAX/Flax research codebase for language models."""
