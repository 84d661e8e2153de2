"""The CPU-sized encoder-decoder: a small T5 (relative position bias, RMS norm, pre-norm, no
biases, unscaled attention, gated-GELU MLPs as T5 v1.1, a head tied to the shared embedding)
pre-trained with T5's span corruption (15% noise in spans of mean length 3) on the Python stdlib
sources, with a byte-level BPE of 2048 ids (100 of them sentinels) trained on them at the start
(cached). Inputs of 256 tokens; targets of the length T5's arithmetic gives them.

Sized to a few minutes on 2 CPU cores (its time: experiments/README.md, Encoder-decoder); the
final report gives the target loss, the per-token accuracy beside the most frequent target
token's, and a few corrupted inputs with the model's fills.

  python -m lm.main --config=configs/encdec.py [--config.model.mlp=relu ...]
  # the original transformer instead of T5:
  python -m lm.main --config=configs/encdec.py --config.model.positions=sinusoidal \
      --config.model.scale_embeddings=True --config.model.post_norm=True \
      --config.model.norm=layernorm --config.model.use_bias=True \
      --config.model.scaled_attention=True --config.model.mlp=relu
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = dict(family='encdec', num_layers=3, num_decoder_layers=3, d_model=128, num_heads=4,
                 mlp_dim=352, max_len=256, positions='relative', relative_buckets=32,
                 relative_max_distance=128, norm='rmsnorm', norm_eps=1e-6, mlp='geglu',
                 use_bias=False, scaled_attention=False, post_norm=False, tie_embeddings=True,
                 scale_embeddings=False, decoder_start_id=0, dtype='float32', remat='none')
  c.data = dict(paths='', seq_len=256, val_fraction=0.02, cache_dir='', task='span',
                noise_density=0.15, mean_noise_span=3.0)
  c.tokenizer = dict(kind='bpe', vocab_size=2048)
  c.train = dict(steps=1000, init_from='', batch_size=16, learning_rate=5e-3, warmup_steps=50,
                 min_lr_ratio=0.1, schedule='cosine', decay_fraction=0.2,
                 optimizer='adamw', muon_learning_rate=0.02, muon_momentum=0.95,
                 muon_momentum_warmup=0,
                 weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0, seed=0,
                 log_every=10, eval_every=250, eval_batches=8, checkpoint_every=250,
                 keep_checkpoints=3, grad_accum_steps=1, async_checkpoints=True,
                 skip_nonfinite_steps=0, peak_flops=0.0, num_samples=3, sample_len=0,
                 wandb_project='', wandb_group='')
  c.mesh = dict(shape=(-1, 1, 1))
  c.distributed = dict(coordinator_address='', num_processes=0, process_id=-1,
                       local_device_ids=(), initialization_timeout=300)
  return ml_collections.ConfigDict(c)
