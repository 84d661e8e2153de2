"""GPT-2 small (124M parameters) for one GPU or TPU host, on the embedded corpus (the Python
standard library's sources, a BPE of 50,257 ids trained on them): bfloat16 compute with float32
parameters and optimizer state, context 1024, batch 64 sequences (65,536 tokens a step),
AdamW 6e-4 with warmup and cosine decay. The run prints its MFU against the device's bfloat16
peak (lm.train.BF16_PEAK_FLOPS: H100, H200, A100, TPU v4, v5e, v5p, v6e).

  python -m lm.main --config=configs/gpt2_124m.py [--config.train.grad_accum_steps=2]

With less device memory, raise train.grad_accum_steps (the same global batch in microbatches)
or set model.remat='dots'. The default corpus (about 6 MB of text) is small for this model:
the run measures throughput and MFU, and its held-out loss shows overfitting after a few epochs.
"""
from pathlib import Path

import ml_collections

from lm.config import from_file


def get_config() -> ml_collections.ConfigDict:
  c = from_file(Path(__file__).with_name('gpt2.py'))
  c.model.update(dtype='bfloat16', remat='none')
  c.train.update(batch_size=64, steps=2000, learning_rate=6e-4, warmup_steps=300,
                 weight_decay=0.1, eval_every=500, checkpoint_every=1000, log_every=50,
                 num_samples=3, sample_len=200)
  return c
