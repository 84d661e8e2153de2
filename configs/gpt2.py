"""The GPT-2 124M shape: 12 layers, d_model 768, 12 heads, MLP 3072, context 1024, learned
positions, LayerNorm, tanh GELU, biases, tied embeddings, and a byte-level BPE of 50,257 ids
trained on the run's corpus, so that the model has GPT-2's 124,439,808 parameters. Sized for
an accelerator (about 0.9 TFLOP per sequence of a train step).

  python -m lm.main --config=configs/gpt2.py [--config.data.paths=...]
"""
from pathlib import Path

import ml_collections

from lm.config import from_file


def get_config() -> ml_collections.ConfigDict:
  c = from_file(Path(__file__).with_name('decoder.py'))
  c.model.update(num_layers=12, d_model=768, num_heads=12, num_kv_heads=0, mlp_dim=3072,
                 max_len=1024, positions='learned', norm='layernorm', norm_eps=1e-5,
                 mlp='gelu', use_bias=True, tie_embeddings=True,
                 value_residual=False)
  c.tokenizer.update(kind='bpe', vocab_size=50257)
  c.data.seq_len = 1024
  c.train.update(steps=10000, batch_size=32, learning_rate=6e-4, warmup_steps=500,
                 optimizer='adamw', schedule='cosine',
                 eval_every=500, checkpoint_every=1000)
  return c
