"""The workdir: its lock, orbax checkpoints (train state + data-iterator state + config),
config.json, the tokenizer, metrics.jsonl and TensorBoard events.

Nothing is lost under faults:
- orbax writes each checkpoint into a temporary directory and renames it when complete, so a
  run killed at any moment (SIGKILL included) leaves its last completed checkpoint intact;
- saves are asynchronous: the device-to-host copy happens in `save` (on CPU the host view keeps
  the buffers, which then cannot be donated), the writing overlaps the next steps, and a save
  that fails (read-only or full disk) raises `CheckpointError` naming the steps still intact;
- a checkpoint that cannot be read (truncated or missing files, metadata that is not JSON,
  arrays of the wrong shape) is moved aside into `checkpoints/unreadable/` with a warning, never
  deleted, and the run resumes from the newest one that reads;
- `WorkdirLock` lets one run at a time write a workdir.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import re
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

from lm import files, models
from lm.config import Config, ConfigError, model_from_dict, upgrade_saved
from lm.models import ModelConfig

# Keys that may differ when a run is resumed: they change how long it runs, what it reports or
# how it saves, not what the saved state means. Any other difference is an incompatible run.
RESUMABLE_CHANGES = frozenset({
    'train.steps', 'train.log_every', 'train.eval_every', 'train.eval_batches',
    'train.checkpoint_every', 'train.keep_checkpoints', 'train.peak_flops',
    'train.num_samples', 'train.sample_len', 'train.skip_nonfinite_steps',
    'train.async_checkpoints', 'train.grad_accum_steps', 'data.cache_dir', 'mesh.shape',
    'distributed.coordinator_address', 'distributed.num_processes', 'distributed.process_id',
    'distributed.local_device_ids', 'distributed.initialization_timeout',
    'train.wandb_project', 'train.wandb_group', 'eval.stride'})
UNREADABLE = 'unreadable'  # checkpoints/unreadable/<step>: checkpoints that could not be read


class CheckpointWarning(UserWarning):
  """A checkpoint could not be read and was skipped (and, by a training run, moved aside)."""


class CheckpointError(RuntimeError):
  """A checkpoint could not be written; the earlier ones are intact."""


class WorkdirBusy(ConfigError):
  """Another live run holds the workdir's lock."""


def flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
  return out


def _process_start(pid: int) -> str | None:
  """When process `pid` of this host started (Linux: /proc/PID/stat field 22), to tell a live
  run from a new process that reuses a dead run's pid; None where there is no /proc."""
  try:
    return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _is_alive(owner: dict[str, Any]) -> bool:
  """Whether the process that wrote a lock on this host still runs."""
  try:
    os.kill(owner['pid'], 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  started = _process_start(owner['pid'])
  return None in (started, owner.get('started')) or started == owner['started']


class WorkdirLock:
  """`workdir/lock` for the length of a run: one run writes a workdir at a time.

  The lock file (JSON: host, pid, the pid's start time, since) is created exclusively. A second
  run finds it and raises WorkdirBusy naming the owner. A lock whose process is gone from this
  host (killed) is taken over with a warning; one from another host is never taken over, since
  its process cannot be checked from here. Multi-host runs: only process 0 takes it
  (`enabled=False` elsewhere). On exit the lock is removed, and so is the workdir if the lock
  created it and nothing else was written (a config error leaves no trace). On an object store
  (a gs:// workdir) the lock is advisory: there is no exclusive create and no process to check,
  so a lock found there is named in a warning and taken over.
  """

  def __init__(self, workdir: files.PathLike, enabled: bool = True):
    self.workdir, self.enabled = files.path(workdir), enabled
    self.path = self.workdir / 'lock'
    self.created_workdir = False

  def __enter__(self) -> 'WorkdirLock':
    if not self.enabled:
      return self
    if not files.is_local(self.workdir):
      return self._advisory()
    me = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': _process_start(os.getpid()), 'since': time.strftime('%Y-%m-%d %H:%M:%S')}
    try:
      self.created_workdir = not self.workdir.exists()
      self.workdir.mkdir(parents=True, exist_ok=True)
      while not self._create(me):
        owner = self._owner()
        if owner == {}:  # released meanwhile: try again
          continue
        if owner is not None and (owner.get('host') != me['host'] or _is_alive(owner)):
          raise WorkdirBusy(
              f'--workdir={str(self.workdir)!r} is in use by the run of pid {owner.get("pid")} '
              f'on host {owner.get("host")} (since {owner.get("since")}): wait for it to end or '
              f'stop it, or give another --workdir (a run on another host that died leaves '
              f'{self.path}: delete it)')
        warnings.warn(f'{self.path}: taking over the lock of '
                      + (f'pid {owner["pid"]} (since {owner.get("since")}), which is gone'
                         if owner else 'a run that died while taking it'),
                      CheckpointWarning, stacklevel=2)
        self.path.unlink(missing_ok=True)
    except OSError as e:
      self._remove_workdir()
      raise ConfigError(f'--workdir={str(self.workdir)!r}: not writable ({e.strerror}); '
                        'give a directory you can write to') from e
    return self

  def _advisory(self) -> 'WorkdirLock':
    if self.path.exists():
      warnings.warn(f'{self.path}: another run may be writing this workdir ({self.path.read_text()}'
                    '); on an object store the lock is advisory, and this run takes it over',
                    CheckpointWarning, stacklevel=3)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.path.write_text(json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                                     'since': time.strftime('%Y-%m-%d %H:%M:%S')}))
    return self

  def _create(self, me: dict[str, Any]) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(json.dumps(me))
    return True

  def _owner(self) -> dict[str, Any] | None:
    """The lock's content: {} if it was released meanwhile, None if it is empty or cut (a
    process that died writing it; a second is given for a live writer to finish)."""
    for _ in range(10):
      try:
        owner = json.loads(self.path.read_text())
        if isinstance(owner, dict) and isinstance(owner.get('pid'), int):
          return owner
      except FileNotFoundError:
        return {}
      except ValueError:
        pass
      time.sleep(0.1)
    return None

  def __exit__(self, *exc) -> None:
    if self.enabled:
      self.path.unlink(missing_ok=True)
      self._remove_workdir()

  def _remove_workdir(self) -> None:
    if self.created_workdir and self.workdir.is_dir() and not any(self.workdir.iterdir()):
      self.workdir.rmdir()


