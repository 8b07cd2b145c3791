"""The workdir lock: one live run per workdir, a dead run's lock taken over."""

import json
import os
import socket
import subprocess

import pytest

from ddep_jax import workdir_lock


def test_second_run_is_refused_with_the_owner_named(tmp_path):
  with workdir_lock.locked(str(tmp_path)):
    with pytest.raises(workdir_lock.WorkdirInUseError) as error:
      with workdir_lock.locked(str(tmp_path)):
        pass
  message = str(error.value)
  assert f'pid {os.getpid()} on host {socket.gethostname()}' in message
  assert str(tmp_path / 'run.lock') in message and '--workdir' in message
  with workdir_lock.locked(str(tmp_path)):  # Released: free again.
    pass


def test_lock_of_a_dead_run_is_taken_over(tmp_path, caplog):
  dead = subprocess.Popen(['true'])
  dead.wait()
  (tmp_path / 'run.lock').write_text(json.dumps(
      {'host': socket.gethostname(), 'pid': dead.pid, 'started': 0}))
  with workdir_lock.locked(str(tmp_path)):
    owner = json.loads((tmp_path / 'run.lock').read_text())
    assert owner['pid'] == os.getpid()
  assert any(f'pid {dead.pid}' in r.getMessage() and 'Taking over' in r.getMessage()
             for r in caplog.records)


def test_marker_on_an_object_store_refuses_a_live_local_owner(monkeypatch):
  # ram:// goes through tf.io.gfile like gs://: no flock there, only the marker.
  workdir = 'ram://lock_test_run'
  live = subprocess.Popen(['sleep', '30'])
  try:
    lock = workdir_lock.WorkdirLock(workdir)
    monkeypatch.setattr(lock, '_owner', {'host': socket.gethostname(), 'pid': live.pid})
    lock.acquire()  # Writes the marker as if that live process held it.
    with pytest.raises(workdir_lock.WorkdirInUseError, match=f'pid {live.pid}'):
      workdir_lock.WorkdirLock(workdir).acquire()
  finally:
    live.kill()
    live.wait()
  with workdir_lock.locked(workdir):  # Its owner is gone: taken over.
    pass
