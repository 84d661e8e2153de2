"""The CPU-sized Mamba: the decoder default's data (with the byte tokenizer and batch 32 of
128) and every layer a Mamba-1 selective SSM mixer (no attention, no MLP, no positions): 6
layers of d_model 128, inner width 256, 8 states, about the parameters of the byte-level
decoder it was sized against. A Mamba step costs more than the decoder's on CPU (the scan), so
it takes 700 steps, sized to about 10 minutes on 2 cores. Its figures: experiments/README.md.

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
  # issue 30's recipe, the decoder default's (Muon 0.02 for the matrices, AdamW 1e-2, wsd with
  # a cooldown of 40%): -0.24 bits/byte against AdamW 5e-3 with cosine at 120 s, two seeds
  # (experiments/plans/family_recipes.py); 700 steps, as a Muon step costs about 6% more than
  # the 750 AdamW steps it was sized with (its one-run figures, experiments/README.md, are
  # those of AdamW)
  c.train.update(steps=700, optimizer='muon', learning_rate=1e-2, schedule='wsd',
                 decay_fraction=0.4, muon_learning_rate=0.02, muon_momentum_warmup=50,
                 eval_every=250, checkpoint_every=250)
  return c
