"""The workdir: orbax checkpoints (train state + data-iterator state + config), config.json,
the tokenizer, metrics.jsonl and TensorBoard events.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed at any moment leaves its last completed checkpoint intact.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from lm.config import Config, ConfigError, ModelConfig, validate_model

# Keys that may differ when a run is resumed: they change how long it runs or what it reports,
# not what the saved state means. Any other difference is an incompatible run.
RESUMABLE_CHANGES = frozenset({
    'train.steps', 'train.log_every', 'train.eval_every', 'train.eval_batches',
    'train.checkpoint_every', 'train.keep_checkpoints', 'train.peak_flops',
    'train.num_samples', 'train.sample_len', 'data.cache_dir', 'mesh.shape'})


def flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
  return out


def write_atomic(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


def prepare_workdir(workdir: Path, cfg: Config) -> None:
  """Creates the workdir, or checks that the run it holds has a compatible config.

  Raises ConfigError for an unwritable workdir or an incompatible run, writing nothing.
  """
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / '.write-test'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise ConfigError(f'--workdir={str(workdir)!r}: not writable ({e.strerror}); '
                      'give a directory you can write to') from e
  saved_path = workdir / 'config.json'
  if saved_path.is_file():
    saved = flatten(json.loads(saved_path.read_text()))
    current = flatten(json.loads(cfg.to_json()))
    diffs = [f'{k}: {saved.get(k)!r} in the workdir, {current.get(k)!r} now'
             for k in sorted(set(saved) | set(current))
             if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)]
    if diffs:
      raise ConfigError(f'--workdir={str(workdir)!r} holds a run with another config ('
                        + '; '.join(diffs) + '): give a new --workdir, or the same config to '
                        'resume it')


class Checkpoints:
  """Orbax CheckpointManager over `workdir/checkpoints`: items `state`, `data`, `config`."""

  def __init__(self, directory: Path, keep: int):
    # Synchronous: the train step donates the state's buffers, which an asynchronous save
    # would still be reading.
    self.manager = ocp.CheckpointManager(
        directory.absolute(), options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict[str, Any], cfg: Config) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(cfg.to_dict())), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """`abstract_state`: ShapeDtypeStructs with shardings, so arrays land where they belong."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class MetricsLog:
  """`metrics.jsonl` (one JSON object a line, with `step`) and TensorBoard events."""

  def __init__(self, workdir: Path, resume_step: int):
    from tensorboardX import SummaryWriter  # heavy import, only where it is used
    self.path = workdir / 'metrics.jsonl'
    self._drop_after(resume_step)
    self.file = open(self.path, 'a')
    self.tb = SummaryWriter(str(workdir))

  def _drop_after(self, step: int) -> None:
    """Lines of steps past the checkpoint we resume from are recomputed, so they go."""
    if self.path.is_file():
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line)['step'] <= step]
      write_atomic(self.path, ''.join(line + '\n' for line in kept))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    self.file.write(json.dumps({'step': step, **metrics}) + '\n')
    self.file.flush()
    for key, value in metrics.items():
      self.tb.add_scalar(key, value, step)

  def close(self) -> None:
    self.file.close()
    self.tb.close()


def load_model(workdir: Path, tokenizer_arg: str | None = None):
  """(ModelConfig, params, tokenizer) of a run's workdir or a Hugging Face directory."""
  from lm import hf, tokenizers  # hf imports this module
  config_path = workdir / 'config.json'
  if not config_path.is_file():
    raise ConfigError(f'--workdir={str(workdir)!r}: no config.json; give a run directory of '
                      'python -m lm.main, or a Hugging Face model directory')
  saved = json.loads(config_path.read_text())
  if 'model_type' in saved:  # a Hugging Face directory
    if not tokenizer_arg and not (workdir / 'tokenizer' / 'tokenizer.json').is_file():
      raise ConfigError(f'--workdir={str(workdir)!r} is a Hugging Face directory: name its '
                        'tokenizer with --tokenizer=bytes|cl100k|DIR')
    cfg, params = hf.load(workdir)
    return cfg, params, tokenizers.load(tokenizer_arg or workdir / 'tokenizer')
  cfg = ModelConfig(**saved['model'])
  validate_model(cfg)
  return cfg, restore_params(workdir), tokenizers.load(tokenizer_arg or workdir / 'tokenizer')


def restore_params(workdir: Path):
  """The parameters of the latest checkpoint of a run."""
  directory = (workdir / 'checkpoints').absolute()
  step = ocp.CheckpointManager(directory).latest_step() if directory.is_dir() else None
  if step is None:
    raise ConfigError(f'--workdir={str(workdir)!r}: holds no checkpoint yet; train first '
                      f'(python -m lm.main --config=... --workdir={workdir}) or wait for its '
                      'first checkpoint')
  with ocp.CheckpointManager(directory) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored['state']['params']
