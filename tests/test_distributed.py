"""Many processes: start-up keys and their mistakes, cluster detection, and real runs of
`python -m lm.main` as 2 processes x 2 CPU devices (gloo collectives on localhost) against
1 process x 4 devices and 1 device: the same losses, a resume on another process count and
mesh, a SIGTERM to one process, processes started with different configs."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lm import checkpoint, config as config_lib, distributed, train
from lm.config import ConfigError
from tests.conftest import ROOT, load_config
from tests.test_train import cli, losses


def parse_distributed(**keys):
  c = load_config()
  c.distributed.update(keys)
  return config_lib.parse_distributed(c)


@pytest.mark.parametrize('keys, message', [
    (dict(num_processes=2, process_id=0), r'num_processes=2: many processes need distributed\.'
                                          r'coordinator_address'),
    (dict(num_processes=2, process_id=2, coordinator_address='h:1'),
     r'process_id=2: must be in \[0, distributed.num_processes=2\)'),
    (dict(num_processes=2, coordinator_address='h:1'), r'process_id=-1: with distributed\.'
                                                       r'num_processes=2, give each process'),
    (dict(coordinator_address='localhost'), r"coordinator_address='localhost': give HOST:PORT"),
    (dict(initialization_timeout=0), r'initialization_timeout=0'),
])
def test_distributed_keys_mistakes_are_one_line(keys, message):
  with pytest.raises(ConfigError, match=message):
    parse_distributed(**keys)


def test_cluster_detection_from_the_environment():
  assert distributed.cluster({}) is None
  assert distributed.cluster({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) is None
  assert distributed.cluster({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '8'}) == 'SLURM'
  assert distributed.cluster({'OMPI_MCA_orte_hnp_uri': 'x', 'OMPI_COMM_WORLD_SIZE': '4'}) == \
      'Open MPI'
  assert distributed.cluster({'TPU_WORKER_HOSTNAMES': 'a'}) is None
  assert distributed.cluster({'TPU_WORKER_HOSTNAMES': 'a,b'}) == 'TPU pod (GKE)'
  assert distributed.cluster({'JAX_COORDINATOR_ADDRESS': 'h:1'}) == 'JAX_COORDINATOR_ADDRESS'
  # Nothing set: one process, and jax.distributed is not started.
  assert distributed.initialize(config_lib.DistributedConfig(), environ={}) is None


def test_a_coordinator_address_alone_is_one_line():
  """JAX_COORDINATOR_ADDRESS without a process count or index (nothing else to detect them)."""
  proc = subprocess.run([sys.executable, '-m', 'lm.main', '--config=configs/decoder.py',
                         f'--workdir={ROOT / "runs" / "never-written"}'], cwd=ROOT,
                        env={**env(1), 'JAX_COORDINATOR_ADDRESS': 'localhost:1'},
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith('error: distributed: JAX found a JAX_COORDINATOR_ADDRESS setting '
                                'but not the rest'), proc.stderr
  assert not (ROOT / 'runs' / 'never-written').exists()


@pytest.mark.parametrize('batch, accum, processes, mesh, message', [
    (6, 1, 4, (4, 1, 1), r'train\.batch_size=6: each of the 4 processes reads an equal share'),
    (8, 3, 2, (1, 1, 1), r'train\.grad_accum_steps=3: must divide the batch of each process'),
    (8, 4, 1, (4, 1, 1), r'train\.batch_size=8: must be divisible by the data x fsdp mesh '
                         r'size 4 times train\.grad_accum_steps=4.*try train\.batch_size=16'),
])
def test_batch_sizes_that_do_not_split(batch, accum, processes, mesh, message):
  t = config_lib.TrainConfig(batch_size=batch, grad_accum_steps=accum)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate_batch(t, mesh, processes)


def test_a_mesh_of_another_size_names_both():
  with pytest.raises(ConfigError, match=r'mesh\.shape=\(2, 2, 1\): its sizes multiply to 4 '
                                        r'devices, and the run has 8'):
    config_lib.mesh_shape((2, 2, 1), 8)


def test_processes_compare_their_configs_without_their_own_keys():
  c = load_config()
  c.distributed.process_id = 1
  mine = train.same_across_processes(c)
  c.distributed.process_id = 0
  assert distributed.config_hash(mine) == distributed.config_hash(train.same_across_processes(c))
  c.train.learning_rate = 1.0
  assert distributed.config_hash(mine) != distributed.config_hash(train.same_across_processes(c))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def env(devices: int) -> dict[str, str]:
  return {**os.environ, 'JAX_NUM_CPU_DEVICES': str(devices), 'JAX_PLATFORMS': 'cpu'}


def run_processes(config, workdir: Path, count: int, devices: int, extra=(), per_process=None,
                  wait=True, **overrides):
  """`count` processes of `python -m lm.main` with `devices` CPU devices each."""
  port = free_port()
  procs = []
  for i in range(count):
    keys = dict(overrides)
    if count > 1:
      keys.update({'distributed.coordinator_address': f'localhost:{port}',
                   'distributed.num_processes': count, 'distributed.process_id': i})
    keys.update((per_process or {}).get(i, {}))
    procs.append(subprocess.Popen(cli(config, workdir, **keys) + list(extra), cwd=ROOT,
                                  env=env(devices), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  if not wait:
    return procs
  outs = [p.communicate(timeout=300)[0] for p in procs]
  return [p.returncode for p in procs], outs


def final_params(workdir: Path):
  cfg = checkpoint.saved_model(workdir)
  return jax.device_get(checkpoint.restore_params(workdir, cfg))


def assert_close_runs(a: Path, b: Path, steps) -> None:
  la, lb = losses(a), losses(b)
  np.testing.assert_allclose([la[s] for s in steps], [lb[s] for s in steps], rtol=2e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6),
               final_params(a), final_params(b))


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_on_other_meshes(config, tmp_path):
  config.tokenizer.update(kind='bpe', vocab_size=384)  # an even vocabulary: tensor=2 splits it
  config.train.update(steps=20, checkpoint_every=10, num_samples=1, sample_len=8)
  two, four, one = tmp_path / 'two', tmp_path / 'four', tmp_path / 'one'
  codes, outs = run_processes(config, two, 2, 2, **{'mesh.shape': '(2,2,1)'})
  assert codes == [0, 0], outs
  assert 'process 0 of 2: 2 local of 4 devices (cpu)' in outs[0]
  assert 'process 1 of 2: 2 local of 4 devices (cpu)' in outs[1]
  # process 0 reports; both generate (the sample's loop runs on the mesh of both)
  assert 'final validation' in outs[0] and '--- sample 1 ---' in outs[0]
  assert 'final validation' not in outs[1]
  assert (two / 'metrics.jsonl').is_file() and sorted(
      int(p.name) for p in (two / 'checkpoints').iterdir() if p.name.isdigit()) == [10, 20]
  codes, outs = run_processes(config, four, 1, 4, **{'mesh.shape': '(2,2,1)'})
  assert codes == [0], outs
  codes, outs = run_processes(config, one, 1, 1)
  assert codes == [0], outs
  assert_close_runs(two, one, range(1, 21))
  assert_close_runs(four, one, range(1, 21))
  # Resume the 2-process run's step 10 on 1 process (1 device), and on 1 process x 4 devices
  # with a tensor axis: both continue as the uninterrupted run.
  for name, devices, shape in (('resumed1', 1, '(1,1,1)'), ('resumed4', 4, '(1,2,2)')):
    resumed = tmp_path / name
    subprocess.run(['cp', '-r', str(two), str(resumed)], check=True)
    subprocess.run(['rm', '-r', str(resumed / 'checkpoints' / '20')], check=True)
    codes, outs = run_processes(config, resumed, 1, devices, **{'mesh.shape': shape})
    assert codes == [0] and 'resuming' in outs[0] and 'from step 10' in outs[0], outs
    assert_close_runs(resumed, one, range(11, 21))


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_on_both(config, tmp_path):
  config.train.update(steps=100000, checkpoint_every=100000, eval_every=100000)
  workdir = tmp_path / 'run'
  procs = run_processes(config, workdir, 2, 2, wait=False, **{'mesh.shape': '(2,2,1)'})
  deadline = time.time() + 120
  while not ((workdir / 'metrics.jsonl').is_file()
             and len((workdir / 'metrics.jsonl').read_text().splitlines()) >= 5):
    assert all(p.poll() is None for p in procs), [p.stdout.read() for p in procs]
    assert time.time() < deadline
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)  # a preemption notice on one worker only
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  steps = [int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()]
  assert len(steps) == 1, steps  # one checkpoint, of the step both agreed on
  assert f'SIGTERM: saved a checkpoint at step {steps[0]}' in outs[0]


@pytest.mark.slow
def test_a_coordinator_that_never_answers_and_processes_with_different_configs(config,
                                                                               tmp_path):
  # Process 1 alone: nobody listens on the coordinator's port.
  start = time.time()
  proc = subprocess.run(cli(config, tmp_path / 'alone', **{
      'distributed.coordinator_address': f'localhost:{free_port()}',
      'distributed.num_processes': 2, 'distributed.process_id': 1,
      'distributed.initialization_timeout': 2}), cwd=ROOT, env=env(2), capture_output=True,
      text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert 'no coordinator answered within distributed.initialization_timeout=2s' in proc.stderr
  assert time.time() - start < 60 and not (tmp_path / 'alone').exists()
  # Two processes whose learning rates differ: both stop, naming the key, writing nothing.
  codes, outs = run_processes(config, tmp_path / 'differ', 2, 2,
                              per_process={1: {'train.learning_rate': 0.5}},
                              **{'mesh.shape': '(2,2,1)'})
  assert codes == [2, 2], outs
  for out in outs:
    assert 'different configs' in out and 'train.learning_rate' in out, out
  assert not (tmp_path / 'differ').exists()
