"""The train loop survives what a preemptible pod does to it, and ends bitwise where it would have.

A run SIGKILLed at random moments of its life and restarted each time, a damaged newest
checkpoint, a failing save, and a second run started on a workdir in use. Every run is compared
with one uninterrupted reference run (in-process, shared by the module's tests). The killed run's
restarts are forked from tests/fork_server.py, which imports TensorFlow and JAX once for all.
"""

import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from ddep_jax import checkpoints
from ddep_jax import train
from ddep_jax import workdir_lock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
from test_checkpoints import _fail_finalize, _garble_metadata, _truncate_data
from test_train import _config, _flat, _main_command, _subprocess_env
# pylint: enable=g-import-not-at-top,wrong-import-position

STEPS = 6
ARG = dict(task='segment', steps=STEPS, checkpoint_every=2)


@pytest.fixture(scope='module')
def reference(digit_scenes_dir, tmp_path_factory):
  """The uninterrupted run: its workdir holds checkpoints 1, 2, 4, 6 and results/val.json."""
  workdir = tmp_path_factory.mktemp('reference')
  train.train_and_evaluate(_config(digit_scenes_dir, **ARG), str(workdir))
  params = _flat(checkpoints.load_params(str(workdir))[0])
  return workdir, params, (workdir / 'results' / 'val.json').read_bytes()


def _copy_until(reference_dir, target, last_step):
  """The reference workdir as a run killed right after its `last_step` checkpoint leaves it."""
  shutil.copytree(reference_dir, target)
  shutil.rmtree(target / 'results')
  for name in os.listdir(target / 'checkpoints'):
    if int(name) > last_step:
      shutil.rmtree(target / 'checkpoints' / name)


def _assert_equals_reference(workdir, reference):
  _, params, results = reference
  final, step = checkpoints.load_params(str(workdir))
  assert step == STEPS
  final = _flat(final)
  assert final.keys() == params.keys()
  for k in params:
    np.testing.assert_array_equal(final[k], params[k], err_msg=k)
  assert (workdir / 'results' / 'val.json').read_bytes() == results


def test_damaged_newest_checkpoint_resumes_from_the_previous_one(digit_scenes_dir, tmp_path,
                                                                 reference, caplog):
  workdir = tmp_path / 'run'
  _copy_until(reference[0], workdir, last_step=4)
  _truncate_data(workdir / 'checkpoints' / '4')
  # A killed run's lock names a dead pid: taken over.
  dead = subprocess.Popen(['true'])
  dead.wait()
  (workdir / 'run.lock').write_text(json.dumps({'host': socket.gethostname(), 'pid': dead.pid}))
  train.train_and_evaluate(_config(digit_scenes_dir, **ARG), str(workdir))
  _assert_equals_reference(workdir, reference)
  assert (workdir / 'checkpoints' / '4.corrupt').is_dir()
  messages = [r.getMessage() for r in caplog.records]
  assert any('step 4' in m and 'is damaged' in m for m in messages)


def test_all_checkpoints_damaged_stops_instead_of_starting_afresh(digit_scenes_dir, tmp_path,
                                                                  reference):
  workdir = tmp_path / 'run'
  _copy_until(reference[0], workdir, last_step=2)
  for name in os.listdir(workdir / 'checkpoints'):
    _garble_metadata(workdir / 'checkpoints' / name)
  with pytest.raises(checkpoints.NoReadableCheckpointError, match='1.corrupt, .*2.corrupt'):
    train.train_and_evaluate(_config(digit_scenes_dir, **ARG), str(workdir))
  assert not (workdir / 'results').exists()


def test_failing_save_stops_the_run_and_keeps_the_previous_checkpoint(digit_scenes_dir, tmp_path,
                                                                      reference, monkeypatch):
  workdir = tmp_path / 'run'
  _copy_until(reference[0], workdir, last_step=2)
  _fail_finalize(monkeypatch)  # No space left on device, from the next save on.
  with pytest.raises(checkpoints.CheckpointWriteError) as error:
    train.train_and_evaluate(_config(digit_scenes_dir, **ARG), str(workdir))
  monkeypatch.undo()
  assert 'step 4' in str(error.value) and 'No space left on device' in str(error.value)
  assert 'step 2 is complete' in str(error.value)
  params, step = checkpoints.load_params(str(workdir))
  assert step == 2
  expected = _flat(checkpoints.load_params(str(reference[0]), 2)[0])
  for k, v in _flat(params).items():
    np.testing.assert_array_equal(v, expected[k], err_msg=k)
  assert not (workdir / 'results').exists()


def test_second_run_on_a_workdir_in_use_is_refused(digit_scenes_dir, tmp_path):
  workdir = tmp_path / 'run'
  with workdir_lock.locked(str(workdir)):
    with pytest.raises(workdir_lock.WorkdirInUseError, match=f'pid {os.getpid()}'):
      train.train_and_evaluate(_config(digit_scenes_dir, **ARG), str(workdir))
  assert os.listdir(workdir) == ['run.lock']  # Refused before touching anything.


# -- Kill at any moment ---------------------------------------------------------------------------

class _ForkServer:
  """tests/fork_server.py: trainer starts without re-importing TensorFlow and JAX each time."""

  def __init__(self):
    self.process = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      'fork_server.py')],
        env=_subprocess_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self._started = []
    self.exit_codes = {}
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.process.stdout:
      event, pid, *code = line.split()
      if event == 'started':
        self._started.append(int(pid))
      else:
        self.exit_codes[int(pid)] = int(code[0])

  def start(self, args, log_path):
    count = len(self._started)
    self.process.stdin.write('\t'.join([str(log_path), *args]) + '\n')
    self.process.stdin.flush()
    deadline = time.time() + 60
    while len(self._started) == count:
      assert time.time() < deadline and self.process.poll() is None, 'fork server died'
      time.sleep(0.001)
    return self._started[-1]

  def close(self):
    self.process.stdin.close()
    self.process.wait(timeout=60)