def prepare_workdir(workdir: files.PathLike, cfg: Config) -> None:
  """Checks that the run a workdir holds has a config compatible with `cfg`.

  Raises ConfigError for an incompatible run, writing nothing.
  """
  saved_path = files.path(workdir) / 'config.json'
  if saved_path.is_file():
    saved = flatten(upgrade_saved(json.loads(saved_path.read_text())))
    current = flatten(json.loads(cfg.to_json()))
    diffs = [f'{k}: {saved.get(k)!r} in the workdir, {current.get(k)!r} now'
             for k in sorted(set(saved) | set(current))
             if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)]
    if diffs:
      raise ConfigError(f'--workdir={str(workdir)!r} holds a run with another config ('
                        + '; '.join(diffs) + '): give a new --workdir, or the same config to '
                        'resume it')


# What a checkpoint that cannot be read raises: tensorstore's read errors and orbax's shape
# checks are ValueErrors (JSONDecodeError is one), a missing item a KeyError, a missing file
# an OSError.
READ_ERRORS = (ValueError, KeyError, OSError)


def _reason(e: BaseException) -> str:
  """An exception in one line of at most ~400 characters, without tensorstore's trailing spec
  (its cause comes just before)."""
  text = ' '.join(str(e).split())
  text = re.sub(r' ?(\[(tensorstore_spec|source locations)=|See full TensorStore details).*', '',
                text) or type(e).__name__
  if len(text) > 400:
    text = f'{text[:150]} ... {text[-250:]}'
  return f'{type(e).__name__}: {text}'


class _DropOrphanedTaskErrors(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return 'exception was never retrieved' not in record.getMessage()


@contextlib.contextmanager
def _quiet_failed_reads() -> Iterator[None]:
  """A read that fails (reported by our CheckpointWarning) leaves orbax's other reads orphaned:
  tensorstore callbacks aimed at a closed event loop, tasks whose errors nobody retrieves,
  coroutines never awaited. Their reports say nothing more and are dropped here; they are
  collected before leaving so that they report while dropped."""
  previous = sys.unraisablehook
  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and 'Event loop is closed' in str(unraisable.exc_value)
            or asyncio.iscoroutine(unraisable.object)):
      previous(unraisable)
  sys.unraisablehook = hook
  drop = _DropOrphanedTaskErrors()
  logging.getLogger('asyncio').addFilter(drop)
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings('ignore', r'coroutine .* was never awaited', RuntimeWarning)
      try:
        yield
      except BaseException:
        time.sleep(0.05)  # let the failed read's last callbacks land
        gc.collect()
        raise
  finally:
    logging.getLogger('asyncio').removeFilter(drop)
    sys.unraisablehook = previous


