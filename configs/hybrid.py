"""The CPU-sized hybrid, Jamba-style: the decoder default's blocks (RoPE attention, SwiGLU MLP)
with three of every four mixers a Mamba layer of 8 states (layer_pattern 'MMMG'), on the
decoder default's data, the byte tokenizer and batch 32 of 128; 850 steps, about the decoder default's 10 minutes
on 2 cores. Its bits per byte beside the decoder default's: README.

  python -m lm.main --config=configs/hybrid.py [--config.model.layer_pattern=MSMG ...]
"""
from pathlib import Path

import ml_collections

from lm.config import from_file


def get_config() -> ml_collections.ConfigDict:
  c = from_file(Path(__file__).with_name('decoder.py'))
  # the byte-level data and batch its figures were measured with (the decoder default's until
  # it moved to a BPE of 2048 ids and a context of 256)
  c.tokenizer.update(kind='bytes')
  c.data.update(seq_len=128)
  c.model.update(max_len=128)
  c.train.update(batch_size=32)
  c.model.update(layer_pattern='MMMG', state_size=8, d_conv=4, expand=2, dt_rank=0,
                 dt_min=0.001, dt_max=0.1, conv_bias=True, scan='sequential', scan_chunk=32)
  c.train.update(steps=850)
  return c
