"""The CPU-sized T5 of configs/encdec.py trained on input/target pairs (data.task=seq2seq):
JSONL lines {"input": ..., "target": ...} in data.paths, or by default the stdlib's documented
functions (summary -> signature). The data section is the seq2seq task's keys.

  python -m lm.main --config=configs/seq2seq.py --config.data.paths=pairs.jsonl
"""
from pathlib import Path

import ml_collections

from lm.config import from_file


def get_config() -> ml_collections.ConfigDict:
  c = from_file(Path(__file__).with_name('encdec.py'))
  c.data = dict(paths='', seq_len=c.data.seq_len, val_fraction=c.data.val_fraction,
                cache_dir='', task='seq2seq', target_len=64)
  return c