class _Life:
  """One start of the trainer (a forked child of the server), its log and workdir watched."""

  def __init__(self, server, arg, workdir, log_path):
    self.server = server
    self.log_path = log_path
    self.pid = server.start(_main_command(arg, workdir)[3:], log_path)
    self._log = ''
    self._offset = 0

  def logged(self, text):
    try:
      with open(self.log_path, 'rb') as f:
        f.seek(self._offset)
        new = f.read()
    except FileNotFoundError:  # The child has not opened it yet.
      new = b''
    self._offset += len(new)
    self._log += new.decode('utf-8', errors='replace')
    return text in self._log

  def ended(self):
    return self.pid in self.server.exit_codes

  def wait_for(self, condition, timeout=300):
    """Polls until `condition()` or the trainer ends; True when the condition came first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      if condition():
        return True
      if self.ended():
        return condition()
      time.sleep(0.002)
    raise TimeoutError('the trainer neither reached the kill point nor ended:\n' +
                       self._log[-3000:])

  def kill(self):
    os.kill(self.pid, signal.SIGKILL)
    self.finish(expect_success=False)

  def finish(self, expect_success=True):
    deadline = time.time() + 600
    while not self.ended() and time.time() < deadline:
      time.sleep(0.01)
    if expect_success:
      self.logged('')
      assert self.server.exit_codes.get(self.pid) == 0, self._log[-3000:]


def _complete_steps(workdir):
  directory = workdir / 'checkpoints'
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if directory.exists() else []


def _tmp_dirs(workdir):
  directory = workdir / 'checkpoints'
  return [d for d in os.listdir(directory) if 'tmp' in d] if directory.exists() else []


def _plan(rng, n):
  """`n` kill points in the order of a run's life, each phase at least once."""
  kinds = ['start', 'after_step', 'in_save', 'in_eval', 'in_results']
  kinds += rng.choices(['start', 'after_step', 'in_save'], k=n - len(kinds))
  order = {k: i for i, k in enumerate(['start', 'after_step', 'in_save', 'in_eval',
                                       'in_results'])}
  return sorted(kinds, key=order.get)


def test_run_killed_at_random_moments_ends_bitwise_equal(digit_scenes_dir, tmp_path, reference):
  rng = random.Random(20)
  arg = ','.join(f'{k}={v}' for k, v in dict(ARG, data_dir=digit_scenes_dir).items())
  workdir = tmp_path / 'run'
  began = time.time()
  hit = []
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  server = _ForkServer()
  for i, kind in enumerate(_plan(rng, n=8)):
    life = _Life(server, arg, workdir, tmp_path / f'life{i}.log')
    done = _complete_steps(workdir)
    if kind == 'start':  # Restoring / compiling / loading the data, before the first step ends.
      delay = rng.uniform(0.0, 2.0)
      life.wait_for(lambda: life.logged('Initialised from') or life.logged('Resumed from'))
      time.sleep(delay)
      point = f'start+{delay:.2f}s after init'
    elif kind == 'after_step':  # Between steps: right after a step's metrics were logged.
      steps = [s for s in range(2, STEPS, 2) if s > (done or [0])[-1]] or [STEPS]
      step = rng.choice(steps)
      life.wait_for(lambda: life.logged(f'[{step}] train/grad_norm'))
      point = f'after step {step}'
    elif kind == 'in_save':  # Inside an asynchronous save: its temporary directory exists.
      pending = [s for s in (2, 4, 6) if s not in done] or [STEPS]
      step = rng.choice(pending)
      life.wait_for(lambda: any(d.startswith(f'{step}.') for d in _tmp_dirs(workdir)))
      point = f'in save of step {step}'
    elif kind == 'in_eval':  # Final checkpoint complete and restored (or written): evaluating.
      delay = rng.uniform(0.0, 1.0)
      life.wait_for(lambda: STEPS in _complete_steps(workdir) and (
          life.logged('Resumed from') or life.logged('Initialised from')))
      time.sleep(delay)
      point = f'eval, {delay:.2f}s after the final checkpoint'
    else:  # While writing results: as soon as the results directory appears.
      life.wait_for(lambda: (workdir / 'results').exists())
      point = 'writing results'
    ended_by_itself = life.ended()
    life.kill()
    results = sorted(os.listdir(workdir / 'results')) if (workdir / 'results').exists() else []
    hit.append(f'{point}{" (had ended by itself)" if ended_by_itself else ""} -> checkpoints '
               f'{_complete_steps(workdir)}, tmp {_tmp_dirs(workdir)}, results {results}')
  final = _Life(server, arg, workdir, tmp_path / 'final.log')
  final.finish()
  server.close()
  duration = time.time() - began
  used = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = used.ru_utime + used.ru_stime - children.ru_utime - children.ru_stime
  print(f'\nKill points ({duration:.1f}s wall, {cpu:.1f}s CPU for {len(hit)} kills and the final '
        'restart):\n  ' + '\n  '.join(hit))
  assert sum('ended by itself' not in h for h in hit) >= 8, hit
  assert any('in save' in h and 'ended by itself' not in h and '.orbax-checkpoint-tmp' in h
             for h in hit), hit
  _assert_equals_reference(workdir, reference)
  assert not _tmp_dirs(workdir)
