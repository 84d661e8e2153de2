"""Files of a run's workdir, on a local disk or an object store (`gs://...`), through
etils.epath: one way to write a file whole, one to publish a directory whole, and to tell a
local path from a remote one. A leaf: checkpoints, tokenizers, the token store and lm.hf all
write through it."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from etils import epath

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
  """A local path or an object store's URL (gs://bucket/dir) as one Path type."""
  return epath.Path(p)


def is_local(p: PathLike) -> bool:
  return '://' not in os.fspath(p)


def write_atomic(p: PathLike, data: str | bytes | Callable[[epath.Path], None]) -> None:
  """Writes the file whole (`data`, or what data(tmp) writes at a path beside it), then renames
  it into place: a reader never sees half of it (on a local disk; an object store's objects
  appear whole by themselves)."""
  p = path(p)
  tmp = p.with_name(p.name + '.tmp')
  if callable(data):
    data(tmp)
  elif isinstance(data, str):
    tmp.write_text(data)
  else:
    tmp.write_bytes(data)
  tmp.replace(p)


def publish_directory(directory: Path, write: Callable[[Path], None]) -> None:
  """write(tmp) fills a temporary directory beside `directory` (local), then it is renamed into
  place: an interrupted build leaves nothing half-written, and of two concurrent builds the
  first result stays."""
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix='.building-'))
  try:
    write(tmp)
    try:
      os.replace(tmp, directory)
    except OSError:  # another process built the same directory first
      if not directory.is_dir():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