class Checkpoints:
  """Orbax CheckpointManager over `workdir/checkpoints`: items `state`, `data`, `config`.

  Saves are asynchronous unless `async_save=False`: `save` returns once the arrays are copied
  to the host, and the files are written while training goes on.
  """

  def __init__(self, directory: files.PathLike, keep: int, async_save: bool = True):
    self.directory = files.path(directory).absolute()
    self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save))
    self.pending: int | None = None  # the step of a save that may still be writing

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict[str, Any], cfg: Config) -> None:
    """Starts saving `step` (the previous save is finished first). Raises CheckpointError when
    this save or the previous one fails."""
    try:
      self.manager.wait_until_finished()
      self.pending = step
      # A directory that cannot be written fails here, before orbax's background threads
      # start (whose failure to create a directory leaves them waiting forever).
      probe = self.directory / f'.write-test-{socket.gethostname()}-{os.getpid()}'
      probe.write_bytes(b'')
      probe.unlink()
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(cfg.to_dict())), force=True)
    except Exception as e:  # orbax re-raises a background write's error here
      raise self._failed(e) from e

  def wait(self) -> None:
    """Blocks until the last save is on disk; raises CheckpointError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._failed(e) from e
    self.pending = None

  def _failed(self, e: Exception) -> CheckpointError:
    failed, self.pending = self.pending, None
    if jax.process_index() == 0:  # what the failed save wrote only takes space
      for partial in self.directory.glob(f'{failed}.orbax-checkpoint-tmp*'):
        with contextlib.suppress(OSError):
          partial.rmtree()
    self.manager.reload()
    intact = [s for s in self.manager.all_steps() if s != failed]
    return CheckpointError(
        f'could not write the checkpoint of step {failed} in {self.directory} ({_reason(e)}); '
        + (f'the checkpoints of steps {intact} are intact' if intact else
           'there is no earlier checkpoint') + ': free space or make the directory writable, '
        'then run the same command to resume')

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """`abstract_state`: ShapeDtypeStructs with shardings, so arrays land where they belong."""
    with _quiet_failed_reads():
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, data-iterator state) of the newest checkpoint that reads, or None.

    Each newer one that cannot be read is named in a CheckpointWarning and moved aside into
    `unreadable/` (by process 0), so that the run goes on from the step before it.
    """
    failed = False
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return (step, *self.restore(step, abstract_state))
      except READ_ERRORS as e:
        failed = True
        moved = self._move_aside(step)
        warnings.warn(f'checkpoint {self.directory / str(step)} cannot be read ({_reason(e)}); '
                      f'moved it to {moved}, and resuming from the checkpoint before it',
                      CheckpointWarning, stacklevel=2)
    if failed:
      warnings.warn(f'no checkpoint in {self.directory} can be read: starting afresh',
                    CheckpointWarning, stacklevel=2)
    return None

  def _move_aside(self, step: int) -> files.PathLike:
    target = self.directory / UNREADABLE / str(step)
    if jax.process_index() == 0:
      target.parent.mkdir(exist_ok=True)
      n = 1
      while target.exists():  # a step that failed before
        target, n = self.directory / UNREADABLE / f'{step}.{n}', n + 1
      (self.directory / str(step)).replace(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'lm: checkpoint {step} moved aside')
    self.manager.reload()
    return target

  def close(self) -> None:
    """Waits for the last save (raising CheckpointError if it failed), then closes."""
    try:
      self.wait()
    finally:
      self.manager.close()


