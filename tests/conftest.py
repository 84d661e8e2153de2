"""Shared fixtures: a small synthetic corpus and a tiny config derived from configs/decoder.py."""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for a test run (its workers and the processes they start,
# which inherit the environment): many tests compile the same tiny models. Named by the run,
# so no executable compiled for another machine's CPU is ever read back.
_RUN = os.environ.get('PYTEST_XDIST_TESTRUNUID') or f'pid{os.getpid()}'
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), f'lm-tests-jax-cache-{_RUN}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# The tests' models are tiny and run a few steps: compiling is most of their time. XLA:CPU's
# older fusion code generator and LLVM at -O0 halve it (jaxlib 0.10.2: a file of scanned and
# rematerialised models took 23 s against 50 s). Both change the machine code XLA emits for
# fused elementwise loops, not the computation (the HLO) nor the matmul libraries it calls.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
if TEST_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):  # once: workers inherit it
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import ml_collections
import pytest

from lm.config import from_file

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str = 'decoder') -> ml_collections.ConfigDict:
  return from_file(ROOT / 'configs' / f'{name}.py')


def write_corpus(directory: Path, num_files: int = 24) -> Path:
  """Small, very regular Python-like files: easy to overfit, cheap to tokenize."""
  directory.mkdir(parents=True, exist_ok=True)
  for i in range(num_files):
    lines = [f'def f{i}_{j}(x):\n    return x + {j}\n\n' for j in range(12)]
    (directory / f'file_{i:02d}.py').write_text(''.join(lines))
  return directory


def tiny_config(corpus: Path, cache_dir: Path, **train) -> ml_collections.ConfigDict:
  c = load_config()
  c.tokenizer.kind = 'bytes'
  # the recipe these tests were written against (AdamW, cosine, SwiGLU, no value residual); the
  # default's Muon, wsd, squared ReLU and value residual have their own tests
  # (test_optimizer.py, test_options.py)
  c.model.update(num_layers=2, d_model=32, num_heads=2, mlp_dim=64, max_len=32, mlp='swiglu',
                 value_residual=False)
  c.data.update(paths=str(corpus / '*.py'), seq_len=32, val_fraction=0.25,
                cache_dir=str(cache_dir))
  c.train.update(steps=20, batch_size=8, learning_rate=3e-3, warmup_steps=2, log_every=1,
                 eval_every=10, eval_batches=2, checkpoint_every=10, peak_flops=1e9,
                 num_samples=0, optimizer='adamw', schedule='cosine')
  c.train.update(train)
  return c


def pytest_runtest_setup(item):
  """Tests of a CPU-only path (the decoding compile's YNNPACK matmuls, the CPU weight
  layouts, XLA:CPU's flags) skip where the tests run on an accelerator."""
  if item.get_closest_marker('cpu_only'):
    import jax
    if jax.default_backend() != 'cpu':
      pytest.skip(f'a CPU-only path; the backend is {jax.default_backend()}')


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
  return write_corpus(tmp_path / 'corpus')


@pytest.fixture
def config(corpus: Path, tmp_path: Path) -> ml_collections.ConfigDict:
  return tiny_config(corpus, tmp_path / 'cache')


@pytest.fixture(scope='session')
def _trained_run(tmp_path_factory):
  """One tiny run (4 steps; checkpoints at 2 and 4) a test worker, shared by the tests that
  only need a trained model; they take a copy through `trained`."""
  from lm import train
  root = tmp_path_factory.mktemp('trained')
  config = tiny_config(write_corpus(root / 'corpus'), root / 'cache', steps=4, eval_every=100,
                       checkpoint_every=2)
  train.run(config, root / 'run')
  return config, root / 'run'


@pytest.fixture
def trained(_trained_run, tmp_path: Path) -> tuple[ml_collections.ConfigDict, Path]:
  """(its config, a workdir): a copy of the shared trained run at tmp_path / 'run', the test's
  own to change or resume."""
  config, run = _trained_run
  shutil.copytree(run, tmp_path / 'run')
  return copy.deepcopy(config), tmp_path / 'run'
