"""experiments/ablate.py: the quick plan end to end (killed and resumed, sharded and merged),
matched budgets, its reports against the runs' metrics, bad plans; train.wandb_project."""
from __future__ import annotations

import csv
import dataclasses
import glob
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lm.config import ConfigError
from tests.conftest import ROOT, tiny_config, write_corpus

sys.path.insert(0, str(ROOT / 'experiments'))
import ablate  # noqa: E402

QUICK = str(ROOT / 'experiments' / 'plans' / 'quick.py')


def data_sets(tmp: Path) -> list[str]:
  corpus = write_corpus(tmp / 'corpus')
  return [f'--set=data.paths={corpus}/*.py', f'--set=data.cache_dir={tmp / "cache"}',
          '--set=data.val_fraction=0.25']


def command(out: Path, sets: list[str], *extra: str) -> list[str]:
  return [sys.executable, str(ROOT / 'experiments' / 'ablate.py'), f'--plan={QUICK}',
          f'--out={out}', *sets, *extra]


def finish(capsys, out: Path, sets: list[str], *extra: str) -> str:
  """Runs the plan in this process (as the command does) and returns what it printed."""
  capsys.readouterr()
  assert ablate.main(command(out, sets, *extra)[2:]) == 0, capsys.readouterr().err[-3000:]
  return capsys.readouterr().out


