"""The CPU-sized hybrid, Jamba-style: the decoder default's blocks (RoPE attention, SwiGLU MLP)
with three of every four mixers a Mamba layer (layer_pattern 'MMMG'), on the decoder default's
data, tokenizer and schedule. Its bits per byte beside the decoder default's: README,
Benchmarks.

  python -m lm.main --config=configs/hybrid.py [--config.model.layer_pattern=MSMG ...]
"""
from pathlib import Path

import ml_collections

from lm.config import from_file


def get_config() -> ml_collections.ConfigDict:
  c = from_file(Path(__file__).with_name('decoder.py'))
  c.model.update(layer_pattern='MMMG', state_size=16, d_conv=4, expand=2, dt_rank=0,
                 dt_min=0.001, dt_max=0.1, conv_bias=True, scan='chunked', scan_chunk=32)
  return c
