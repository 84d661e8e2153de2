"""Layers shared by the model families, one module per concern: `common` (initialisers, norms,
RoPE, the attention visibility rule, fused projections), `attention`, `kv_cache` (the decoding
cache on CPU), `mlp` (dense, SwiGLU, experts). They know nothing of families, training or the
mesh, only logical axis names: `embed`, `mlp`, `heads`, `head_dim`, `vocab`, `experts`,
`batch`, `length`.
"""
