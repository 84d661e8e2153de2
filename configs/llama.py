"""A small Llama-3-style model: 8 layers, d_model 512, 8 heads sharing 2 key/value heads
(grouped-query), SwiGLU MLP 1536, RoPE with base 500,000, RMSNorm, no biases, untied
embeddings, context 1024, and a byte-level BPE of 32,768 ids trained on the run's corpus.
Sized for an accelerator.

  python -m lm.main --config=configs/llama.py [--config.model.window=256 ...]
"""
from pathlib import Path

import ml_collections

from lm.config import from_file


def get_config() -> ml_collections.ConfigDict:
  c = from_file(Path(__file__).with_name('decoder.py'))
  c.model.update(num_layers=8, d_model=512, num_heads=8, num_kv_heads=2, mlp_dim=1536,
                 max_len=1024, positions='rope', rope_theta=500000.0, norm='rmsnorm',
                 norm_eps=1e-5, mlp='swiglu', use_bias=False, tie_embeddings=False,
                 value_residual=False)
  c.tokenizer.update(kind='bpe', vocab_size=32768)
  c.data.seq_len = 1024
  c.train.update(steps=10000, batch_size=32, learning_rate=1e-3, warmup_steps=500,
                 optimizer='adamw', schedule='cosine',
                 eval_every=500, checkpoint_every=1000)
  return c
