"""Instruction tuning of the default pretraining run: the model and tokenizer of runs/decoder
(train.init_from), tuned on the embedded default conversations built from the Python standard
library (lm.data.conversations), loss on assistant turns only.

  python -m lm.main --config=configs/decoder.py   # first: the pretrained run, runs/decoder
  python -m lm.main --config=configs/sft.py       # then: runs/sft
  python -m lm.chat --workdir=runs/sft

The model keys below are replaced by the checkpoint's (all but dtype, remat, scan_layers and
moe_aux_coef); data.seq_len must fit its context.
"""
from pathlib import Path

import ml_collections

from lm.config import from_file


def get_config() -> ml_collections.ConfigDict:
  c = from_file(Path(__file__).with_name('decoder.py'))
  c.data.update(task='sft', paths='', val_fraction=0.1)
  c.train.update(init_from='runs/decoder', steps=400, batch_size=16, learning_rate=1e-3,
                 warmup_steps=20, weight_decay=0.0, eval_every=100, checkpoint_every=100,
                 num_samples=3, sample_len=96, optimizer='adamw', schedule='cosine')
  return c