def kill_during_third_run(out: Path, sets: list[str]) -> Path:
  """Starts the plan and SIGKILLs it once the third run (gpt2 at the first learning rate) has a
  checkpoint: that run is then midway."""
  proc = subprocess.Popen(command(out, sets), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  try:
    while time.time() < deadline:
      found = [p for p in glob.glob(str(out / 'runs' / 'gpt2-lr0.005-s0-*' / 'checkpoints' / '*'))
               if Path(p).name.isdigit()]  # a finished checkpoint (orbax renames it so)
      if found:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return Path(found[0]).parents[1]
      assert proc.poll() is None, 'the plan ended before its third run checkpointed'
      time.sleep(0.005)
  finally:
    proc.kill()
  raise AssertionError('the third run never checkpointed')


def results(out: Path) -> dict[str, dict]:
  return ablate.results_of(out)


@pytest.mark.slow
def test_quick_plan_killed_resumed_sharded_and_merged(tmp_path, capsys):
  sets = data_sets(tmp_path)
  whole = tmp_path / 'whole'
  interrupted = kill_during_third_run(whole, sets)
  assert not (interrupted / 'result.json').exists()
  assert len(results(whole)) == 2
  log = finish(capsys, whole, sets)
  assert '[3/6] gpt2 lr 0.005 seed 0' in log and 'plan ETA' in log
  assert 'resuming' in (interrupted / 'log.txt').read_text()
  done = results(whole)
  assert len(done) == 6 and len(list((whole / 'runs').glob('*/result.json'))) == 6
  sweep = sorted((r['arm'], r['learning_rate']) for r in done.values() if r['seed'] == 0)
  assert sweep == [('gpt2', 0.005), ('gpt2', 0.01), ('llama', 0.005), ('llama', 0.01)]
  best = {arm: min((r for r in done.values() if r['arm'] == arm and r['seed'] == 0),
                   key=lambda r: r['metric_value'])['learning_rate'] for arm in ('llama', 'gpt2')}
  assert sorted((r['arm'], r['learning_rate']) for r in done.values() if r['seed'] == 1) == [
      ('gpt2', best['gpt2']), ('llama', best['llama'])]  # the other seed at the best rate
  for r in done.values():  # each run once: its steps logged once, in order
    steps = [json.loads(l)['step'] for l in (whole / 'runs' / r['name'] / 'metrics.jsonl')
             .read_text().splitlines() if 'train/loss' in l]
    assert steps == sorted(set(steps)) and steps[-1] == r['planned_steps'] == r['steps']

  # Shards in two directories, merged by key, give the whole plan's runs and figures.
  a, b = tmp_path / 'a', tmp_path / 'b'
  assert 'other shards' in finish(capsys, a, sets, '--shard=0/2')
  assert 'other shards' in finish(capsys, b, sets, '--shard=1/2')
  assert len(results(a)) == len(results(b)) == 2
  finish(capsys, a, sets, '--shard=0/2', f'--merge={b}')
  finish(capsys, b, sets, '--shard=1/2', f'--merge={a}')
  finish(capsys, a, sets, '--shard=0/2', f'--merge={b}')
  merged = results(a)
  assert set(merged) == set(done)
  for key, r in done.items():  # the resumed run's final metric equals the uninterrupted one's
    assert math.isclose(merged[key]['metric_value'], r['metric_value'], rel_tol=1e-6), r['name']

  # The reports agree with the runs' metrics.jsonl.
  with open(whole / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6
  for row in rows:
    lines = [json.loads(l) for l in (whole / 'runs' / row['name'] / 'metrics.jsonl')
             .read_text().splitlines()]
    assert math.isclose(float(row['bpb']), lines[-1]['val/bpb'], rel_tol=1e-9)
    assert int(row['steps']) == lines[-1]['step']
    # matched budget: each run's training FLOPs within 2% of the plan's
    assert abs(float(row['train_flops']) / 4e9 - 1) < 0.02, row
    assert int(row['params']) > int(row['embedding_params']) > 0
    assert float(row['tokens_per_sec']) > 0 and 0 < float(row['mfu']) < 1
  md = (whole / 'results.md').read_text()
  at = lambda arm, seed: next(r for r in done.values() if r['arm'] == arm and r['seed'] == seed
                              and r['learning_rate'] == best[arm])
  values = {arm: [at(arm, s)['metric_value'] for s in (0, 1)] for arm in best}
  mean = lambda v: sum(v) / len(v)
  assert f'{mean(values["llama"]):.4f}' in md and f'{mean(values["gpt2"]):.4f}' in md
  diff = mean([g - l for g, l in zip(values['gpt2'], values['llama'])])
  assert f'{diff:+.4f}' in md
  assert 'gzip -9' in md and 'xz -9e given train' in md
  for plot in ablate.PLOTS:
    assert (whole / plot).stat().st_size > 10_000
  # Nothing left to do: a rerun trains nothing.
  assert '[' not in finish(capsys, whole, sets).split('steps llama')[1].split('wrote')[0]


def write_plan(path: Path, **changes) -> str:
  text = Path(QUICK).read_text().replace('  return dict(', '  plan = dict(')
  text += '\n  '.join(['', *[f'plan[{k!r}] = {v!r}' for k, v in changes.items()],
                       'return plan', ''])
  path.write_text(text)
  return str(path)


def fails(capsys, plan: str, out: Path, sets: list[str], *extra: str) -> str:
  assert ablate.main([f'--plan={plan}', f'--out={out}', *sets, *extra]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and '\n' not in err
  return err


def test_bad_plans_are_one_line_errors(tmp_path, capsys):
  sets = data_sets(tmp_path)
  out = tmp_path / 'out'
  arms = {'llama': {}, 'gpt2': {'model.no_such_key': 1}}
  err = fails(capsys, write_plan(tmp_path / 'p1.py', arms=arms), out, sets)
  assert "arm 'gpt2': model.no_such_key" in err
  arms = {'llama': {}, 'bert': {'config': 'configs/encoder.py'}}
  err = fails(capsys, write_plan(tmp_path / 'p2.py', arms=arms), out, sets)
  assert "arm 'bert': data.task='mlm_nsp'" in err
  arms = {'llama': {}, 'bert': {'model.family': 'encoder'}}
  err = fails(capsys, write_plan(tmp_path / 'p3.py', arms=arms), out, sets)
  assert "arm 'bert': model.family='encoder'" in err and "trains on ('mlm_nsp',)" in err
  err = fails(capsys, write_plan(tmp_path / 'p4.py', lr_multipliers=()), out, sets)
  assert 'plan.lr_multipliers=()' in err
  err = fails(capsys, write_plan(tmp_path / 'p5.py', budget={'flops': 1e6}), out, sets)
  assert 'plan.budget' in err and 'steps' in err
  assert not out.exists()  # nothing written for a bad plan

  # A changed plan under an existing output is refused, naming the arm; new arms need --add.
  plan = ablate.load_plan(QUICK, [s[len('--set='):] for s in sets])
  ablate.check_unchanged(out, plan, {n: ablate.make_arm(plan, n) for n in plan.arms}, False)
  changed = {'llama': {'model.num_layers': 1}, 'gpt2': dict(plan.arms['gpt2'])}
  err = fails(capsys, write_plan(tmp_path / 'p6.py', arms=changed), out, sets)
  assert "arms ['llama'] differ" in err
  more = {**plan.arms, 'deeper': {'model.num_layers': 3}}
  err = fails(capsys, write_plan(tmp_path / 'p7.py', arms=more), out, sets)
  assert "adds the arms ['deeper']" in err and '--add' in err


def wandb_records(path: str):
  """The records of an offline W&B run file (LevelDB log blocks of protobuf Records)."""
  from wandb.proto import wandb_internal_pb2
  data, pos, chunk = Path(path).read_bytes(), 7, b''  # 7: the file's own header
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
      pos += 32768 - pos % 32768
      continue
    _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
    chunk += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # a full record, or the last piece of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunk)
      chunk = b''
      yield record


def test_wandb_logs_config_and_metrics_offline(tmp_path, monkeypatch):
  from lm import train
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  config = tiny_config(write_corpus(tmp_path / 'corpus'), tmp_path / 'cache', steps=4,
                       log_every=2, eval_every=2, checkpoint_every=4)
  config.train.update(wandb_project='lm-test', wandb_group='plan-x')
  train.run(config, tmp_path / 'run')
  [path] = glob.glob(str(tmp_path / 'run' / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
  records = list(wandb_records(path))
  [run] = [r.run for r in records if r.WhichOneof('record_type') == 'run']
  assert (run.project, run.run_group, run.display_name) == ('lm-test', 'plan-x', 'run')
  config_items = {i.key: json.loads(i.value_json) for i in run.config.update}
  assert config_items['train']['learning_rate'] == 3e-3
  history = [{i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
             for r in records if r.WhichOneof('record_type') == 'history']
  logged = json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()[0])
  assert any(h.get('_step') == logged['step'] and
             math.isclose(h['train/loss'], logged['train/loss']) for h in history)
  assert any('val/bpb' in h for h in history)


def test_wandb_not_installed_is_a_config_error(tmp_path, monkeypatch):
  import importlib.util
  from lm import config as config_lib
  from tests.conftest import load_config
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'wandb' else real(name, *a))
  config = load_config()
  config.train.wandb_project = 'x'
  with pytest.raises(config_lib.ConfigError, match="train.wandb_project='x': wandb is not"):
    config_lib.parse(config, vocab_size=259, device_count=1)


def test_a_seconds_budget_times_each_arm_once(tmp_path, monkeypatch):
  sets = [s[len('--set='):] for s in data_sets(tmp_path)]
  plan = dataclasses.replace(ablate.load_plan(QUICK, sets), budget={'seconds': 0.5},
                             timing_steps=3)
  arms = {n: ablate.make_arm(plan, n) for n in plan.arms}
  times = ablate.step_times(tmp_path / 'out', plan, arms)
  for name, arm in arms.items():
    steps = ablate.budget_steps(plan, arm, times[name])
    assert steps * times[name] <= 0.5 < (steps + 1) * times[name]
  def timed_again(*args):
    raise AssertionError('timed again')
  monkeypatch.setattr(ablate.train, 'step_timer', timed_again)
  assert ablate.step_times(tmp_path / 'out', plan, arms) == times  # kept in OUT/timing


def test_arms_whose_steps_cost_the_same_share_one_timing(tmp_path, monkeypatch):
  sets = [s[len('--set='):] for s in data_sets(tmp_path)]
  arms = {'llama': {}, 'low_lr': {'train.learning_rate': 1e-3, 'train.weight_decay': 0.0,
                                  'train.seed': 3},
          'deeper': {'model.num_layers': 3}}
  plan = dataclasses.replace(ablate.load_plan(QUICK, sets), budget={'seconds': 1.0}, arms=arms)
  made = {n: ablate.make_arm(plan, n) for n in arms}
  assert made['llama'].identity != made['low_lr'].identity  # different runs, different keys
  timed = []
  def step_timer(config, workdir):
    timed.append(config.model.num_layers)
    return lambda n, t=0.1 * len(timed): [t] * n  # a noisy clock: each timing differs
  monkeypatch.setattr(ablate.train, 'step_timer', step_timer)
  times = ablate.step_times(tmp_path / 'out', plan, made)
  assert sorted(timed) == [2, 3]  # one timing for llama and low_lr, one for deeper
  assert times['llama'] == times['low_lr'] != times['deeper']
  assert (ablate.budget_steps(plan, made['llama'], times['llama'])
          == ablate.budget_steps(plan, made['low_lr'], times['low_lr']))


def test_arms_are_timed_in_turns_so_a_drifting_clock_slows_them_alike(tmp_path, monkeypatch):
  sets = [s[len('--set='):] for s in data_sets(tmp_path)]
  arms = {'llama': {}, 'deeper': {'model.num_layers': 3}}
  clock = []  # a machine that slows down: each step takes 1 ms longer than the one before
  def step_timer(config, workdir):
    def timer(n):
      clock.extend([0.1 + 0.001 * len(clock) for _ in range(n)])
      return clock[-n:]
    return timer
  monkeypatch.setattr(ablate.train, 'step_timer', step_timer)
  for rounds, spread in ((1, 0.04), (4, 0.01)):  # timed one after the other: 40 ms apart
    plan = dataclasses.replace(ablate.load_plan(QUICK, sets), budget={'seconds': 1.0}, arms=arms,
                               timing_steps=40, timing_rounds=rounds)
    made = {n: ablate.make_arm(plan, n) for n in arms}
    clock.clear()
    times = ablate.step_times(tmp_path / f'out{rounds}', plan, made)
    assert len(clock) == 80
    assert times['deeper'] - times['llama'] == pytest.approx(spread)


def test_an_arms_identity_ignores_what_each_run_sets(tmp_path):
  sets = [s[len('--set='):] for s in data_sets(tmp_path)]
  plan = ablate.load_plan(QUICK, sets)
  arm = ablate.make_arm(plan, 'llama')
  for key, value in (('train.steps', 123), ('train.eval_every', 7), ('train.seed', 5)):
    other = dataclasses.replace(plan, overrides={**plan.overrides, key: value})
    assert ablate.make_arm(other, 'llama').identity == arm.identity
  changed = dataclasses.replace(plan, overrides={**plan.overrides, 'train.weight_decay': 0.3})
  assert ablate.make_arm(changed, 'llama').identity != arm.identity


def test_an_arm_sets_the_tokenizers_vocabulary_but_not_the_models():
  config = ablate.base_config('configs/decoder.py')
  ablate.override(config, 'tokenizer.vocab_size', 1024, "arm 'vocab_1024'")
  assert config.tokenizer.vocab_size == 1024
  with pytest.raises(ConfigError, match=r"arm 'v': model.vocab_size=7: not a key of model"):
    ablate.override(config, 'model.vocab_size', 7, "arm 'v'")
