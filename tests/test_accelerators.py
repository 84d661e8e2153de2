"""What runs on GPUs and TPUs, checked here on CPU: the GPT-2 124M bf16 config and the peaks
its MFU is measured against. (The fused attention path: tests/test_model.py.)"""
from __future__ import annotations

import jax
import pytest

from lm import config as config_lib, models, train
from tests.conftest import load_config


def test_gpt2_124m_config_is_gpt2_small_in_bfloat16():
  c = load_config('gpt2_124m')
  cfg = config_lib.parse(c, vocab_size=50257, device_count=1)
  assert cfg.model.dtype == 'bfloat16' and cfg.data.seq_len == 1024
  params = models.abstract_params(models.build(cfg.model))
  assert sum(x.size for x in jax.tree.leaves(params)) == 124_439_808  # GPT-2 small's count
  # 6N per token plus attention: about 0.85 GFLOP a token of a 1024-token sequence
  assert models.train_flops_per_token(cfg.model, models.TokenCounts(1024)) == pytest.approx(
      8.5e8, rel=0.05)


@pytest.mark.parametrize('kind, peak', [('NVIDIA H100 80GB HBM3', 989e12),
                                        ('NVIDIA H200', 989e12), ('NVIDIA A100-SXM4-40GB', 312e12),
                                        ('TPU v4', 275e12), ('TPU v5 lite', 197e12),
                                        ('TPU v5p', 459e12), ('TPU v6 lite', 918e12),
                                        ('cpu', None), ('NVIDIA GeForce RTX 4090', None)])
def test_bf16_peaks_by_device_kind(kind, peak):
  assert train.table_peak_flops(kind) == peak
