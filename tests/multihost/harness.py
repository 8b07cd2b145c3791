"""Starts N JAX processes on this machine, joined by `jax.distributed` over loopback.

Each process gets its own simulated CPU devices and talks to the others through the coordinator
(process 0, on a free 127.0.0.1 port) and gloo's TCP collectives, as the hosts of a Cloud TPU pod
talk over the network: real cross-process collectives, nothing mocked.

    with harness.Launch(lambda i, port: [...argv of process i...], log_dir) as launch:
      launch.wait_for_log(0, 'train/loss', timeout=300)
      launch.signal(1, signal.SIGTERM)
      launch.wait(timeout=300)  # AssertionError with every log's tail unless all exit 0.

Every wait is bounded; processes still running when the `with` block ends (a failed assertion, a
timeout) are killed with their process groups. Outputs go to files (not pipes, which a chatty
process could fill and block on), `log_dir/process_<i>.log`.

Why the workers run without the persistent XLA compilation cache that tests/conftest.py sets up:
with several CPU processes JAX writes cache entries from process 0 only, and its cache key hashes
a per-process topology fingerprint, so process 0 would load every program from the cache while
process 1 compiles it. Gloo waits only 30 s (a fixed timeout) for a peer to join a collective, so
that skew is enough to fail a run on a loaded machine. Without the cache both compile in step.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Sequence

import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
DEVICES_PER_PROCESS = 2
# After one process fails, the others get this long to fail or finish on their own (their own
# error messages are the useful ones) before they are killed.
_GRACE_AFTER_FAILURE_S = 20
_LOG_TAIL_CHARS = 6000
_CACHE_VARIABLES = ('JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
                    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES')


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(devices: int = DEVICES_PER_PROCESS) -> dict:
  """Environment of a worker process: `devices` CPU devices, gloo collectives, no network."""
  env = {k: v for k, v in os.environ.items() if k not in _CACHE_VARIABLES}
  env.update(
      PYTHONPATH=REPO,
      XLA_FLAGS=xla_flags.flags(devices),
      # jax 0.10 already defaults to gloo on CPU; pinned here because cross-process collectives
      # on CPU need it (JAX reads JAX_* variables as its config options).
      JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
      JAX_PLATFORMS='cpu',
      TF_CPP_MIN_LOG_LEVEL='2',
      CUDA_VISIBLE_DEVICES='',
  )
  return env


def distributed_flags(process_id: int, port: int, num_processes: int) -> list[str]:
  """The trainer's `--config.distributed.*` flags for one process of a loopback job."""
  return ['--config.distributed.initialize=True',
          f'--config.distributed.coordinator_address=127.0.0.1:{port}',
          f'--config.distributed.num_processes={num_processes}',
          f'--config.distributed.process_id={process_id}']


class LaunchError(AssertionError):
  """A process failed, or a wait ran out of time; the message holds every process's log tail."""


class Launch:
  """N processes of one job; a context manager that kills what is left when it exits."""

  def __init__(self, argv: Callable[[int, int], Sequence[str]], log_dir: str, *,
               num_processes: int = 2, devices_per_process: int = DEVICES_PER_PROCESS):
    """Starts process i with `argv(i, port)` (port: the coordinator's, free on 127.0.0.1)."""
    self.port = free_port()
    self.num_processes = num_processes
    os.makedirs(log_dir, exist_ok=True)
    self.log_paths = [os.path.join(log_dir, f'process_{i}.log') for i in range(num_processes)]
    self.processes = []
    env = process_env(devices_per_process)
    try:
      for i in range(num_processes):
        with open(self.log_paths[i], 'wb') as log:
          # A new session: the process and anything it starts are one group, killed together.
          self.processes.append(subprocess.Popen(
              [str(a) for a in argv(i, self.port)], cwd=REPO, env=env, stdout=log,
              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
    except BaseException:
      self.kill()
      raise

  def __enter__(self) -> 'Launch':
    return self

  def __exit__(self, *exc_info) -> None:
    self.kill()

  @property
  def pids(self) -> list[int]:
    return [p.pid for p in self.processes]

  def log(self, i: int) -> str:
    with open(self.log_paths[i], encoding='utf-8', errors='replace') as f:
      return f.read()

  def signal(self, i: int, signum: int) -> None:
    self.processes[i].send_signal(signum)

  def wait_for_log(self, i: int, text: str, *, timeout: float) -> None:
    """Waits until process i has logged `text`; fails early if any process exits."""
    deadline = time.monotonic() + timeout
    while text not in self.log(i):
      exited = [j for j, p in enumerate(self.processes) if p.poll() is not None]
      if exited:
        self._fail(f'process(es) {exited} exited before process {i} logged {text!r}')
      if time.monotonic() > deadline:
        self._fail(f'process {i} did not log {text!r} within {timeout:.0f} s')
      time.sleep(0.2)

  def wait(self, *, timeout: float) -> list[str]:
    """Waits for every process to exit 0; returns their logs."""
    deadline = time.monotonic() + timeout
    first_failure = None
    while any(p.poll() is None for p in self.processes):
      now = time.monotonic()
      if first_failure is None and any(p.returncode not in (None, 0) for p in self.processes):
        first_failure = now
      if now > deadline:
        self._fail(f'not all processes finished within {timeout:.0f} s')
      if first_failure is not None and now > first_failure + _GRACE_AFTER_FAILURE_S:
        break
      time.sleep(0.2)
    if any(p.returncode != 0 for p in self.processes):
      self._fail('a process failed')
    return [self.log(i) for i in range(self.num_processes)]

  def kill(self) -> None:
    for p in self.processes:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
    for p in self.processes:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        pass

  def _fail(self, reason: str) -> None:
    self.kill()
    parts = [f'{reason}; return codes {[p.returncode for p in self.processes]}.']
    for i in range(self.num_processes):
      parts.append(f'--- process {i} log ({self.log_paths[i]}), tail:\n'
                   f'{self.log(i)[-_LOG_TAIL_CHARS:]}')
    raise LaunchError('\n'.join(parts))


def run(argv: Callable[[int, int], Sequence[str]], log_dir: str, *, timeout: float,
        num_processes: int = 2) -> list[str]:
  """Runs a job to completion (every process must exit 0); returns the processes' logs."""
  with Launch(argv, log_dir, num_processes=num_processes) as launch:
    return launch.wait(timeout=timeout)

