"""Files of a run's workdir, on a local disk or an object store (`gs://...`), through
etils.epath: one way to write a file whole, and to tell a local path from a remote one."""
from __future__ import annotations

import os

from etils import epath

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
  """A local path or an object store's URL (gs://bucket/dir) as one Path type."""
  return epath.Path(p)


def is_local(p: PathLike) -> bool:
  return '://' not in os.fspath(p)


def write_atomic(p: PathLike, data: str | bytes) -> None:
  """Writes the file whole, then renames it into place: a reader never sees half of it (on a
  local disk; an object store's objects appear whole by themselves)."""
  p = path(p)
  tmp = p.with_name(p.name + '.tmp')
  if isinstance(data, str):
    tmp.write_text(data)
  else:
    tmp.write_bytes(data)
  tmp.replace(p)
