"""The CPU-sized BERT: a small byte-level encoder trained with masked language modelling plus
next-sentence prediction on the Python stdlib sources (a document is a file, a sentence a
line; A and B are runs of lines).

  python -m lm.main --config=configs/encoder.py [--config.model.post_norm=False ...]
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = dict(family='encoder', num_layers=4, d_model=128, num_heads=4, num_kv_heads=0,
                 mlp_dim=512, max_len=128, positions='learned', rope_theta=10000.0,
                 norm='layernorm', norm_eps=1e-12, mlp='gelu_exact', use_bias=True,
                 post_norm=True, num_segments=2, dtype='float32', remat='none')
  c.data = dict(paths='', seq_len=128, val_fraction=0.02, cache_dir='', task='mlm_nsp',
                mask_rate=0.15)
  c.tokenizer = dict(kind='bytes', vocab_size=8192)  # vocab_size: for kind=bpe only
  c.train = dict(steps=1000, init_from='', batch_size=32, learning_rate=1e-3, warmup_steps=100,
                 min_lr_ratio=0.1, schedule='cosine', decay_fraction=0.2,
                 optimizer='adamw', muon_learning_rate=0.02, muon_momentum=0.95,
                 muon_momentum_warmup=0,
                 weight_decay=0.01, b1=0.9, b2=0.999, grad_clip=1.0, seed=0,
                 log_every=10, eval_every=250, eval_batches=8, checkpoint_every=250,
                 keep_checkpoints=3, grad_accum_steps=1, async_checkpoints=True,
                 skip_nonfinite_steps=0, peak_flops=0.0, num_samples=0, sample_len=0,
                 wandb_project='', wandb_group='')
  c.mesh = dict(shape=(-1, 1, 1))
  c.distributed = dict(coordinator_address='', num_processes=0, process_id=-1,
                       local_device_ids=(), initialization_timeout=300)
  return ml_collections.ConfigDict(c)
