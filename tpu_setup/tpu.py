"""A TPU VM (or a queued resource) for lm, through gcloud: create, set up, launch, watch,
delete, ssh, logs. Every command takes --dry-run, which prints the commands it would run, in
order, and runs nothing.

  python tpu_setup/tpu.py create --name=lm-v4 --zone=us-central2-b --project=P \\
      --accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --spot
  python tpu_setup/tpu.py setup  --name=lm-v4 --zone=... --project=P --repo=URL --commit=SHA
  python tpu_setup/tpu.py launch --name=lm-v4 --zone=... --project=P -- \\
      --config=configs/gpt2_124m.py --workdir=gs://BUCKET/runs/gpt2
  python tpu_setup/tpu.py watch  ... (same flags as create, setup and launch together)
  python tpu_setup/tpu.py delete|ssh|logs --name=lm-v4 --zone=... --project=P

Every worker runs the same `python -m lm.main` command; JAX finds the other workers itself
(lm.distributed: a Cloud TPU VM), so no coordinator address is passed. See tpu_setup/README.md.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time

VENV = '~/lm-venv'
CHECKOUT = '~/lm'
LOG = '~/lm.log'  # on each worker: one log a worker


def where(a) -> list[str]:
  return [f'--zone={a.zone}', f'--project={a.project}']


def tpu_vm(a, verb: str, *rest: str) -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, a.name, *where(a), *rest]


def queued(a, verb: str, *rest: str) -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'queued-resources', verb, a.name, *where(a), *rest]


def on_workers(a, script: str, worker: str = 'all') -> list[str]:
  """The same shell script on every worker (or one), over gcloud's ssh."""
  return tpu_vm(a, 'ssh', f'--worker={worker}', f'--command={script}')


def create_commands(a) -> list[list[str]]:
  pricing = ['--spot'] if a.spot else ['--reserved'] if a.reserved else []
  if a.queued:
    return [queued(a, 'create', f'--node-id={a.name}', f'--accelerator-type={a.accelerator_type}',
                   f'--runtime-version={a.runtime_version}', *pricing)]
  return [tpu_vm(a, 'create', f'--accelerator-type={a.accelerator_type}',
                 f'--version={a.runtime_version}', *pricing)]


def state_command(a) -> list[str]:
  if a.queued:
    return queued(a, 'describe', '--format=value(state.state)')
  return tpu_vm(a, 'describe', '--format=value(state)')


READY = {'READY', 'ACTIVE'}  # a TPU VM's state, a queued resource's
GONE = {'PREEMPTED', 'TERMINATED', 'FAILED', 'SUSPENDED', ''}  # '' : not found


def setup_script(a) -> str:
  """Python, a virtual environment, the project at a commit, its requirements with jax[tpu]."""
  return ' && '.join([
      'sudo apt-get update -q', 'sudo apt-get install -y -q python3-venv git',
      f'(test -d {CHECKOUT} || git clone {shlex.quote(a.repo)} {CHECKOUT})',
      f'cd {CHECKOUT}', 'git fetch -q origin', f'git checkout -q {shlex.quote(a.commit)}',
      f'python3 -m venv {VENV}', f'. {VENV}/bin/activate', 'pip install -q --upgrade pip',
      "pip install -q -r requirements.txt 'jax[tpu]' gcsfs"])  # gcsfs: gs:// workdirs


def launch_script(a) -> str:
  """Stale runs that hold the TPU stopped, its lock file removed, then the run in the
  background with its output in this worker's log."""
  run = ' '.join(shlex.quote(arg) for arg in ['python', '-m', 'lm.main', *a.run_args])
  return ' ; '.join([
      "pkill -f 'python -m lm.main' || true", 'sleep 2', 'sudo rm -f /tmp/libtpu_lockfile',
      f'cd {CHECKOUT} && . {VENV}/bin/activate && (nohup {run} > {LOG} 2>&1 &)'])


def delete_commands(a) -> list[list[str]]:
  if a.queued:
    return [queued(a, 'delete', '--force', '--quiet')]
  return [tpu_vm(a, 'delete', '--quiet')]


