"""One live run per workdir: a lock file naming the host and pid of the run that holds it.

Two trainers in one workdir would interleave their checkpoints and results, so a run takes
`<workdir>/run.lock` before it reads or writes anything there, and a second run is refused with a
message naming the owner. On a local (or NFS) file system the lock is an `flock` on that file: the
kernel releases it when its process dies, however it dies, so the lock of a killed run is taken
over at the next start (where `flock` is not supported, a lock naming a dead pid on this host is).

Multi-host: process 0 holds the lock and the other processes follow its outcome. Object stores
(`gs://`) have no atomic create-if-absent through `tf.io.gfile`, so there the lock file is a
best-effort marker: a start is refused while it names a live process on the same host; a marker
written by another host cannot be checked, and is taken over with a warning naming it.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from ddep_jax import fileio

LOCK_FILENAME = 'run.lock'


class WorkdirInUseError(RuntimeError):
  """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Exists, owned by another user.
  return True


def _describe(owner: dict) -> str:
  started = owner.get('started')
  when = time.strftime(' since %Y-%m-%d %H:%M:%S UTC', time.gmtime(started)) if started else ''
  return f'pid {owner.get("pid")} on host {owner.get("host")}{when}'


def _parse(text: str) -> dict:
  try:
    owner = json.loads(text)
    return owner if isinstance(owner, dict) else {}
  except json.JSONDecodeError:
    return {}


class WorkdirLock:
  """The lock of one workdir, held by this process until `release()`."""

  def __init__(self, workdir: str):
    self.workdir = os.fspath(workdir)
    self.path = fileio.join(self.workdir, LOCK_FILENAME)
    self._fd = None
    self._owner = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}

  def _in_use(self, owner: dict) -> WorkdirInUseError:
    return WorkdirInUseError(
        f'The workdir {self.workdir} is in use by another run ({_describe(owner)}; lock file '
        f'{self.path}). Two runs in one workdir would interleave their checkpoints. Wait for '
        'that run to end or stop it, or start this one with another --workdir.')

  def _is_live_local_owner(self, owner: dict) -> bool:
    return (owner.get('host') == self._owner['host'] and isinstance(owner.get('pid'), int) and
            owner['pid'] != os.getpid() and _pid_alive(owner['pid']))

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirInUseError naming the run that holds it."""
    fileio.makedirs(self.workdir)
    if fileio.is_remote(self.path):
      self._acquire_marker()
      return
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      previous = _parse(os.read(fd, 4096).decode('utf-8', 'replace'))
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise self._in_use(previous) from None
        # No flock on this file system: fall back to the pid written in the file.
        if self._is_live_local_owner(previous):
          raise self._in_use(previous) from None
      if previous:
        logging.warning('Taking over the lock %s of a run that is gone (%s).', self.path,
                        _describe(previous))
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(self._owner).encode('utf-8'), 0)
      os.fsync(fd)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd

  def _acquire_marker(self) -> None:
    previous = _parse(fileio.read_text(self.path)) if fileio.exists(self.path) else {}
    if previous and self._is_live_local_owner(previous):
      raise self._in_use(previous)
    if previous:
      logging.warning('Taking over the run marker %s left by %s: on an object store it cannot '
                      'be told whether that run is still alive; if it is, stop one of the two.',
                      self.path, _describe(previous))
    fileio.write_text(self.path, json.dumps(self._owner))

  def release(self) -> None:
    if self._fd is not None:
      # Emptied, not deleted: a run that opened the file just now must not lock a deleted inode.
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
    elif fileio.is_remote(self.path) and fileio.exists(self.path):
      if _parse(fileio.read_text(self.path)).get('pid') == os.getpid():
        fileio.write_text(self.path, '')


@contextlib.contextmanager
def locked(workdir: str):
  """Holds `workdir`'s lock (process 0's) for the duration; every process raises if it is taken."""
  lock, error = None, None
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir)
    try:
      lock.acquire()
    except WorkdirInUseError as e:
      lock, error = None, e
  if jax.process_count() > 1:
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = WorkdirInUseError(f'The workdir {workdir} is in use by another run (process 0 '
                                'could not take its lock; its log names the owner).')
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
