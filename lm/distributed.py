"""Many processes: JAX's multi-controller start-up, and what the processes must agree on.

Every process runs the same command. `initialize(d)` runs before anything touches a device:
- with `distributed.coordinator_address` or `distributed.num_processes` set, it calls
  `jax.distributed.initialize` with the keys given (the rest detected by JAX);
- unset, it calls it with no arguments only where JAX finds a cluster to read them from
  (`cluster(os.environ)`: JAX_COORDINATOR_ADDRESS, SLURM with more than one task, Open MPI with
  more than one rank, a TPU pod's worker list, or a Cloud TPU VM, where JAX asks the metadata
  server); otherwise the run is one process and nothing is called.
On CPU the processes' collectives go through gloo (jax's default there).

After start-up, `same_config` stops every process with one line when their configs differ,
and `all_ok` turns an error that one process met into an error on all of them. (A signal
that one process receives is agreed inside the train step: lm.train.StopOnSignal.)
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from lm.checkpoint import flatten
from lm.config import ConfigError, DistributedConfig


def cluster(environ: Mapping[str, str]) -> str | None:
  """The kind of multi-process cluster this environment describes, or None.

  Pure in `environ`, except for Cloud TPU VMs, found by their TPU device files and libtpu."""
  count = lambda key: int(environ.get(key, '1') or 1)
  if environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  if 'SLURM_JOB_ID' in environ and count('SLURM_NTASKS') > 1:
    return 'SLURM'
  if 'OMPI_MCA_orte_hnp_uri' in environ and count('OMPI_COMM_WORLD_SIZE') > 1:
    return 'Open MPI'
  hosts = environ.get('TPU_WORKER_HOSTNAMES') or environ.get('TPU_PROCESS_ADDRESSES') or ''
  if len([h for h in hosts.split(',') if h]) > 1:
    return 'TPU pod (GKE)'
  if environ is os.environ and _cloud_tpu_vm():
    return 'Cloud TPU VM'
  return None


def _cloud_tpu_vm() -> bool:
  return find_spec('libtpu') is not None and (Path('/dev/accel0').exists()
                                              or Path('/dev/vfio/0').exists())


def initialize(d: DistributedConfig, environ: Mapping[str, str] = os.environ) -> str | None:
  """Starts JAX's distributed runtime when the keys or the environment ask for it; returns how
  it was started ('config', a cluster kind) or None for a lone process. With the keys set, a
  coordinator that does not answer in `initialization_timeout` seconds (or a port process 0
  cannot listen on) is a ConfigError naming it."""
  explicit = bool(d.coordinator_address) or d.num_processes > 1
  how = 'config' if explicit else cluster(environ)
  if how is None or jax.distributed.is_initialized():  # a second run in the same processes
    return how
  kwargs: dict[str, Any] = {'initialization_timeout': d.initialization_timeout}
  if explicit:
    kwargs.update(coordinator_address=d.coordinator_address or None,
                  num_processes=d.num_processes or None,
                  process_id=None if d.process_id < 0 else d.process_id)
  if d.local_device_ids:
    kwargs['local_device_ids'] = list(d.local_device_ids)
  address = d.coordinator_address or environ.get('JAX_COORDINATOR_ADDRESS', '')
  if address and explicit:
    # The runtime aborts the process (no Python error) when the coordinator never answers:
    # check the port first, so that a mistake is one line.
    _check_coordinator(address, d.process_id, d.initialization_timeout)
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:  # what JAX could not detect (e.g. JAX_COORDINATOR_ADDRESS alone)
    raise ConfigError(f'distributed: JAX found a {how} setting but not the rest ({e}); give '
                      'distributed.num_processes and distributed.process_id (and '
                      'distributed.coordinator_address) on every process') from e
  return how


def _check_coordinator(address: str, process_id: int, timeout: float) -> None:
  """Process 0 must be able to listen on the coordinator's port; every other process must
  reach it within `timeout` seconds. Raises ConfigError naming the address and what to check."""
  host, port = address.rsplit(':', 1)
  field = f'distributed.coordinator_address={address!r}'
  if process_id == 0:
    try:
      with socket.create_server(('', int(port))):
        return
    except OSError as e:
      raise ConfigError(f'{field}: process 0 cannot listen on port {port} ({e.strerror}); '
                        'give a free port, the same on every process') from e
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise ConfigError(
            f'{field}: no coordinator answered within distributed.initialization_timeout='
            f'{timeout}s ({e.strerror or e}); check that every worker was started with the '
            'same command and its own distributed.process_id, that process 0 runs on that '
            'host, and that the port is open between the hosts') from e
      time.sleep(0.5)


def describe(mesh: jax.sharding.Mesh) -> str:
  """The start-up line: process i of n, devices local and global, platform, mesh."""
  return (f'process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} '
          f'local of {jax.device_count()} devices ({jax.default_backend()}); mesh '
          f'{dict(mesh.shape)}')


def all_ok(ok: bool) -> bool:
  """Whether every process passes `ok` (a collective every process must call)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def config_hash(config: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def same_config(config: dict[str, Any]) -> None:
  """Raises ConfigError on every process, naming the differing keys, unless all processes run
  the same config (`config` without the keys that differ by design, such as process_id)."""
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(bytes.fromhex(config_hash(config)), np.uint8)
  digests = multihost_utils.process_allgather(digest)
  if (digests == digests[0]).all():
    return
  text = json.dumps(config, sort_keys=True).encode()
  size = int(np.max(multihost_utils.process_allgather(np.array(len(text)))))
  texts = multihost_utils.process_allgather(np.frombuffer(text.ljust(size), np.uint8))
  configs = [flatten(json.loads(bytes(t).decode())) for t in texts]
  differing = [i for i in range(len(configs)) if configs[i] != configs[0]]
  keys = sorted({k for i in differing for k in set(configs[i]) | set(configs[0])
                 if configs[i].get(k) != configs[0].get(k)})
  raise ConfigError(
      f'the processes were started with different configs (processes {differing} differ from '
      f'process 0 in {", ".join(keys)}): start every process with '
      'the same command and config file, changing only distributed.process_id')