class Runner:
  """Runs commands, or with --dry-run prints each as a shell line."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def run(self, cmd: list[str], check: bool = True) -> None:
    if self.dry_run:
      print(shlex.join(cmd))
      return
    print('+', shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=check)

  def output(self, cmd: list[str]) -> str:
    if self.dry_run:
      print(shlex.join(cmd))
      return 'READY'
    out = subprocess.run(cmd, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ''

  def wait_ready(self, a) -> None:
    while (state := self.output(state_command(a))) not in READY:
      if state in GONE - {''}:
        sys.exit(f'{a.name}: {state}; delete it and create it again (or use watch)')
      print(f'{a.name}: {state or "not found yet"}; waiting', flush=True)
      time.sleep(a.poll_seconds)


def create(r: Runner, a) -> None:
  for cmd in create_commands(a):
    r.run(cmd)
  r.wait_ready(a)


def setup(r: Runner, a) -> None:
  r.run(on_workers(a, setup_script(a)))


def launch(r: Runner, a) -> None:
  r.run(on_workers(a, launch_script(a)))


def watch(r: Runner, a) -> None:
  """Polls the VM; once it is preempted (or gone), deletes it, creates it again, sets it up
  and relaunches the run, which resumes from its newest checkpoint in the workdir."""
  while True:
    state = r.output(state_command(a))
    if r.dry_run or state in GONE:
      print(f'{a.name}: {state or "not found"}: recreating', flush=True)
      for cmd in delete_commands(a):
        r.run(cmd, check=False)
      create(r, a)
      setup(r, a)
      launch(r, a)
      if r.dry_run:
        return
    time.sleep(a.poll_seconds)


def delete(r: Runner, a) -> None:
  for cmd in delete_commands(a):
    r.run(cmd)


def ssh(r: Runner, a) -> None:
  r.run(tpu_vm(a, 'ssh', f'--worker={a.worker}'))


def logs(r: Runner, a) -> None:
  r.run(on_workers(a, f'tail -n {a.lines} {LOG}', a.worker))


COMMANDS = {'create': create, 'setup': setup, 'launch': launch, 'watch': watch,
            'delete': delete, 'ssh': ssh, 'logs': logs}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('command', choices=sorted(COMMANDS))
  p.add_argument('--name', required=True, help='the TPU VM (and queued resource) name')
  p.add_argument('--zone', required=True)
  p.add_argument('--project', required=True)
  p.add_argument('--accelerator-type', default='v4-8', help='e.g. v4-32, v5litepod-16, v6e-8')
  p.add_argument('--runtime-version', default='tpu-ubuntu2204-base')
  pricing = p.add_mutually_exclusive_group()
  pricing.add_argument('--spot', action='store_true')
  pricing.add_argument('--reserved', action='store_true')
  p.add_argument('--queued', action='store_true', help='a queued resource, not a plain TPU VM')
  p.add_argument('--repo', default='', help='setup: the git URL of the project')
  p.add_argument('--commit', default='main', help='setup: the commit (or branch) to check out')
  p.add_argument('--worker', default='all', help='ssh, logs: a worker index, or all (logs)')
  p.add_argument('--lines', type=int, default=100, help='logs: lines of each worker\'s log')
  p.add_argument('--poll-seconds', type=float, default=60)
  p.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  return p


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  split = argv.index('--') if '--' in argv else len(argv)
  a = parser().parse_args(argv[:split])
  a.run_args = argv[split + 1:]
  if a.command in ('setup', 'watch') and not a.repo:
    parser().error(f'{a.command}: give --repo=URL (and --commit) of the project')
  if a.command in ('launch', 'watch') and not a.run_args:
    parser().error(f'{a.command}: give the run\'s arguments after --, e.g. -- '
                   '--config=configs/gpt2_124m.py --workdir=gs://BUCKET/runs/gpt2')
  if a.command == 'ssh' and a.worker == 'all':
    a.worker = '0'
  COMMANDS[a.command](Runner(a.dry_run), a)


if __name__ == '__main__':
  main()
