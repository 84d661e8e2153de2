"""The decoder default trained with fill-in-the-middle on half of its documents (PSM or SPM
at even odds): the same model, data and budget as configs/decoder.py, so the two runs compare.

  python -m lm.main --config=configs/fim.py          # runs/fim
  python -m lm.sample --workdir=runs/fim --prefix='def add(a, b):\n    return ' --suffix='\n'
  python experiments/bench_fim.py --fim=runs/fim --plain=runs/decoder
"""
from pathlib import Path

import ml_collections

from lm.config import from_file


def get_config() -> ml_collections.ConfigDict:
  c = from_file(Path(__file__).with_name('decoder.py'))
  c.data.update(fim_rate=0.5, fim_spm_rate=0.5, fim_unit='char')
  return c
