"""The CPU-sized default: a small Llama-style decoder (RoPE, RMSNorm, grouped-query attention
whose later layers share the first one's values, squared-ReLU MLPs) trained with Muon for its
hidden matrices and a warmup-stable-decay schedule, on the Python stdlib sources, with a
byte-level BPE of 4096 ids trained on them at the start (cached) and a context of 256 tokens
(about 1,000 characters of code: room for a question and a function, which configs/sft.py
tunes it on).

Sized to at most 10 minutes on 2 CPU cores, BPE training included. What it ends with: README.md,
Quick start; how it was sized: experiments/README.md, The default run.

  python -m lm.main --config=configs/decoder.py [--config.model.num_layers=2 ...]
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = dict(num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, mlp_dim=528,
                 max_len=256, positions='rope', rope_theta=10000.0, norm='rmsnorm',
                 norm_eps=1e-5, mlp='relu2', use_bias=False,
                 window=config_dict.placeholder(int), layer_pattern='', num_experts=0,
                 experts_per_token=2, moe_aux_coef=0.01, tie_embeddings=True, dtype='float32',
                 remat='none', scan_layers=False, qk_norm=False, logit_softcap=0.0,
                 zero_init_out=False, embed_skip=False, value_residual=True)
  c.data = dict(paths='', seq_len=256, val_fraction=0.02, cache_dir='')  # task clm; FIM:
                                                                         # configs/fim.py
  c.tokenizer = dict(kind='bpe', vocab_size=4096)
  c.train = dict(steps=600, init_from='', batch_size=16, learning_rate=1e-2, warmup_steps=50,
                 min_lr_ratio=0.1, schedule='wsd', decay_fraction=0.4,
                 optimizer='muon', muon_learning_rate=0.02, muon_momentum=0.95,
                 muon_momentum_warmup=50,
                 weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0, seed=0,
                 log_every=10, eval_every=200, eval_batches=8, checkpoint_every=200,
                 keep_checkpoints=3, grad_accum_steps=1, async_checkpoints=True,
                 skip_nonfinite_steps=0, peak_flops=0.0, num_samples=3, sample_len=200,
                 wandb_project='', wandb_group='')
  c.eval = dict(stride=64)  # a second held-out figure: each token with 192 or more before it
  c.mesh = dict(shape=(-1, 1, 1))
  c.distributed = dict(coordinator_address='', num_processes=0, process_id=-1,
                       local_device_ids=(), initialization_timeout=300)
  return ml_collections.ConfigDict(c)
