"""Ablations: every arm of a plan trained at matched compute, its learning rate swept, seeds
paired; a table and plots of what came out.

  python experiments/ablate.py --plan=experiments/plans/families.py --out=runs/ablate/families
      [--shard=I/N] [--add] [--merge=OTHER_OUT] [--set=KEY=VALUE ...]

A plan is a Python file whose `get_plan()` returns a dict (experiments/plans/*.py):

  config          the base config file, e.g. 'configs/decoder.py' (relative to the repository)
  overrides       {'section.key': value}: what every arm gets
  arms            {name: {'section.key': value, ...}}: each arm's overrides; an arm may name its
                  own base file with 'config' (another family, another task)
  baselines       {task: arm}: the arm the others of that data.task are compared with
  metric          {task: 'val metric'}: what an arm of that task is ranked on, lower is better
                  ('bpb' for clm, 'mlm_loss' for mlm_nsp, 'loss' for span); its keys are the
                  tasks the plan's arms may train on
  budget          {'flops': F} training FLOPs a run (steps = F / (FLOPs a token x tokens a
                  step), FLOPs from the family's count), or {'seconds': S} of train steps on
                  this machine (steps = S / the median time of `timing_steps` compiled steps,
                  measured once an arm; arms that differ only in learning rates, weight
                  decay, Adam's moments, the schedule's shape or the seed share one timing)
  lr_multipliers  the sweep, as multiples of each arm's train.learning_rate, e.g. (0.5, 1, 2)
  extend_edge     one more point, a grid step further, where the best sits at an edge
  seeds           (s0, s1, ...): the sweep runs at s0, then the best learning rate at the rest;
                  train.seed fixes the data order and the initialisation, so the same seed
                  gives every arm the same batches (arms of one seq_len and batch size)
  warmup_fraction train.warmup_steps as a share of each run's steps (default 0.05)
  evals_per_run   evaluations along a run, for the curves (default 8)
  checkpoints_per_run  checkpoints along a run, to resume from (default 4)
  timing_steps    timed steps of a seconds budget (default 5), an arm
  timing_rounds   the arms' timings taken in turns, timing_steps / timing_rounds steps each
                  turn (default 1): a machine whose speed drifts slows every arm alike

Every run goes through lm.train.run, one at a time, in a workdir of its own under OUT/runs
(named arm-lr-seed-key, the key a hash of its resolved config); its learning-rate schedule
ends at its last step. A run killed midway resumes from its checkpoint when the same command
runs again; finished runs (their result.json) are skipped. A plan that changed under an
existing OUT is refused, naming the arms that differ, unless the change is new arms and --add
is given. --shard=I/N runs every N-th run of each phase (sweep, edge points, seeds) from I:
a phase needs the results of the one before, so a shard stops where the others' results are
missing; copy them in with --merge=THEIR_OUT (results merge by key) and run it again.

Writes OUT/results.csv (a row a run), OUT/results.md (per arm: best learning rate, mean +- std
over seeds, the paired difference to the baseline with its standard error; the reference
compressors for clm) and PNGs: the held-out metric against training FLOPs and against seconds,
against the learning rate, and the paired differences.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import dataclasses
import datetime
import hashlib
import importlib.util
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from lm import config as config_lib, files, models, tasks, tokenizers, train  # noqa: E402
from lm.config import ConfigError  # noqa: E402
from lm.data import store  # noqa: E402
from machine import cpu_model, describe  # noqa: E402  experiments/machine.py

PLAN_KEYS = {'config': str, 'overrides': dict, 'arms': dict, 'baselines': dict, 'metric': dict,
             'budget': dict, 'lr_multipliers': tuple, 'extend_edge': bool, 'seeds': tuple,
             'warmup_fraction': float, 'evals_per_run': int, 'checkpoints_per_run': int,
             'timing_steps': int, 'timing_rounds': int}
DEFAULTS = {'overrides': {}, 'extend_edge': True, 'warmup_fraction': 0.05, 'evals_per_run': 8,
            'checkpoints_per_run': 4, 'timing_steps': 5, 'timing_rounds': 1}
NOT_IN_KEY = ('train.peak_flops', 'train.wandb_project', 'train.wandb_group', 'data.cache_dir')
# what make_run sets for each run from the plan: an arm is the same arm whatever its base file
# says of them (a default run's steps, say)
SET_BY_RUN = ('train.steps', 'train.seed', 'train.warmup_steps', 'train.eval_every',
              'train.checkpoint_every', 'train.keep_checkpoints', 'train.num_samples')
# what a run learns but not what its step costs: arms that differ only in these (and in
# NOT_IN_KEY) share one timing, so a seconds budget gives them the same steps
NOT_IN_STEP_COST = NOT_IN_KEY + (
    'train.steps', 'train.seed', 'train.learning_rate', 'train.muon_learning_rate',
    'train.weight_decay', 'train.b1', 'train.b2', 'train.min_lr_ratio', 'train.warmup_steps',
    'train.decay_fraction', 'train.muon_momentum', 'train.muon_momentum_warmup')
PLOTS = ('heldout_vs_flops.png', 'heldout_vs_seconds.png', 'heldout_vs_lr.png',
         'paired_differences.png')


# --- the plan ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
  name: str
  config: str
  overrides: dict
  arms: dict
  baselines: dict
  metric: dict
  budget: dict
  lr_multipliers: tuple
  extend_edge: bool
  seeds: tuple
  warmup_fraction: float
  evals_per_run: int
  checkpoints_per_run: int
  timing_steps: int
  timing_rounds: int


def load_plan(path: str, sets: list[str]) -> Plan:
  """The plan file's get_plan(), checked; `sets` ('section.key=value') go to every arm."""
  spec = importlib.util.spec_from_file_location('lm_plan', path)
  if spec is None or not Path(path).is_file():
    raise ConfigError(f'--plan={path!r}: no such file; give one like experiments/plans/quick.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  raw = {**DEFAULTS, **module.get_plan()}
  for key, value in raw.items():
    kind = PLAN_KEYS.get(key)
    config_lib.require(kind is not None, f'plan.{key}', value,
                       f'unknown plan key; a plan has {sorted(PLAN_KEYS)}')
    if kind is tuple and isinstance(value, list):
      raw[key] = value = tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
      raw[key] = value = float(value)
    config_lib.require(isinstance(value, kind), f'plan.{key}', value, f'give a {kind.__name__}')
  missing = sorted(set(PLAN_KEYS) - set(raw))
  config_lib.require(not missing, 'plan', Path(path).name, f'missing keys {missing}')
  overrides = {**raw['overrides'], **dict(parse_set(s) for s in sets)}
  plan = Plan(name=Path(path).stem, **{**raw, 'overrides': overrides})
  check_plan(plan)
  return plan


def parse_set(text: str) -> tuple[str, object]:
  """'train.steps=10' -> ('train.steps', 10): the value as a Python literal, else a string."""
  key, sep, value = text.partition('=')
  config_lib.require(sep and '.' in key, '--set', text, 'give SECTION.KEY=VALUE')
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def check_plan(p: Plan) -> None:
  config_lib.require(p.arms, 'plan.arms', p.arms, 'give at least one arm')
  config_lib.require(p.lr_multipliers and all(isinstance(m, (int, float)) and m > 0
                                              for m in p.lr_multipliers),
                     'plan.lr_multipliers', p.lr_multipliers,
                     'give the learning rates to sweep as positive multiples of each arm\'s '
                     'default, e.g. (0.5, 1, 2)')
  config_lib.require(p.seeds and len(set(p.seeds)) == len(p.seeds), 'plan.seeds', p.seeds,
                     'give one or more distinct seeds, e.g. (0, 1, 2)')
  kinds = set(p.budget) & {'flops', 'seconds'}
  config_lib.require(len(p.budget) == 1 and len(kinds) == 1 and p.budget[next(iter(kinds))] > 0,
                     'plan.budget', p.budget, "give {'flops': F} or {'seconds': S}, positive")
  for task, arm in p.baselines.items():
    config_lib.require(arm in p.arms, f'plan.baselines.{task}', arm,
                       f'name one of the arms {sorted(p.arms)}')
  config_lib.require(0 <= p.warmup_fraction < 1, 'plan.warmup_fraction', p.warmup_fraction,
                     'give a share of the steps in [0, 1)')
  for key in ('evals_per_run', 'checkpoints_per_run', 'timing_steps', 'timing_rounds'):
    config_lib.require(getattr(p, key) >= 1, f'plan.{key}', getattr(p, key), 'give >= 1')


# --- arms ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  config: dict  # the resolved config (lm.config sections), before learning rate, seed, steps
  task: str
  family: str
  metric: str
  default_lr: float
  flops_per_token: float
  tokens_per_step: int
  params: int
  embedding_params: int

  @property
  def identity(self) -> str:
    return digest(self.config, NOT_IN_KEY + SET_BY_RUN)

  @property
  def step_cost_identity(self) -> str:
    return digest(self.config, NOT_IN_STEP_COST)


def digest(config: dict, leave_out: tuple[str, ...] = NOT_IN_KEY) -> str:
  """A hash of a config's keys and values, without `leave_out` (by default the keys that do
  not change a result)."""
  flat = {f'{s}.{k}': v for s, section in config.items() for k, v in section.items()}
  kept = {k: v for k, v in flat.items() if k not in leave_out}
  return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def base_config(path: str) -> ml_collections.ConfigDict:
  for candidate in (Path(path), ROOT / path):
    if candidate.is_file():
      return config_lib.from_file(candidate)
  raise ConfigError(f'config={path!r}: no such file; give a path like configs/decoder.py')


def section_keys(config: ml_collections.ConfigDict, section: str) -> set[str]:
  """The keys a section may have: its config file's, and its class's (for the model: the
  family's config class, for the data: the task's, so that an arm can set a key that the base
  file leaves at its default, such as a decoder's state_size or clm's fim_rate)."""
  if section == 'model':
    cls = models.config_class(config.model.get('family', models.DEFAULT_FAMILY))
  elif section == 'data':
    cls = tasks.data_config_class(config.data.get('task', tasks.DataConfig.task))
  else:
    cls = config_lib.SECTIONS[section]
  own = {f.name for f in dataclasses.fields(cls) if f.init} | ({'family'} if section == 'model'
                                                               else set())
  return set(config[section].keys()) | own


def override(config: ml_collections.ConfigDict, key: str, value, where: str) -> None:
  """config[section][key] = value, or a one-line error naming `where` and the key."""
  section, _, name = key.partition('.')
  config_lib.require(section in config and '.' not in name, f'{where}: {key}', value,
                     f'not a key of the config; its sections are {sorted(config.keys())}')
  node = config[section]
  derived = {'vocab_size'} if section == 'model' else set()  # the tokenizer's, set by lm.config
  config_lib.require(name in section_keys(config, section) - derived, f'{where}: {key}',
                     value, f'not a key of {section}; it has '
                     f'{sorted(section_keys(config, section) - derived)}')
  if name not in node:
    with node.unlocked():
      node[name] = tuple(value) if isinstance(value, list) else value
    return
  try:
    node[name] = tuple(value) if isinstance(value, list) else value
  except (TypeError, ValueError) as e:
    raise ConfigError(f'{where}: {key}={value!r}: {e}') from None


def resolve_arm(plan: Plan, name: str) -> ml_collections.ConfigDict:
  given = dict(plan.arms[name])
  config_lib.require(isinstance(given, dict), f'plan.arms.{name}', given,
                     "give a dict of overrides, e.g. {'model.num_layers': 2}")
  config = base_config(given.pop('config', plan.config))
  for key, value in {**plan.overrides, **given}.items():
    override(config, key, value, f'arm {name!r}' if key in given else 'plan.overrides')
  return config


def make_arm(plan: Plan, name: str) -> Arm:
  """The arm's config resolved and validated as lm.main would (a one-line ConfigError), with
  what the budget needs: its task's training FLOPs a token (the token store built if new)."""
  config = resolve_arm(plan, name)
  task = config.data.get('task', tasks.DataConfig.task)
  family = config.model.get('family', models.DEFAULT_FAMILY)
  config_lib.require(task in plan.metric, f'arm {name!r}: data.task', task,
                     f'the plan compares arms on the tasks {sorted(plan.metric)}')
  models.config_class(family)  # an unknown family: a ConfigError naming the known ones
  family_tasks = models.FAMILIES[family].tasks
  config_lib.require(task in family_tasks, f'arm {name!r}: model.family', family,
                     f'trains on {family_tasks}, not the plan\'s data.task={task!r}; give this '
                     'arm a config of a family that does (its own \'config\'), or drop it')
  built = build_task(config)
  cfg = built.cfg
  params, embedding = models.parameter_counts(cfg.model)
  return Arm(name, json.loads(json.dumps(config.to_dict(), default=list)), task, family,
             plan.metric[task], cfg.train.learning_rate, built.train_flops_per_token(),
             cfg.train.batch_size * cfg.data.seq_len, params, embedding)


def build_task(config: ml_collections.ConfigDict | dict) -> tasks.Task:
  """The task a config trains on (its tokenizer and token store made, or read from the
  cache), validated as lm.main validates it: a one-line ConfigError."""
  cfg = config_lib.parse(config, device_count=jax.device_count(),
                         vocab_size=lambda t: tokenizers.vocab_size_of(t.kind, t.vocab_size),
                         process_count=jax.process_count())
  tokenizer = store.load_or_train_tokenizer(cfg.tokenizer, cfg.data)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                           vocab_size=tokenizer.vocab_size))
  return tasks.make(cfg, models.build(cfg.model), tokenizer, tasks.load(cfg, tokenizer))


