"""An sbatch job for lm on a GPU cluster: N nodes, one process per node with all of its GPUs,
`srun python -m lm.main ...` on every node. JAX reads the job from SLURM's environment
(lm.distributed: SLURM with more than one task), so no coordinator address is passed.

  python tpu_setup/slurm.py --nodes=4 --gpus-per-node=8 --partition=gpu --time=24:00:00 \\
      [--venv=~/lm-venv] [--dry-run] -- --config=configs/gpt2_124m.py --workdir=/shared/runs/x

--dry-run prints the batch script and the sbatch command, and submits nothing; without it the
script is written to --script (default lm-job.sbatch) and submitted.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path


def batch_script(a) -> str:
  run = ' '.join(shlex.quote(arg) for arg in ['python', '-m', 'lm.main', *a.run_args])
  lines = ['#!/bin/bash',
           f'#SBATCH --job-name={a.job_name}',
           f'#SBATCH --nodes={a.nodes}',
           '#SBATCH --ntasks-per-node=1',
           f'#SBATCH --gpus-per-node={a.gpus_per_node}',
           f'#SBATCH --cpus-per-task={a.cpus_per_task}',
           f'#SBATCH --time={a.time}',
           '#SBATCH --output=%x-%j.log',
           '#SBATCH --signal=TERM@120  # a SIGTERM 2 minutes before the time limit: lm saves']
  if a.partition:
    lines.append(f'#SBATCH --partition={a.partition}')
  lines += ['set -euo pipefail',
            f'cd {shlex.quote(str(a.project_dir))}',
            f'. {a.venv}/bin/activate',
            '# one log a node: srun labels each line with its task',
            f'srun --label {run}']
  return '\n'.join(lines) + '\n'


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--nodes', type=int, required=True)
  p.add_argument('--gpus-per-node', type=int, default=8)
  p.add_argument('--cpus-per-task', type=int, default=16)
  p.add_argument('--partition', default='')
  p.add_argument('--time', default='24:00:00')
  p.add_argument('--job-name', default='lm')
  p.add_argument('--project-dir', default=str(Path(__file__).resolve().parents[1]))
  p.add_argument('--venv', default='~/lm-venv')
  p.add_argument('--script', default='lm-job.sbatch')
  p.add_argument('--dry-run', action='store_true', help='print, submit nothing')
  return p


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  split = argv.index('--') if '--' in argv else len(argv)
  a = parser().parse_args(argv[:split])
  a.run_args = argv[split + 1:]
  if not a.run_args:
    parser().error('give the run\'s arguments after --, e.g. -- --config=configs/gpt2_124m.py '
                   '--workdir=/shared/runs/gpt2')
  script = batch_script(a)
  if a.dry_run:
    print(script, end='')
    print(shlex.join(['sbatch', a.script]))
    return
  Path(a.script).write_text(script)
  subprocess.run(['sbatch', a.script], check=True)


if __name__ == '__main__':
  main()
