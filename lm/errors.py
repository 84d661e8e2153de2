"""ConfigError and require: a leaf module every other may import."""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
  """A user's mistake (config, command line, data, workdir): printed without a traceback."""


def require(ok: bool, field: str, value: Any, fix: str) -> None:
  """Raises ConfigError('field=value: fix') unless ok."""
  if not ok:
    raise ConfigError(f'{field}={value!r}: {fix}')
