"""Starts trainer processes by forking one that has imported the library already (tests only).

Most of the CPU time of a `python -m ddep_jax.main` start is importing TensorFlow and JAX; the kill
tests start the trainer many times, so this server imports them once (before any JAX backend or
thread exists, which keeps fork safe) and forks one child per start. Each child is a real process
running `ddep_jax.main`; SIGKILL ends it as it ends any trainer.

Protocol: stdin lines `LOG_PATH<TAB>ARG<TAB>ARG...` (the child's stdout and stderr go to
LOG_PATH); stdout lines `started PID` and `exited PID CODE`.
"""

import os
import select
import sys
import traceback

from absl import app

from ddep_jax import main as trainer_main
from ddep_jax import train  # pylint: disable=unused-import  (imported here, once, for the children)


def _child(log_path: str, args: list[str]) -> None:
  fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  os.dup2(fd, 1)
  os.dup2(fd, 2)
  code = 0
  try:
    sys.argv = ['ddep_jax.main', *args]
    app.run(trainer_main.main)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:  # pylint: disable=broad-exception-caught
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def main() -> None:
  children = set()
  while True:
    ready, _, _ = select.select([sys.stdin], [], [], 0.01)
    if ready:
      line = sys.stdin.readline()
      if not line:
        return
      log_path, *args = line.rstrip('\n').split('\t')
      pid = os.fork()
      if pid == 0:
        _child(log_path, args)
      children.add(pid)
      print(f'started {pid}', flush=True)
    for pid in list(children):
      done, status = os.waitpid(pid, os.WNOHANG)
      if done:
        children.discard(pid)
        print(f'exited {pid} {os.waitstatus_to_exitcode(status)}', flush=True)


if __name__ == '__main__':
  main()
