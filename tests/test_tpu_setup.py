"""tpu_setup/'s scripts, by their --dry-run: the exact gcloud and sbatch commands, in order,
with the run's arguments passed through unchanged (no gcloud is installed here)."""
from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

VM = ['--name=lm-v4', '--zone=us-central2-b', '--project=my-proj']
RUN = ['--config=configs/gpt2_124m.py', '--workdir=gs://bucket/runs/a b',
       "--config.train.init_from=it's"]


def dry_run(script: str, *args: str) -> str:
  proc = subprocess.run([sys.executable, str(ROOT / 'tpu_setup' / script), '--dry-run', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout


def commands(out: str) -> list[list[str]]:
  return [shlex.split(line) for line in out.splitlines() if line.startswith('gcloud')]


def test_create_a_spot_vm_and_a_queued_resource():
  create, wait = commands(dry_run('tpu.py', 'create', *VM, '--accelerator-type=v4-32',
                                  '--runtime-version=tpu-ubuntu2204-base', '--spot'))
  assert create == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'lm-v4',
                    '--zone=us-central2-b', '--project=my-proj', '--accelerator-type=v4-32',
                    '--version=tpu-ubuntu2204-base', '--spot']
  assert wait[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe']
  create, wait = commands(dry_run('tpu.py', 'create', *VM, '--accelerator-type=v5litepod-16',
                                  '--queued', '--reserved'))
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'lm-v4']
  assert '--node-id=lm-v4' in create and '--reserved' in create and '--spot' not in create
  assert wait[-1] == '--format=value(state.state)'


def test_setup_and_launch_run_on_every_worker_with_the_arguments_unchanged():
  (setup,) = commands(dry_run('tpu.py', 'setup', *VM, '--repo=https://example.org/lm.git',
                              '--commit=abc123'))
  assert '--worker=all' in setup
  script = setup[-1].removeprefix('--command=')
  assert 'git checkout -q abc123' in script and "'jax[tpu]'" in script
  assert script.index('python3 -m venv') < script.index('pip install -q -r requirements.txt')
  (launch,) = commands(dry_run('tpu.py', 'launch', *VM, '--', *RUN))
  assert '--worker=all' in launch
  script = launch[-1].removeprefix('--command=')
  kill, lock = script.index('pkill'), script.index('rm -f /tmp/libtpu_lockfile')
  run = script.index('nohup python -m lm.main')
  assert kill < lock < run and '> ~/lm.log' in script
  # the worker's shell gets back exactly the arguments given here
  started = script[script.index('nohup ') + len('nohup '):script.index(' > ~/lm.log')]
  assert shlex.split(started) == ['python', '-m', 'lm.main', *RUN]


def test_watch_recreates_a_preempted_vm_and_relaunches():
  out = dry_run('tpu.py', 'watch', *VM, '--repo=u', '--spot', '--', *RUN)
  verbs = [c[4] for c in commands(out)]
  assert verbs == ['describe', 'delete', 'create', 'describe', 'ssh', 'ssh']
  assert 'recreating' in out


def test_delete_ssh_logs_and_mistakes():
  assert commands(dry_run('tpu.py', 'delete', *VM))[0][4:] == [
      'delete', 'lm-v4', '--zone=us-central2-b', '--project=my-proj', '--quiet']
  assert commands(dry_run('tpu.py', 'ssh', *VM))[0][-1] == '--worker=0'
  assert commands(dry_run('tpu.py', 'logs', *VM))[0][-1] == '--command=tail -n 100 ~/lm.log'
  proc = subprocess.run([sys.executable, 'tpu_setup/tpu.py', 'launch', *VM, '--dry-run'],
                        cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 2 and "give the run's arguments after --" in proc.stderr


def test_slurm_batch_script():
  out = dry_run('slurm.py', '--nodes=4', '--gpus-per-node=8', '--partition=gpu', '--', *RUN)
  assert '#SBATCH --nodes=4\n' in out and '#SBATCH --ntasks-per-node=1\n' in out
  assert '#SBATCH --gpus-per-node=8\n' in out and '#SBATCH --partition=gpu\n' in out
  srun = next(line for line in out.splitlines() if line.startswith('srun'))
  assert shlex.split(srun) == ['srun', '--label', 'python', '-m', 'lm.main', *RUN]
  assert out.splitlines()[-1] == 'sbatch lm-job.sbatch'