class MetricsLog:
  """`metrics.jsonl` (one JSON object a line, with `step`) and TensorBoard events. On a local
  disk each line is appended; an object store cannot append, so there the file is written
  whole again each time (it is small: a line per logged step), and no TensorBoard events are
  written (tensorboardX's object-store writers need their cloud's client libraries)."""

  def __init__(self, workdir: files.PathLike, resume_step: int, dashboard=None):
    from tensorboardX import SummaryWriter  # heavy import, only where it is used
    self.dashboard = dashboard  # a wandb run (train.wandb_project), or None
    self.path = files.path(workdir) / 'metrics.jsonl'
    self.lines = self._kept_until(resume_step)
    if self.path.is_file():
      files.write_atomic(self.path, ''.join(self.lines))
    local = files.is_local(self.path)
    self.file = self.path.open('a') if local else None
    self.tb = SummaryWriter(str(workdir)) if local else None

  def _kept_until(self, step: int) -> list[str]:
    """Lines of steps past the checkpoint we resume from are recomputed, so they go."""
    if not self.path.is_file():
      return []
    return [line + '\n' for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)['step'] <= step]

  def write(self, step: int, metrics: dict[str, float]) -> None:
    """One line of strict JSON: a value that is not finite (JSON has no NaN) is null there, and
    left out of TensorBoard."""
    record = {k: v if math.isfinite(v) else None for k, v in metrics.items()}
    line = json.dumps({'step': step, **record}, allow_nan=False) + '\n'
    if self.file is not None:
      self.file.write(line)
      self.file.flush()
    else:  # the object store's copy: every line so far, written whole
      self.lines.append(line)
      files.write_atomic(self.path, ''.join(self.lines))
    for key, value in record.items():
      if value is not None and self.tb is not None:
        self.tb.add_scalar(key, value, step)
    if self.dashboard is not None:
      self.dashboard.log({k: v for k, v in record.items() if v is not None}, step=step)

  def close(self) -> None:
    if self.dashboard is not None:
      self.dashboard.finish()
    if self.file is not None:
      self.file.close()
    if self.tb is not None:
      self.tb.close()


def saved_model(workdir: Path) -> ModelConfig:
  """The model config of a run's workdir (its config.json), checked."""
  if not (workdir / 'config.json').is_file():
    raise ConfigError(f'--workdir={str(workdir)!r}: no config.json; give a run directory of '
                      'python -m lm.main')
  cfg = model_from_dict(upgrade_saved(json.loads((workdir / 'config.json').read_text()))['model'])
  models.validate(cfg)
  return cfg


def _shapes(params: Any) -> dict[str, tuple[int, ...]]:
  """'path/to/param' -> shape, of parameters boxed or not."""
  from lm.models.layers import common
  return {common.param_name(path): tuple(x.shape)
          for path, x in jax.tree_util.tree_leaves_with_path(params)}


def _on_this_device(manager: ocp.CheckpointManager, step: int) -> Any:
  """The saved state's shapes and dtypes, each on this process's first device: a checkpoint
  saved on any mesh and process count reads here whole."""
  metadata = manager.item_metadata(step)['state']
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                      getattr(metadata, 'item_metadata', metadata))


def restore_params(workdir: Path, cfg: ModelConfig):
  """The parameters of the newest checkpoint of a run that reads and holds the shapes of a
  model of `cfg`, on this process's first device (whatever mesh saved them); each newer one
  that does not is named in a CheckpointWarning (and left where it is: only a training run
  moves checkpoints)."""
  directory = (workdir / 'checkpoints').absolute()
  no_checkpoint = ConfigError(f'--workdir={str(workdir)!r}: holds no checkpoint yet; train first '
                              f'(python -m lm.main --config=... --workdir={workdir}) or wait for '
                              'its first checkpoint')
  if not directory.is_dir():
    raise no_checkpoint
  expected, reasons = _shapes(models.abstract_params(models.build(cfg))), []
  with ocp.CheckpointManager(directory,
                             item_handlers={'state': ocp.StandardCheckpointHandler()}) as manager:
    if not manager.all_steps():
      raise no_checkpoint
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        with _quiet_failed_reads():
          params = manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(_on_this_device(manager, step))))['state']['params']
        got = _shapes(params)
        if got != expected:
          wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
          raise ValueError(f'{wrong[0]} has shape {got.get(wrong[0])}, the config\'s model '
                           f'{expected.get(wrong[0])} ({len(wrong)} parameters differ)')
        return params
      except READ_ERRORS as e:
        reasons.append(f'step {step}: {_reason(e)}')
        warnings.warn(f'checkpoint {directory / str(step)} cannot be read ({_reason(e)})',
                      CheckpointWarning, stacklevel=2)
  raise ConfigError(f'--workdir={str(workdir)!r}: none of its checkpoints can be read ('
                    + '; '.join(reasons) + '); train it again, or give another run')
