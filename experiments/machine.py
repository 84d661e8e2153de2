"""What a figure was measured on: the CPU's model name, cores, accelerator, jax's version."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
  """The CPU's model name (the 2-core hosts vary: AMD EPYC, Intel Xeon)."""
  try:
    lines = Path('/proc/cpuinfo').read_text().splitlines()
    return next(l.split(':', 1)[1].strip() for l in lines if l.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def describe() -> str:
  """'Intel(R) Xeon(R) Processor, 2 cores, cpu, jax 0.10.2'."""
  import jax
  return (f'{cpu_model()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}, '
          f'jax {jax.__version__}')
