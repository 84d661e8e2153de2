"""Faults that must lose nothing: unreadable checkpoints, non-finite steps, two runs on one
workdir, a data set in one JSONL file, asynchronous saves (killed, or failing to write)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm import checkpoint, load, train
from lm.checkpoint import CheckpointWarning
from lm.config import ConfigError
from lm.data import store
from tests.conftest import ROOT
from tests.test_train import cli, losses, restore_params, start_and_wait_for_checkpoint


def assert_trees_equal(a, b) -> None:
  jax.tree.map(np.testing.assert_array_equal, a, b)


def truncate_arrays(step_dir: Path) -> None:
  for f in (step_dir / 'state').rglob('*'):
    if f.is_file() and f.parent.name == 'd':  # the array data files of the OCDBT store
      f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def remove_arrays(step_dir: Path) -> None:
  for f in (step_dir / 'state').rglob('*'):
    if f.is_file() and f.parent.name == 'd':
      f.unlink()


def metadata_not_json(step_dir: Path) -> None:
  (step_dir / 'state' / '_METADATA').write_text('{"tree_metadata": {"par')


@pytest.mark.slow
def test_an_unreadable_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(
    config, tmp_path, capsys):
  # A constant learning rate: the schedule does not depend on train.steps.
  config.train.update(steps=6, warmup_steps=0, min_lr_ratio=1.0, checkpoint_every=2,
                      eval_every=100)
  reference = tmp_path / 'reference'
  train.run(config, reference)
  config.train.steps = 4
  base = tmp_path / 'base'
  train.run(config, base)  # checkpoints 2 and 4
  other = config.copy_and_resolve_references()
  other.model.d_model = 64
  train.run(other, tmp_path / 'other')  # a checkpoint of another model: arrays of other shapes
  wrong_shapes = lambda d: (shutil.rmtree(d / 'state'),
                            shutil.copytree(tmp_path / 'other' / 'checkpoints' / '4' / 'state',
                                            d / 'state'))
  abstract = train.setup(config, base).abstract
  for name, corrupt in [('truncated', truncate_arrays), ('missing', remove_arrays),
                        ('not_json', metadata_not_json), ('wrong_shapes', wrong_shapes)]:
    run = tmp_path / name
    shutil.copytree(base, run)
    corrupt(run / 'checkpoints' / '4')
    # A reader (lm.sample) takes the newest step that reads, and moves nothing.
    with pytest.warns(CheckpointWarning, match=r'checkpoints/4 cannot be read \('):
      _, params, _ = load.model(run)
    assert_trees_equal(params, restore_params(base, 2))
    assert (run / 'checkpoints' / '4').is_dir()
    # A run moves it aside and goes on from the step before it.
    ckpts = checkpoint.Checkpoints(run / 'checkpoints', keep=3)
    with pytest.warns(CheckpointWarning, match=r'checkpoints/4 cannot be read \(.+\); moved it '
                                               r'to .*checkpoints/unreadable/4, and resuming'):
      step, state, _ = ckpts.restore_latest(abstract)
    assert step == 2 and ckpts.latest_step() == 2
    assert_trees_equal(state.params, restore_params(base, 2))
    assert (run / 'checkpoints' / 'unreadable' / '4' / 'state').is_dir()  # kept, never deleted
    ckpts.close()

  # The whole job: resumed from step 2, it computes what an uninterrupted run computes.
  run = tmp_path / 'whole'
  shutil.copytree(base, run)
  truncate_arrays(run / 'checkpoints' / '4')
  config.train.steps = 6
  capsys.readouterr()
  with pytest.warns(CheckpointWarning, match='checkpoints/4 cannot be read'):
    train.run(config, run)
  assert f'resuming {run} from step 2' in capsys.readouterr().out
  assert losses(run) == losses(reference)
  assert_trees_equal(restore_params(run, 6), restore_params(reference, 6))
  assert (run / 'checkpoints' / 'unreadable' / '4').is_dir()

  # None reads: the reader says so; a run starts afresh and says so.
  run = tmp_path / 'none'
  shutil.copytree(base, run)
  truncate_arrays(run / 'checkpoints' / '2')
  metadata_not_json(run / 'checkpoints' / '4')
  with pytest.warns(CheckpointWarning), pytest.raises(
      ConfigError, match=r"none of its checkpoints can be read \(step 4: .*; step 2: .*\)"):
    load.model(run)
  with pytest.warns(CheckpointWarning, match='can be read: starting afresh'):
    assert checkpoint.Checkpoints(run / 'checkpoints', keep=3).restore_latest(abstract) is None
  assert sorted(p.name for p in (run / 'checkpoints' / 'unreadable').iterdir()) == ['2', '4']


def strict_json(line: str) -> dict:
  def refuse(constant):
    raise ValueError(f'{constant} is not JSON')
  return json.loads(line, parse_constant=refuse)


def test_a_nonfinite_step_stops_the_run_before_it_reaches_a_checkpoint(config, tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      cli(config, workdir, **{'train.learning_rate': 1e4, 'train.grad_clip': 0.0,
                              'train.steps': 40, 'train.checkpoint_every': 3,
                              'train.eval_every': 100, 'train.log_every': 2}),
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  error = proc.stderr.strip().splitlines()[-1]
  match = re.fullmatch(r'error: step (\d+): loss \S+, gradient norm \S+: not finite, so the run '
                       r'stopped without applying it; the newest checkpoint, step (\d+), is '
                       r'finite and kept: lower train.learning_rate, .*', error)
  assert match, error
  step, kept = int(match[1]), int(match[2])
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir())
  assert steps[-1] == kept < step < 40
  for s in steps:
    for leaf in jax.tree.leaves(restore_params(workdir, s)):
      assert np.isfinite(leaf).all(), s
  records = [strict_json(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert any(v is None for r in records for v in r.values())  # the non-finite values: null
  assert max(r['step'] for r in records) <= step + 1
  assert 'final validation' not in proc.stdout
  assert not (workdir / 'lock').exists()


def poison_steps(monkeypatch, steps: set[int]) -> None:
  """Makes the loss NaN at the given (1-based) steps of every train_step built from now on."""
  make = train.make_train_step

  def poisoned(loss_fn, schedule, *args):
    def step_fn(state, batch):
      bad = jnp.isin(state.step + 1, jnp.asarray(sorted(steps)))
      def loss(params, batch, rng):
        value, metrics = loss_fn(params, batch, rng)
        value = value * (1 + jnp.where(bad, jnp.nan, 0.0))  # NaN gradients too
        return value, {**metrics, 'loss': value}
      return make(loss, schedule, *args)(state, batch)
    return step_fn
  monkeypatch.setattr(train, 'make_train_step', poisoned)


def test_skip_nonfinite_steps_skips_their_updates_then_stops(config, tmp_path, monkeypatch,
                                                             capsys):
  poison_steps(monkeypatch, {4, 6})
  config.train.update(steps=8, checkpoint_every=1, keep_checkpoints=10, eval_every=100,
                      skip_nonfinite_steps=2)
  run = tmp_path / 'run'
  result = train.run(config, run)
  assert result['step'] == 8 and np.isfinite(result['val/loss'])
  out = capsys.readouterr().out
  assert 'step 4: loss nan, gradient norm nan: not finite, update skipped (1 of ' \
         'train.skip_nonfinite_steps=2)' in out and '(2 of train.skip_nonfinite_steps=2)' in out
  params = {s: restore_params(run, s) for s in range(1, 9)}
  assert_trees_equal(params[4], params[3])  # the update of step 4 was not applied
  assert_trees_equal(params[6], params[5])
  assert not np.array_equal(params[5]['embed']['embedding'], params[4]['embed']['embedding'])
  records = [strict_json(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'train/skipped_nonfinite' in r] == [4, 6]
  assert [r['train/loss'] for r in records if r['step'] in (4, 6) and 'train/loss' in r] == [
      None, None]

  config.train.skip_nonfinite_steps = 1  # the second one stops the run
  with pytest.raises(train.TrainingError, match=r'^step 6: loss nan, .* the newest checkpoint, '
                                                r'step 5, is finite and kept: .* let '
                                                r'train.skip_nonfinite_steps=2 skip'):
    train.run(config, tmp_path / 'stops')


def test_train_step_does_not_apply_a_nonfinite_update():
  def loss_fn(params, batch, rng):
    loss = jnp.sum(params['w'] * batch['x'])
    return loss, {'loss': loss}
  schedule = optax.constant_schedule(0.1)
  state = train.TrainState.create(apply_fn=None, params={'w': jnp.ones(3)},
                                  tx=optax.adam(schedule), rng=jax.random.PRNGKey(0))
  step = jax.jit(train.make_train_step(loss_fn, schedule))
  state, metrics = step(state, {'x': jnp.array([1.0, 2.0, 3.0])})
  assert bool(metrics['finite']) and not np.array_equal(state.params['w'], np.ones(3))
  before = jax.device_get(state)
  for bad in (np.nan, np.inf):
    state, metrics = step(state, {'x': jnp.array([1.0, bad, 3.0])})
    assert not bool(metrics['finite'])
    assert_trees_equal(state.params, before.params)
    assert_trees_equal(state.opt_state, before.opt_state)
  assert int(state.step) == 3  # the step count (data order, schedule) still advances


@pytest.mark.slow
def test_a_second_run_on_a_live_workdir_is_refused_and_the_first_finishes(config, tmp_path):
  workdir = tmp_path / 'run'
  first = start_and_wait_for_checkpoint(
      cli(config, workdir, **{'train.steps': 400, 'train.checkpoint_every': 5,
                              'train.log_every': 5, 'train.eval_every': 1000}), workdir, 5)
  lock = json.loads((workdir / 'lock').read_text())
  assert (lock['host'], lock['pid']) == (socket.gethostname(), first.pid)
  second = subprocess.run(cli(config, workdir), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert second.returncode == 2, second.stderr[-2000:]
  assert second.stderr.strip().splitlines()[-1] == (
      f"error: --workdir={str(workdir)!r} is in use by the run of pid {first.pid} on host "
      f"{socket.gethostname()} (since {lock['since']}): wait for it to end or stop it, or give "
      f"another --workdir (a run on another host that died leaves {workdir / 'lock'}: delete it)")
  out = first.communicate(timeout=600)[0]
  assert first.returncode == 0 and 'final validation at step 400' in out, out[-2000:]
  assert sorted(losses(workdir)) == list(range(5, 401, 5))
  assert not (workdir / 'lock').exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(config, tmp_path):
  config.train.update(steps=3, eval_every=100, checkpoint_every=3)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  dead = subprocess.Popen(['true'])
  dead.wait()
  host = socket.gethostname()
  for owner, gone in [({'host': host, 'pid': dead.pid}, f'pid {dead.pid}'),
                      # a live pid that another process reuses: its start time differs
                      ({'host': host, 'pid': os.getpid(), 'started': '1'}, f'pid {os.getpid()}')]:
    (workdir / 'lock').write_text(json.dumps({**owner, 'since': '2026-01-01 00:00:00'}))
    with pytest.warns(CheckpointWarning, match=rf'lock: taking over the lock of {gone} '
                                               r'\(since 2026-01-01 00:00:00\), which is gone'):
      train.run(config, workdir)
    assert not (workdir / 'lock').exists()
  # A lock left empty by a process that died while writing it.
  (workdir / 'lock').write_text('')
  with pytest.warns(CheckpointWarning, match='taking over the lock of a run that died while '
                                             'taking it'):
    with checkpoint.WorkdirLock(workdir):
      assert json.loads((workdir / 'lock').read_text())['pid'] == os.getpid()
  assert not (workdir / 'lock').exists()
  # A lock of another host cannot be checked from here: refused, and left as it is.
  other = json.dumps({'host': 'elsewhere', 'pid': 1, 'since': '2026-01-01 00:00:00'})
  (workdir / 'lock').write_text(other)
  with pytest.raises(checkpoint.WorkdirBusy, match=r'in use by the run of pid 1 on host '
                                                   r'elsewhere'):
    train.run(config, workdir)
  assert (workdir / 'lock').read_text() == other


def test_one_jsonl_file_splits_by_document_the_same_on_every_build(config, tmp_path, capsys):
  lines = [json.dumps({'text': f'def f{i}(x):\n    return x * {i} + {i % 7}\n'})
           for i in range(300)]
  path = tmp_path / 'data' / 'train.jsonl'
  path.parent.mkdir()
  path.write_text('\n'.join(lines) + '\n')
  config.data.update(paths=str(path), val_fraction=0.1)
  config.train.update(steps=4, eval_every=2, checkpoint_every=4)
  result = train.run(config, tmp_path / 'run')
  assert np.isfinite(result['val/loss'])
  # The validation documents are those whose line hashes below the fraction (SHA-256).
  is_val = [int.from_bytes(hashlib.sha256(line.encode()).digest()[:8], 'big') / 2**64 < 0.1
            for line in lines]
  from lm import tokenizers
  tok = tokenizers.load('bytes')
  expected = np.concatenate([[tok.bos_id, *tok.encode(json.loads(line)['text']), tok.eos_id]
                             for line, val in zip(lines, is_val) if val])
  builds = []
  for cache in ('cache_a', 'cache_b'):  # a second build, elsewhere: the same split
    config.data.cache_dir = str(tmp_path / cache)
    splits = store.load_or_build(train.setup(config, tmp_path / 'run').cfg.data, tok)
    builds.append(np.asarray(splits['val'].tokens))
    assert splits['val'].num_documents == sum(is_val) and 10 < sum(is_val) < 60
    assert splits['train'].num_documents == 300 - sum(is_val)
    assert splits['val'].num_files == splits['train'].num_files == 1
  np.testing.assert_array_equal(builds[0], expected)
  np.testing.assert_array_equal(builds[1], expected)


def test_an_async_save_does_not_read_donated_buffers(tmp_path):
  ckpts = checkpoint.Checkpoints(tmp_path / 'checkpoints', keep=2, async_save=True)
  state = {'w': jnp.arange(4_000_000, dtype=jnp.float32), 'b': jnp.ones(7)}
  update = jax.jit(lambda s: jax.tree.map(lambda x: x * 2 + 1, s), donate_argnums=0)
  state = update(state)
  expected = jax.device_get(jax.tree.map(jnp.copy, state))
  class Cfg:  # the config item of a checkpoint
    to_dict = staticmethod(lambda: {'note': 'test'})
  ckpts.save(1, state, {'next_index': 0}, Cfg())
  for _ in range(5):  # updates that donate the state while it is being written
    state = update(state)
  ckpts.close()
  restored, data = checkpoint.Checkpoints(tmp_path / 'checkpoints', keep=2).restore(
      1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state))
  assert_trees_equal(restored, expected)
  assert data == {'next_index': 0}


@pytest.mark.slow
def test_sigkill_during_an_async_save_resumes_exactly(config, tmp_path, capsys):
  # A larger model, so that a save takes long enough to be caught in the act.
  config.model.update(d_model=128, num_heads=4, mlp_dim=512, num_layers=4)
  config.train.update(steps=12, warmup_steps=0, min_lr_ratio=1.0, checkpoint_every=3,
                      eval_every=100)
  reference = tmp_path / 'reference'
  train.run(config, reference)
  killed = tmp_path / 'killed'
  proc = start_and_wait_for_checkpoint(cli(config, killed, **{'train.steps': 100000}), killed, 3)
  deadline = time.time() + 120
  while not list((killed / 'checkpoints').glob('*.orbax-checkpoint-tmp*')):
    assert time.time() < deadline and proc.poll() is None, 'no save in progress seen'
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  writing = [p.name for p in (killed / 'checkpoints').glob('*.orbax-checkpoint-tmp*')]
  capsys.readouterr()
  with pytest.warns(CheckpointWarning, match='taking over the lock'):
    train.run(config, killed)
  resumed_from = int(capsys.readouterr().out.split('from step ')[1].split()[0])
  assert writing and resumed_from < int(writing[0].split('.')[0]), (writing, resumed_from)
  assert losses(killed) == losses(reference)
  assert_trees_equal(restore_params(killed, 12), restore_params(reference, 12))


def read_only_mount_available() -> bool:
  probe = subprocess.run(['unshare', '-m', 'true'], capture_output=True) if shutil.which(
      'unshare') else None
  return os.geteuid() != 0 or (probe is not None and probe.returncode == 0)


@pytest.mark.slow
def test_a_save_that_cannot_be_written_fails_clearly_and_keeps_the_older_steps(config, tmp_path):
  assert read_only_mount_available(), 'as root, the test needs unshare -m (mount namespaces)'
  config.train.update(steps=4, checkpoint_every=2, eval_every=100)
  workdir = tmp_path / 'run'
  train.run(config, workdir)
  checkpoints = workdir / 'checkpoints'
  before = {p: p.read_bytes() for p in checkpoints.rglob('*') if p.is_file()}
  command = cli(config, workdir, **{'train.steps': 8})
  if os.geteuid() == 0:  # root writes through permission bits: a read-only bind mount instead
    script = (f'mount --bind {checkpoints} {checkpoints} && '
              f'mount -o remount,bind,ro {checkpoints} && exec "$@"')
    command = ['unshare', '-m', 'sh', '-c', script, 'sh', *command]
  else:
    checkpoints.chmod(0o555)
  try:
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  finally:
    checkpoints.chmod(0o755)
  assert proc.returncode == 1, proc.stderr[-3000:]
  error = proc.stderr.strip().splitlines()[-1]
  assert re.fullmatch(rf'error: could not write the checkpoint of step 6 in {checkpoints} \(.*'
                      r'(Read-only file system|Permission denied).*\); the checkpoints of steps '
                      r'\[2, 4\] are intact: free space or make the directory writable, then run '
                      r'the same command to resume', error), error
  assert {p: p.read_bytes() for p in checkpoints.rglob('*') if p.is_file()} == before
  params = restore_params(workdir, 4)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  assert not (workdir / 'lock').exists()
  if os.geteuid() != 0:
    return
  # A full disk (root only: a tmpfs of a few hundred KB in a private mount namespace): the same
  # clear failure, the older steps intact, and nothing of the failed save left to take space.
  full = tmp_path / 'full'
  size_kb = sum(p.lstat().st_blocks * 512 for p in workdir.rglob('*')) // 1024 + 200
  script = (f'mount -t tmpfs -o size={size_kb}k tmpfs {full} && cp -a {workdir} {full}/run && '
            '"$@"; status=$?; cp -a ' + f'{full}/run {tmp_path}/after_full; exit $status')
  full.mkdir()
  proc = subprocess.run(['unshare', '-m', 'sh', '-c', script, 'sh',
                         *cli(config, full / 'run', **{'train.steps': 8})],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert re.fullmatch(rf'error: could not write the checkpoint of step 6 in {full}/run/'
                      r'checkpoints \(.*No space.*\); the checkpoints of steps \[2, 4\] are '
                      r'intact: .*', last), last
  after = tmp_path / 'after_full' / 'checkpoints'
  assert sorted(p.name for p in after.iterdir()) == ['2', '4']
  assert_trees_equal(restore_params(tmp_path / 'after_full', 4), params)
