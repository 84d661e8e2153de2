"""python -m lm.main --config=configs/X.py [--workdir=DIR] [--config.a.b=v]

Trains, evaluates and checkpoints; resumes when the workdir already holds a checkpoint.
A user's mistake prints one line naming the field, the value and the fix, and exits with 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from lm.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file, configs/X.py.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory; default runs/<config name>.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  from lm import train  # after flag parsing: --help stays fast
  workdir = _WORKDIR.value or str(Path('runs') / Path(
      config_flags.get_config_filename(flags.FLAGS['config'])).stem)
  try:
    train.run(_CONFIG.value, workdir)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