# --- runs ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
  arm: str
  lr: float
  seed: int
  phase: str  # sweep | edge | seeds (not part of the key: the config is)
  config: dict

  @property
  def key(self) -> str:
    return digest(self.config)

  @property
  def name(self) -> str:
    return f'{self.arm}-lr{self.lr:.3g}-s{self.seed}-{self.key[:8]}'


def make_run(arm: Arm, lr: float, seed: int, phase: str, steps: int, plan: Plan,
             peak_flops: float) -> Run:
  config = json.loads(json.dumps(arm.config))
  config['train'].update(
      learning_rate=lr, seed=seed, steps=steps,
      warmup_steps=min(round(plan.warmup_fraction * steps), steps - 1),
      eval_every=max(1, steps // plan.evals_per_run),
      checkpoint_every=max(1, steps // plan.checkpoints_per_run), keep_checkpoints=1, peak_flops=peak_flops,
      num_samples=0)
  if 'wandb_group' in config['train']:
    config['train']['wandb_group'] = plan.name
  return Run(arm.name, lr, seed, phase, config)


def budget_steps(plan: Plan, arm: Arm, seconds_per_step: float | None) -> int:
  """Steps that spend the plan's budget: FLOPs / (FLOPs a step), or seconds / (a step's time)."""
  if 'flops' in plan.budget:
    per_step, budget, what = arm.flops_per_token * arm.tokens_per_step, plan.budget['flops'], 'FLOPs'
    steps = round(budget / per_step)
  else:
    per_step, budget, what = seconds_per_step, plan.budget['seconds'], 'seconds'
    steps = math.floor(budget / per_step)
  config_lib.require(steps >= 2, 'plan.budget', plan.budget,
                     f'arm {arm.name!r} takes {per_step:.3g} {what} a step, so the budget buys '
                     f'{budget / per_step:.2f} steps; give at least two steps\' worth')
  return steps


def results_of(out: Path) -> dict[str, dict]:
  """key -> result of every finished run under out/runs."""
  found = {}
  for path in sorted((out / 'runs').glob('*/result.json')):
    result = json.loads(path.read_text())
    found[result['key']] = result
  return found


def lr_grid(arm: Arm, plan: Plan) -> list[float]:
  return [arm.default_lr * m for m in sorted(plan.lr_multipliers)]


def metric_of(result: dict | None) -> float:
  value = None if result is None else result.get('metric_value')
  return math.inf if value is None or not math.isfinite(value) else value


def phases(plan: Plan, arms: dict[str, Arm], steps: dict[str, int], results: dict[str, dict],
           peak: float) -> list[list[Run]]:
  """The plan's runs, phase by phase, as far as the results so far decide them: the sweep at
  the first seed; one more point past an edge where the best sits there; the other seeds at
  each arm's best learning rate. A phase is listed only once the one before has finished."""
  run = lambda arm, lr, seed, phase: make_run(arms[arm], lr, seed, phase, steps[arm], plan, peak)
  first = plan.seeds[0]
  sweep = [run(a, lr, first, 'sweep') for a in arms for lr in lr_grid(arms[a], plan)]
  out = [sweep]
  if any(r.key not in results for r in sweep):
    return out
  edge = []
  for a in arms:
    grid = lr_grid(arms[a], plan)
    scores = [metric_of(results[run(a, lr, first, 'sweep').key]) for lr in grid]
    best = int(np.argmin(scores))
    if plan.extend_edge and len(grid) > 1 and best in (0, len(grid) - 1):
      step = grid[1] / grid[0] if best == 0 else grid[-1] / grid[-2]
      edge.append(run(a, grid[0] / step if best == 0 else grid[-1] * step, first, 'edge'))
  if edge:
    out.append(edge)
    if any(r.key not in results for r in edge):
      return out
  best_lr = {a: best_learning_rate(arms[a], plan, results, steps[a], peak)[0] for a in arms}
  seeds = [run(a, best_lr[a], s, 'seeds') for a in arms for s in plan.seeds[1:]]
  if seeds:
    out.append(seeds)
  return out


def sweep_results(arm: Arm, plan: Plan, results: dict, steps: int, peak: float
                  ) -> list[tuple[float, dict]]:
  """(learning rate, result) of an arm's runs at the first seed, by learning rate."""
  found = [r for r in results.values() if r['arm'] == arm.name and r['seed'] == plan.seeds[0]
           and r['phase'] in ('sweep', 'edge')
           and r['key'] == make_run(arm, r['learning_rate'], r['seed'], r['phase'], steps, plan,
                                    peak).key]
  return sorted(((r['learning_rate'], r) for r in found), key=lambda x: x[0])


def best_learning_rate(arm: Arm, plan: Plan, results: dict, steps: int, peak: float
                       ) -> tuple[float | None, bool]:
  """(the best learning rate of the sweep, whether it sits at the edge of what was tried)."""
  swept = sweep_results(arm, plan, results, steps, peak)
  if not swept:
    return None, False
  best = int(np.argmin([metric_of(r) for _, r in swept]))
  return swept[best][0], best in (0, len(swept) - 1) and len(swept) > 1


def execute(run: Run, arm: Arm, out: Path) -> dict | None:
  """Trains (or resumes) one run in its workdir, its output in log.txt; writes and returns its
  result, or None when a signal stopped it (its checkpoint kept)."""
  workdir = out / 'runs' / run.name
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  status, final = 'ok', {}
  with open(workdir / 'log.txt', 'a') as log, contextlib.redirect_stdout(log), \
      contextlib.redirect_stderr(log):
    try:
      final = train.run(ml_collections.ConfigDict(run.config), workdir)
    except train.TrainingError as e:  # a learning rate too high: the run is ranked last
      print(f'error: {e}', flush=True)
      status = 'diverged'
  jax.clear_caches()
  if final.get('stopped_by_signal'):
    return None
  result = summarize(run, arm, workdir, final, status, time.perf_counter() - start)
  files.write_atomic(workdir / 'result.json', json.dumps(result, indent=1))
  return result


def read_metrics(workdir: Path) -> list[dict]:
  path = workdir / 'metrics.jsonl'
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() \
      else []


def summarize(run: Run, arm: Arm, workdir: Path, final: dict, status: str,
              run_seconds: float) -> dict:
  """A run's row: its final metrics, the time its steps took (from the logged tokens/s, so not
  counting compilation, evaluation and checkpoints), and its curve of held-out metric against
  step, training FLOPs and seconds."""
  lines = read_metrics(workdir)
  steps, tokens_per_step = run.config['train']['steps'], arm.tokens_per_step
  clock, previous, elapsed = [(0, 0.0)], 0, 0.0  # (step, train seconds at it)
  for line in lines:
    if line.get('perf/tokens_per_sec'):
      elapsed += (line['step'] - previous) * tokens_per_step / line['perf/tokens_per_sec']
      previous = line['step']
      clock.append((previous, elapsed))
  seconds_at = lambda step: float(np.interp(step, *zip(*clock)))
  name = f'val/{arm.metric}'
  curve = [{'step': l['step'], 'flops': l['step'] * tokens_per_step * arm.flops_per_token,
            'seconds': seconds_at(l['step']), 'value': l[name]}
           for l in lines if l.get(name) is not None]
  done = final.get('step', previous)
  tokens = done * tokens_per_step
  value = final.get(name)
  return {
      'key': run.key, 'name': run.name, 'arm': run.arm, 'family': arm.family, 'task': arm.task,
      'learning_rate': run.lr, 'seed': run.seed, 'phase': run.phase, 'status': status,
      'params': arm.params, 'embedding_params': arm.embedding_params,
      'flops_per_token': arm.flops_per_token, 'steps': done, 'planned_steps': steps,
      'tokens': tokens, 'train_flops': tokens * arm.flops_per_token,
      'train_seconds': elapsed, 'run_seconds': run_seconds,
      'tokens_per_sec': tokens / elapsed if elapsed else None,
      'mfu': (tokens / elapsed * arm.flops_per_token / (run.config['train']['peak_flops']
                                                        * jax.device_count()))
             if elapsed else None,
      'metric': arm.metric, 'metric_value': value,
      'bpb': final.get('val/bpb'),
      'final': {k: v for k, v in final.items() if k.startswith('val/')},
      'curve': curve}


# --- reports ------------------------------------------------------------------------------------

CSV_COLUMNS = ('arm', 'family', 'task', 'learning_rate', 'seed', 'phase', 'status', 'params',
               'embedding_params', 'flops_per_token', 'steps', 'tokens', 'train_flops',
               'train_seconds', 'run_seconds', 'tokens_per_sec', 'mfu', 'bpb', 'metric',
               'metric_value', 'key', 'name')


def write_csv(out: Path, results: list[dict]) -> None:
  extra = sorted({k for r in results for k in r['final']} - {'val/bpb'})
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow([*CSV_COLUMNS, *extra])
  for r in sorted(results, key=lambda r: (r['arm'], r['learning_rate'], r['seed'])):
    writer.writerow([*(r[c] for c in CSV_COLUMNS), *(r['final'].get(k) for k in extra)])
  files.write_atomic(out / 'results.csv', buffer.getvalue())


@dataclasses.dataclass
class Summary:
  """An arm at its best learning rate, over the seeds that ran there."""
  arm: Arm
  best_lr: float | None
  at_edge: bool
  runs: list[dict]  # at best_lr, one a seed
  swept: list[tuple[float, dict]]

  @property
  def values(self) -> np.ndarray:
    return np.array([metric_of(r) for r in self.runs])


def summaries(plan: Plan, arms: dict[str, Arm], steps: dict[str, int], results: dict,
              peak: float) -> dict[str, Summary]:
  out = {}
  for name, arm in arms.items():
    best, edge = best_learning_rate(arm, plan, results, steps[name], peak)
    runs = []
    if best is not None:
      keys = [make_run(arm, best, seed, '', steps[name], plan, peak).key for seed in plan.seeds]
      runs = [results[k] for k in keys if k in results]
    out[name] = Summary(arm, best, edge, runs, sweep_results(arm, plan, results, steps[name],
                                                             peak))
  return out


def paired(a: Summary, b: Summary) -> tuple[float, float | None, int] | None:
  """Mean and standard error of metric(a) - metric(b) over the seeds both ran."""
  by_seed = {r['seed']: metric_of(r) for r in b.runs}
  d = np.array([metric_of(r) - by_seed[r['seed']] for r in a.runs if r['seed'] in by_seed])
  if not len(d) or not np.all(np.isfinite(d)):
    return None
  return float(d.mean()), (float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None), \
      len(d)


def fmt(x, spec: str = '.4f') -> str:
  return '—' if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def write_markdown(out: Path, plan: Plan, arms: dict[str, Arm], sums: dict[str, Summary],
                   results: list[dict], machine: dict, references: dict | None) -> None:
  budget = (f'{plan.budget["flops"]:.3g} training FLOPs a run (matched by FLOPs)'
            if 'flops' in plan.budget else
            f'{plan.budget["seconds"]:g} seconds of train steps a run (matched by time: steps '
            f'from the median of {plan.timing_steps} compiled steps an arm, timed first)')
  wall = sum(r['run_seconds'] for r in results)
  lines = [f'# Ablation plan `{plan.name}`', '',
           f'Budget: {budget}. Learning rates: x{", x".join(f"{m:g}" for m in sorted(plan.lr_multipliers))} '
           f'of each arm\'s default at seed {plan.seeds[0]}'
           + (', one more past an edge best' if plan.extend_edge else '')
           + f'; seeds {", ".join(map(str, plan.seeds))} at the best. Every schedule warms up '
           f'for {plan.warmup_fraction:.0%} of its steps and decays to its last step.', '',
           f'{len(results)} runs, {wall / 60:.1f} minutes of runs; {machine["describe"]}; '
           f'matmul peak {machine["peak_flops"] / 1e9:.0f} GFLOP/s; written '
           f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.', '']
  for task, metric in plan.metric.items():
    names = [n for n, a in arms.items() if a.task == task]
    if not names:
      continue
    base = plan.baselines.get(task)
    lines += [f'## {task}: held-out {metric} (lower is better)', '',
              f'| arm | family | best lr | {metric} mean ± std (seeds) | paired Δ vs {base or "—"} '
              '± s.e. | params (embedding) | MFLOP/token | steps | tokens | tokens/s | MFU |',
              '|---|---|---|---|---|---|---|---|---|---|---|']
    for n in names:
      s, a = sums[n], arms[n]
      v = s.values
      std = f' ± {v.std(ddof=1):.4f}' if len(v) > 1 and np.all(np.isfinite(v)) else ''
      mean = (f'{v.mean():.4f}{std} ({len(v)})' if len(v) and np.all(np.isfinite(v))
              else ('diverged' if len(v) else '—'))
      diff = '(baseline)' if n == base else '—'
      if base and n != base and base in sums:
        p = paired(s, sums[base])
        if p:
          diff = f'{p[0]:+.4f}' + (f' ± {p[1]:.4f}' if p[1] is not None else '') + f' ({p[2]})'
      ok = [r for r in s.runs if r['tokens_per_sec']]
      tps = np.mean([r['tokens_per_sec'] for r in ok]) if ok else None
      mfu = np.mean([r['mfu'] for r in ok]) if ok else None
      step_count = s.runs[0]['steps'] if s.runs else None
      tokens = s.runs[0]['tokens'] if s.runs else None
      lines.append(
          f'| {n} | {a.family} | {fmt(s.best_lr, ".3g")}{" (edge)" if s.at_edge else ""} | '
          f'{mean} | {diff} | {a.params / 1e6:.2f}M ({a.embedding_params / 1e6:.2f}M) | '
          f'{a.flops_per_token / 1e6:.2f} | {fmt(step_count, "d")} | {fmt(tokens, ",")} | '
          f'{fmt(tps, ",.0f")} | {fmt(mfu, ".1%")} |')
    lines.append('')
    if task == 'clm' and references:
      lines += [f'Reference compressors on the same held-out text ({references["bytes"]:,} bytes), '
                'bits per byte: ' + ', '.join(f'{k} {v:.4f}' for k, v in references.items()
                                             if k != 'bytes') + '.', '']
    grid = sorted({lr for n in names for lr, _ in sums[n].swept})
    lines += [f'Learning-rate sweep, held-out {metric} at seed {plan.seeds[0]}:', '',
              '| arm | ' + ' | '.join(f'{lr:.3g}' for lr in grid) + ' |',
              '|---|' + '---|' * len(grid)]
    for n in names:
      at = {lr: r for lr, r in sums[n].swept}
      cells = [('diverged' if at[lr]['status'] == 'diverged' else fmt(at[lr]['metric_value']))
               if lr in at else '' for lr in grid]
      lines.append(f'| {n} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  lines += ['Plots: ' + ', '.join(f'`{p}`' for p in PLOTS) + '. A row a run: `results.csv`.', '']
  files.write_atomic(out / 'results.md', '\n'.join(lines))


def write_plots(out: Path, plan: Plan, arms: dict[str, Arm], sums: dict[str, Summary]) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  task_list = [t for t in plan.metric if any(a.task == t for a in arms.values())]
  def figure(title):
    fig, axes = plt.subplots(1, len(task_list), figsize=(6.5 * len(task_list), 4.5),
                             squeeze=False)
    fig.suptitle(f'{plan.name}: {title}')
    return fig, axes[0]
  for x_key, file, label in (('flops', PLOTS[0], 'training FLOPs'),
                             ('seconds', PLOTS[1], 'seconds of train steps')):
    fig, axes = figure(f'held-out metric against {label} (mean and range over seeds)')
    for ax, task in zip(axes, task_list):
      for n, s in sums.items():
        curves = [r['curve'] for r in s.runs if r['curve']]
        if s.arm.task != task or not curves:
          continue
        length = min(map(len, curves))
        x = np.mean([[p[x_key] for p in c[:length]] for c in curves], axis=0)
        y = np.array([[p['value'] for p in c[:length]] for c in curves], dtype=float)
        line, = ax.plot(x, y.mean(0), label=n)
        if len(curves) > 1:
          ax.fill_between(x, y.min(0), y.max(0), alpha=0.2, color=line.get_color())
      ax.set_xlabel(label)
      ax.set_ylabel(f'held-out {plan.metric[task]}')
      ax.set_title(task)
      if x_key == 'flops':
        ax.set_xscale('log')
      ax.legend()
    fig.savefig(out / file, dpi=110, bbox_inches='tight')
    plt.close(fig)
  fig, axes = figure('held-out metric against learning rate (first seed)')
  for ax, task in zip(axes, task_list):
    for n, s in sums.items():
      if s.arm.task == task and s.swept:
        ax.plot([lr for lr, _ in s.swept], [r['metric_value'] if r['metric_value'] is not None
                                            else np.nan for _, r in s.swept], 'o-', label=n)
    ax.set_xscale('log')
    ax.set_xlabel('peak learning rate')
    ax.set_ylabel(f'held-out {plan.metric[task]}')
    ax.set_title(task)
    ax.legend()
  fig.savefig(out / PLOTS[2], dpi=110, bbox_inches='tight')
  plt.close(fig)
  fig, axes = figure('paired difference to the baseline (± standard error)')
  for ax, task in zip(axes, task_list):
    base = plan.baselines.get(task)
    rows = [(n, paired(s, sums[base])) for n, s in sums.items()
            if s.arm.task == task and base in sums and n != base]
    rows = [(n, p) for n, p in rows if p]
    ax.errorbar([p[0] for _, p in rows], range(len(rows)),
                xerr=[p[1] or 0 for _, p in rows], fmt='o', capsize=4)
    ax.set_yticks(range(len(rows)), [n for n, _ in rows])
    ax.axvline(0, color='gray', lw=1)
    ax.set_xlabel(f'{plan.metric[task]} minus {base}\'s, same seed')
    ax.set_title(task)
  fig.savefig(out / PLOTS[3], dpi=110, bbox_inches='tight')
  plt.close(fig)


def write_reports(out: Path, plan: Plan, arms: dict[str, Arm], steps: dict[str, int],
                  results: dict, machine: dict) -> None:
  mine = {k: r for k, r in results.items() if r['arm'] in arms}
  sums = summaries(plan, arms, steps, mine, machine['peak_flops'])
  write_csv(out, list(mine.values()))
  references = references_of(out, plan, arms)
  write_markdown(out, plan, arms, sums, list(mine.values()), machine, references)
  write_plots(out, plan, arms, sums)


def references_of(out: Path, plan: Plan, arms: dict[str, Arm]) -> dict | None:
  """The reference compressors on the held-out text of the clm baseline (the clm task's own
  report computes them, cached with the token store)."""
  base = plan.baselines.get('clm')
  if base is None:
    return None
  num_bytes, refs = build_task(arms[base].config).references()
  return {'bytes': num_bytes, **refs}


# --- the command --------------------------------------------------------------------------------

def check_unchanged(out: Path, plan: Plan, arms: dict[str, Arm], add: bool) -> None:
  """OUT/plan.json records what the results were made with; a plan that differs is refused."""
  identity = {'arms': {n: a.identity for n, a in arms.items()},
              'rest': {k: v for k, v in dataclasses.asdict(plan).items()
                       if k not in ('arms', 'overrides', 'name')}}
  path = out / 'plan.json'
  if path.is_file():
    saved = json.loads(path.read_text())
    saved['rest'] = {**{k: v for k, v in DEFAULTS.items() if k != 'overrides'},
                     **saved['rest']}  # plan keys added since, at their defaults
    rest = sorted(k for k in set(saved['rest']) | set(identity['rest'])
                  if saved['rest'].get(k) != json.loads(json.dumps(identity['rest'])).get(k))
    changed = sorted(n for n in saved['arms'] if identity['arms'].get(n) != saved['arms'][n])
    new = sorted(set(identity['arms']) - set(saved['arms']))
    if rest or changed:
      raise ConfigError(
          f'--out={str(out)!r} holds results of another plan ('
          + '; '.join([f'plan keys {rest} differ'] * bool(rest)
                      + [f'arms {changed} differ or are gone'] * bool(changed))
          + '): give a new --out, or the plan its results were made with')
    if new and not add:
      raise ConfigError(f'--out={str(out)!r}: the plan adds the arms {new}; give --add to run '
                        'them beside the results there, or a new --out')
  out.mkdir(parents=True, exist_ok=True)
  files.write_atomic(path, json.dumps(identity, indent=1, default=str))


def machine_of(out: Path) -> dict:
  """The machine's description and matmul peak (for MFU), measured once an OUT."""
  def measure():
    return {'describe': describe(), 'cpu': cpu_model(),
            'peak_flops': train.peak_flops('float32')}
  return store.cached_json(out, 'machine.json', measure)


def step_times(out: Path, plan: Plan, arms: dict[str, Arm]) -> dict[str, float | None]:
  """Seconds a train step of each arm (for a seconds budget), timed once and kept; arms whose
  steps cost the same (their configs differ only in NOT_IN_STEP_COST) share one timing. The
  arms not timed yet are compiled together, then timed in plan.timing_rounds turns of
  timing_steps / timing_rounds steps each (an arm's time: the median of its steps), so that a
  slow spell of a shared machine falls on all of them rather than on one."""
  timing = out / 'timing'
  todo = {a.step_cost_identity: a for a in arms.values()
          if not (timing / f'{a.step_cost_identity}.json').is_file()}
  with contextlib.redirect_stdout(io.StringIO()):
    timers = {key: train.step_timer(ml_collections.ConfigDict(arm.config), timing / key)
              for key, arm in todo.items()}
  per_turn = max(1, plan.timing_steps // plan.timing_rounds)
  times = {key: [] for key in timers}
  for _ in range(plan.timing_rounds):
    for key, timer in timers.items():
      times[key] += timer(per_turn)
  for key in timers:
    store.cached_json(timing, f'{key}.json',
                      lambda key=key: {'seconds': float(np.median(times[key]))})
  return {n: json.loads((timing / f'{a.step_cost_identity}.json').read_text())['seconds']
          for n, a in arms.items()}


def merge(out: Path, other: Path) -> int:
  """Copies the finished runs of another OUT of the same plan (result, metrics, config)."""
  config_lib.require((other / 'plan.json').is_file(), '--merge', str(other),
                     'not an output directory of experiments/ablate.py (no plan.json)')
  config_lib.require(json.loads((other / 'plan.json').read_text())
                     == json.loads((out / 'plan.json').read_text()), '--merge', str(other),
                     'its results are of another plan; merge outputs of the same plan')
  mine, copied = results_of(out), 0
  for key, result in results_of(other).items():
    if key in mine:
      continue
    src, dst = other / 'runs' / result['name'], out / 'runs' / result['name']
    dst.mkdir(parents=True, exist_ok=True)
    for name in ('metrics.jsonl', 'config.json', 'result.json'):  # result last: it marks done
      if (src / name).is_file():
        shutil.copyfile(src / name, dst / name)
    copied += 1
  return copied


def parse_shard(text: str) -> tuple[int, int]:
  i, _, n = text.partition('/')
  ok = i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)
  config_lib.require(ok, '--shard', text, 'give I/N with 0 <= I < N, e.g. 0/2')
  return int(i), int(n)


def expected_runs(plan: Plan, all_phases: list[list[Run]]) -> int:
  """Runs of the whole plan as known now (edge points count once decided)."""
  edges = sum(len(p) for p in all_phases if p and p[0].phase == 'edge')
  return len(plan.arms) * (len(plan.lr_multipliers) + len(plan.seeds) - 1) + edges


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--plan', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--shard', default='0/1')
  parser.add_argument('--add', action='store_true')
  parser.add_argument('--merge', action='append', default=[])
  parser.add_argument('--set', action='append', default=[], dest='sets')
  args = parser.parse_args(argv)
  try:
    return _main(args)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


def _main(args) -> int:
  shard, shards = parse_shard(args.shard)
  plan = load_plan(args.plan, args.sets)
  out = Path(args.out)
  print(f'plan {plan.name}: resolving {len(plan.arms)} arms (a new tokenizer or token store is '
        'built once)', flush=True)
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    arms = {n: make_arm(plan, n) for n in plan.arms}
  if 'flops' in plan.budget:  # checked before anything is written
    steps = {n: budget_steps(plan, a, None) for n, a in arms.items()}
  check_unchanged(out, plan, arms, args.add)
  for other in args.merge:
    print(f'merged {merge(out, Path(other))} finished runs from {other}')
  machine = machine_of(out)
  if 'seconds' in plan.budget:
    times = step_times(out, plan, arms)
    steps = {n: budget_steps(plan, a, times[n]) for n, a in arms.items()}
  peak = machine['peak_flops']
  print(f'plan {plan.name}: {len(arms)} arms, budget {plan.budget}; steps '
        + ', '.join(f'{n} {s}' for n, s in steps.items()) + f'; {machine["describe"]}', flush=True)
  started = time.perf_counter()
  while True:
    results = results_of(out)
    all_phases = phases(plan, arms, steps, results, peak)
    todo = next((p for p in all_phases if any(r.key not in results for r in p)), None)
    if todo is None:
      break
    mine = [r for i, r in enumerate(todo) if i % shards == shard and r.key not in results]
    if not mine:
      waiting = [r.name for r in todo if r.key not in results]
      print(f'shard {shard}/{shards}: its runs of this phase are done; the next phase needs '
            f'{len(waiting)} runs of other shards ({", ".join(waiting)}): run again with '
            '--merge=THEIR_OUT once they are done')
      break
    run = mine[0]
    total = expected_runs(plan, all_phases)
    done = len([r for r in results.values() if r['arm'] in arms])
    print(f'[{done + 1}/{total}] {run.arm} lr {run.lr:.3g} seed {run.seed} ({run.phase}, '
          f'{steps[run.arm]} steps) ...', end=' ', flush=True)
    result = execute(run, arms[run.arm], out)
    if result is None:
      print(f'stopped by a signal; its checkpoint is in {out / "runs" / run.name}: run the same '
            'command to resume')
      return 0
    results[result['key']] = result
    spent = [r['run_seconds'] for r in results.values() if r['arm'] in arms]
    left = max(total - done - 1, 0) / shards
    print(f'{run_summary(result)}; {time.perf_counter() - started:.0f}s so far, plan ETA '
          f'{left * np.mean(spent) / 60:.1f} min', flush=True)
    write_csv(out, [r for r in results.values() if r['arm'] in arms])
  write_reports(out, plan, arms, steps, results_of(out), machine)
  print(f'wrote {out / "results.md"}, {out / "results.csv"} and the plots')
  return 0


def run_summary(r: dict) -> str:
  if r['status'] != 'ok':
    return f'{r["status"]} at step {r["steps"]}'
  return (f'{r["metric"]} {r["metric_value"]:.4f} in {r["run_seconds"]:.0f}s '
          f'({fmt(r["tokens_per_sec"], ",.0f")} tokens/s)')


if __name__ == '__main__':
  sys.exit(main())
