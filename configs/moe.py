"""A small Mixtral-style mixture of experts: the Llama preset's attention (8 layers, d_model
512, 8 heads sharing 2 key/value heads, RoPE 500k, RMSNorm) with 8 SwiGLU experts of width
1536 in every block, 2 per token (softmax router, top-2, weights renormalised), the
load-balancing loss at 0.01. Its active parameters per token equal a dense model with a
SwiGLU width of 3072, the fair comparison at matched compute. Sized for an accelerator.

  python -m lm.main --config=configs/moe.py
"""
from pathlib import Path

import ml_collections

from lm.config import from_file


def get_config() -> ml_collections.ConfigDict:
  c = from_file(Path(__file__).with_name('llama.py'))
  c.model.update(num_experts=8, experts_per_token=2, moe_aux_coef=0.01)
  return c
