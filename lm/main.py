"""python -m lm.main --config=configs/X.py [--workdir=DIR] [--config.a.b=v]

Trains, evaluates and checkpoints; resumes when the workdir already holds a checkpoint.
A user's mistake (or a workdir another run holds) prints one line naming the field, the value and
the fix, and exits with 2; a fault the run stops on (a non-finite step, a checkpoint that could
not be written) prints one line and exits with 1, its last good checkpoint kept.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from lm.config import ConfigError, from_file

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file, configs/X.py.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory; default runs/<config name>.')


def user_error(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def unknown_override(argv: list[str]) -> str | None:
  """Names the first `--config.a.b=v` whose key the config file does not have."""
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if path is None:
    return None
  node = from_file(path)
  for arg in argv:
    if arg.startswith('--config.'):
      keys, node_at = arg[len('--config.'):].split('=', 1)[0].split('.'), node
      for depth, key in enumerate(keys):
        if key not in node_at:
          where = '.'.join(keys[:depth]) or 'the config'
          return f'{arg}: {where} has no key {key!r}; it has {sorted(node_at.keys())}'
        node_at = node_at[key]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with every mistake a one-line error and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError):
    user_error(unknown_override(argv) or 'unknown --config override; check the key names')
  except (flags.Error, ValueError, TypeError, OSError) as e:
    user_error(f'{e}; see --helpfull')
  except ConfigError as e:
    user_error(str(e))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  path = config_flags.get_config_filename(flags.FLAGS['config'])
  try:
    config = _CONFIG.value
    config.keys()  # the flag loads lazily: a missing or broken file fails here
  except OSError as e:
    user_error(f'--config={path!r}: cannot load it ({str(e).splitlines()[-1].strip()}); '
               'give a path like configs/decoder.py')
  from lm import checkpoint, train  # after flag parsing: --help stays fast
  workdir = _WORKDIR.value or str(Path('runs') / Path(path).stem)
  try:
    train.run(config, workdir)
  except ConfigError as e:
    user_error(str(e))
  except train.TrainingError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except checkpoint.CheckpointError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # the failed save's background threads may never end: do not wait for them


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main, flags_parser=parse_flags)
