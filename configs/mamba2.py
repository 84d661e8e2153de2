"""The CPU-sized Mamba-2: configs/mamba.py's data and depth with every layer a Mamba-2 mixer
(layer kind D: heads of 32 channels, one group of B and C, 32 states a head, chunks of 32
steps for SSD), sized to about 10 minutes on 2 CPU cores. Its figures: experiments/README.md.

  python -m lm.main --config=configs/mamba2.py
  python -m lm.main --config=configs/mamba2.py --config.model.layer_pattern=DDDG  # a hybrid
"""
from pathlib import Path

import ml_collections

from lm.config import from_file


def get_config() -> ml_collections.ConfigDict:
  c = from_file(Path(__file__).with_name('mamba.py'))
  c.model.update(layer_pattern='D', state_size=32, ssm_head_dim=32, ngroups=1, scan_chunk=32)
  # sized and measured with AdamW at 5e-3 and cosine decay (Muon is configs/mamba.py's since
  # issue 30, not measured on Mamba-2)
  c.train.update(steps=750, optimizer='adamw', learning_rate=5e-3, schedule='cosine')
  return c
