"""The CPU-sized Mamba: the decoder default's data, tokenizer and schedule with every layer a
Mamba-1 selective SSM mixer (no attention, no MLP, no positions), about the decoder default's
parameters. Its bits per byte beside the decoder default's: README, Benchmarks.

  python -m lm.main --config=configs/mamba.py [--config.model.scan=sequential ...]
"""
from pathlib import Path

import ml_collections

from lm.config import from_file


def get_config() -> ml_collections.ConfigDict:
  c = from_file(Path(__file__).with_name('decoder.py'))
  c.model.update(num_layers=6, d_model=128, mlp_dim=0, positions='none', norm='rmsnorm',
                 use_bias=False, layer_pattern='M', state_size=16, d_conv=4, expand=2,
                 dt_rank=0, dt_min=0.001, dt_max=0.1, conv_bias=True, scan='chunked',
                 scan_chunk=32)
  return c
