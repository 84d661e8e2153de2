"""The CPU-sized hybrid, Jamba-style: configs/mamba.py's data and scan layers (the byte
tokenizer, batch 32 of 128, Mamba-1 mixers of 8 states) with the decoder default's blocks (RoPE
attention, squared-ReLU MLP) in every fourth layer (layer_pattern 'MMMG'); 850 steps, about 10 minutes
on 2 cores. How it compares with the other families at matched FLOPs: README, Ablations.

  python -m lm.main --config=configs/hybrid.py [--config.model.layer_pattern=MSMG ...]
"""
from pathlib import Path

import ml_collections

from lm.config import from_file


def get_config() -> ml_collections.ConfigDict:
  c = from_file(Path(__file__).with_name('mamba.py'))
  decoder = from_file(Path(__file__).with_name('decoder.py')).model
  # the decoder's depth, positions and squared-ReLU MLP, and configs/mamba.py's Muon recipe
  # (issue 30: -0.29 bits/byte against SwiGLU 352 with AdamW 5e-3 and cosine at 120 s, two
  # seeds, experiments/plans/family_recipes.py)
  c.model.update(num_layers=decoder.num_layers, mlp=decoder.mlp, mlp_dim=decoder.mlp_dim,
                 positions=decoder.positions, layer_pattern='MMMG')
  c.train.update(steps=850)
  return c
