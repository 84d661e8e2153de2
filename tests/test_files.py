"""A workdir on an object store (gs://): the files lm writes there besides orbax's checkpoints
(config.json, the tokenizer, metrics.jsonl, the lock) go through etils.epath, here on a fake
bucket that maps gs:// paths onto a local directory (etils.epath.testing.mock_epath)."""
from __future__ import annotations

import json
import os
import warnings

import pytest
from etils import epath
from etils.epath import testing

from lm import checkpoint, config as config_lib, files, tokenizers
from tests.conftest import load_config


@pytest.fixture
def bucket(tmp_path):
  """gs://bucket/... is tmp_path/bucket/... for every epath operation."""
  def local(p):
    return os.path.join(tmp_path, os.fspath(p).replace('gs://', ''))
  one = lambda fn, p, *a, **k: fn(local(p), *a, **k)
  two = lambda fn, p, dst, *a, **k: fn(local(p), local(dst), *a, **k)
  listed = lambda fn, p: [q.replace(str(tmp_path) + '/', 'gs://') for q in fn(local(p))]
  with testing.mock_epath(exists=one, isdir=one, makedirs=one, mkdir=one, open=one, remove=one,
                          rename=two, replace=two, rmtree=one, stat=one, listdir=one,
                          glob=listed):
    yield tmp_path / 'bucket'


def test_paths_local_and_remote():
  assert files.is_local('/tmp/run') and files.is_local('runs/decoder')
  assert not files.is_local('gs://bucket/run') and not files.is_local(epath.Path('gs://b/r'))


def test_a_tokenizer_and_a_config_on_a_bucket(bucket):
  bpe = tokenizers.load('bytes')
  bpe.save('gs://bucket/run/tokenizer')
  assert (bucket / 'run' / 'tokenizer' / 'tokenizer.json').is_file()
  assert tokenizers.load('gs://bucket/run/tokenizer').vocab_size == bpe.vocab_size
  cfg = config_lib.parse(load_config(), vocab_size=369, device_count=1)
  files.write_atomic('gs://bucket/run/config.json', cfg.to_json())
  checkpoint.prepare_workdir('gs://bucket/run', cfg)  # the same config: resumable
  other = config_lib.parse(load_config(), vocab_size=370, device_count=1)
  with pytest.raises(config_lib.ConfigError, match='holds a run with another config'):
    checkpoint.prepare_workdir('gs://bucket/run', other)


def test_metrics_on_a_bucket_are_rewritten_whole_and_resume_drops_later_lines(bucket):
  files.path('gs://bucket/run').mkdir(parents=True)  # as the run's setup does
  log = checkpoint.MetricsLog('gs://bucket/run', 0)
  for step in (1, 2, 3):
    log.write(step, {'train/loss': float(step)})
  log.close()
  lines = (bucket / 'run' / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l)['step'] for l in lines] == [1, 2, 3]
  assert not list((bucket / 'run').glob('events.out.tfevents.*'))  # no TensorBoard there
  log = checkpoint.MetricsLog('gs://bucket/run', 2)  # resumed from step 2
  log.write(3, {'train/loss': float('nan')})
  log.close()
  lines = [json.loads(l) for l in (bucket / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [l['step'] for l in lines] == [1, 2, 3] and lines[-1]['train/loss'] is None


def test_the_lock_on_a_bucket_is_advisory(bucket):
  with checkpoint.WorkdirLock('gs://bucket/run'):
    assert (bucket / 'run' / 'lock').is_file()
    with pytest.warns(checkpoint.CheckpointWarning, match='the lock is advisory'):
      with checkpoint.WorkdirLock('gs://bucket/run'):
        pass
  assert not (bucket / 'run' / 'lock').exists()
