"""The CPU-sized Mamba: the decoder default's data (with the byte tokenizer and batch 32 of
128) and every layer a Mamba-1 selective SSM mixer (no attention, no MLP, no positions): 6
layers of d_model 128, inner width 256, 8 states, about the parameters of the byte-level
decoder it was sized against. A Mamba step costs more than the decoder's on CPU (the scan), so
it takes 750 steps, sized to about 10 minutes on 2 cores. Its figures: experiments/README.md.

  python -m lm.main --config=configs/mamba.py [--config.model.scan=chunked ...]
"""
from pathlib import Path

import ml_collections

from lm.config import from_file


def get_config() -> ml_collections.ConfigDict:
  c = from_file(Path(__file__).with_name('decoder.py'))
  # byte-level data in batches of 32 x 128, which its step count is sized for
  c.tokenizer.update(kind='bytes')
  c.data.update(seq_len=128)
  c.model.update(max_len=128)
  c.train.update(batch_size=32)
  c.model.update(num_layers=6, d_model=128, mlp_dim=0, positions='none', norm='rmsnorm',
                 use_bias=False, layer_pattern='M', value_residual=False, state_size=8, d_conv=4,
                 expand=2, dt_rank=0, dt_min=0.001, dt_max=0.1, conv_bias=True, scan='sequential',
                 scan_chunk=32)
  # sized and measured with AdamW at 5e-3, cosine decay and evaluations every 250 steps;
  # Muon, wsd, AdamW at 1e-2 and 800 steps are the attention decoder's
  c.train.update(steps=750, optimizer='adamw', learning_rate=5e-3, schedule='cosine',
                 eval_every=250, checkpoint_every=250)
  return c
