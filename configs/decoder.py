"""The CPU-sized default: a small Llama-style byte-level decoder (RoPE, RMSNorm, SwiGLU,
grouped-query attention) on the Python stdlib sources.

About 8 minutes on 2 CPU cores; it ends near 1.7 bits per byte on held-out stdlib files,
below gzip -9 (2.1) and xz -9 (1.9). Sized by measurement: at this budget a small, fast model
with a short context and a high learning rate sees the most tokens and learns the most.

  python -m lm.main --config=configs/decoder.py [--config.model.num_layers=2 ...]
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = dict(num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, mlp_dim=352,
                 max_len=128, positions='rope', rope_theta=10000.0, norm='rmsnorm',
                 norm_eps=1e-5, mlp='swiglu', use_bias=False,
                 window=config_dict.placeholder(int), layer_pattern='', num_experts=0,
                 experts_per_token=2, moe_aux_coef=0.01, tie_embeddings=True, dtype='float32',
                 remat='none', scan_layers=False)
  c.data = dict(paths='', seq_len=128, val_fraction=0.02, cache_dir='')
  c.tokenizer = dict(kind='bytes', vocab_size=8192)  # vocab_size: for kind=bpe only
  c.train = dict(steps=1000, init_from='', batch_size=32, learning_rate=5e-3, warmup_steps=50,
                 min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0, seed=0,
                 log_every=10, eval_every=250, eval_batches=8, checkpoint_every=250,
                 keep_checkpoints=3, async_checkpoints=True,
                 skip_nonfinite_steps=0, peak_flops=0.0, num_samples=3, sample_len=200)
  c.mesh = dict(shape=(-1, 1, 1))
  return ml_collections.ConfigDict(c)
