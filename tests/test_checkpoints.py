"""Orbax checkpoints: save / restore across meshes, partial loads, partial saves."""

import os
import shutil

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

from ddep_jax import checkpoints


def _state(mesh):
  params = {'encoder': {'dense': {'kernel': jnp.arange(32.0).reshape(8, 4)}},
            'head': {'bias': jnp.full((3,), 2.0)}}
  params = jax.device_put(params, {'encoder': {'dense': {'kernel': NamedSharding(mesh, P('data'))}},
                                   'head': {'bias': NamedSharding(mesh, P())}})
  opt_state = optax.adam(1e-3).init(params)
  return {'step': jnp.int32(7), 'params': params, 'opt_state': opt_state}


def _abstract(state, mesh):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=NamedSharding(mesh, P())), state)


def test_save_restore_onto_another_mesh_and_load_params(tmp_path):
  mesh8 = jax.make_mesh((8,), ('data',))
  state = _state(mesh8)
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2)
  assert ckpt.save(7, state, {'step': 7, 'task': 'denoise', 'model_name': 'tiny'})
  ckpt.wait()
  assert ckpt.latest_step() == 7
  mesh2 = jax.make_mesh((2,), ('data',), devices=jax.devices()[:2])
  restored = ckpt.restore(7, _abstract(state, mesh2))
  ckpt.close()
  np.testing.assert_array_equal(restored['params']['encoder']['dense']['kernel'],
                                np.arange(32.0).reshape(8, 4))
  assert restored['params']['head']['bias'].sharding.mesh.devices.size == 2
  assert int(restored['step']) == 7
  # Parameters alone, as host numpy, from the workdir, the checkpoints dir or the step dir.
  for path in (tmp_path, tmp_path / 'checkpoints', tmp_path / 'checkpoints' / '7'):
    params, step = checkpoints.load_params(str(path))
    assert step == 7
    assert isinstance(params['head']['bias'], np.ndarray)
    np.testing.assert_array_equal(params['head']['bias'], [2.0, 2.0, 2.0])


def test_incomplete_checkpoint_is_ignored(tmp_path):
  mesh = jax.make_mesh((8,), ('data',))
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=3)
  ckpt.save(5, _state(mesh), {'step': 5})
  ckpt.wait()
  ckpt.close()
  # A save killed half-way leaves Orbax's temporary directory behind, never a step directory.
  directory = tmp_path / 'checkpoints'
  shutil.copytree(directory / '5', directory / '9.orbax-checkpoint-tmp-1234')
  os.remove(directory / '9.orbax-checkpoint-tmp-1234' / 'commit_success.txt')
  reopened = checkpoints.Checkpointer(str(tmp_path), keep=3)
  assert reopened.latest_step() == 5
  reopened.close()
  assert checkpoints.load_params(str(tmp_path))[1] == 5


def test_missing_checkpoint_error_names_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='No Orbax checkpoint found'):
    checkpoints.load_params(str(tmp_path / 'nowhere'))


# -- Damage and failing writes --------------------------------------------------------------------

def _data_files(step_dir):
  # The merged OCDBT database's data files (ocdbt.process_*/ hold the unmerged per-process copies).
  return sorted(p for p in step_dir.glob('state/d/*') if p.is_file())


def _truncate_data(step_dir):
  for path in _data_files(step_dir):
    with open(path, 'r+b') as f:
      f.truncate(path.stat().st_size // 3)


def _delete_data(step_dir):
  os.remove(_data_files(step_dir)[-1])


def _garble_metadata(step_dir):
  (step_dir / 'state' / '_METADATA').write_bytes(b'\x00garbage{')


def _garble_data(step_dir):
  for path in _data_files(step_dir):
    data = bytearray(path.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
    path.write_bytes(bytes(data))


def _delete_manifest(step_dir):
  os.remove(step_dir / 'state' / 'manifest.ocdbt')


DAMAGE = {'truncated': _truncate_data, 'deleted': _delete_data,
          'garbled_metadata': _garble_metadata, 'garbled_data': _garble_data,
          'no_manifest': _delete_manifest}


def _saved_run(tmp_path, steps=(2, 4)):
  mesh = jax.make_mesh((8,), ('data',))
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=5)
  for step in steps:
    state = _state(mesh)
    state['params']['head']['bias'] = state['params']['head']['bias'] + step
    ckpt.save(step, state, {'step': step})
    ckpt.wait()
  ckpt.close()
  return mesh


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_restored(
    tmp_path, damage, capfd, caplog):
  mesh = _saved_run(tmp_path)
  directory = tmp_path / 'checkpoints'
  DAMAGE[damage](directory / '4')
  capfd.readouterr()
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=5)
  state, step = ckpt.restore_latest(_abstract(_state(mesh), mesh))
  assert step == 2
  np.testing.assert_array_equal(state['params']['head']['bias'], [4.0, 4.0, 4.0])
  # Moved aside, not deleted; Orbax no longer sees it, so step 4 can be saved again.
  assert (directory / '4.corrupt').is_dir() and not (directory / '4').exists()
  assert ckpt.latest_step() == 2
  assert ckpt.save(4, _state(mesh), {'step': 4})
  ckpt.close()
  lines = [r.getMessage() for r in caplog.records if 'is damaged' in r.getMessage()]
  assert len(lines) == 1 and 'step 4' in lines[0] and str(directory / '4') in lines[0]
  assert '\n' not in lines[0]
  assert 'Event loop is closed' not in ''.join(capfd.readouterr())


def test_all_checkpoints_damaged_stops_with_a_message(tmp_path, capfd):
  mesh = _saved_run(tmp_path)
  directory = tmp_path / 'checkpoints'
  _truncate_data(directory / '4')
  _garble_metadata(directory / '2')
  for _ in range(2):  # The first start moves them aside; a second start must not begin afresh.
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep=5)
    with pytest.raises(checkpoints.NoReadableCheckpointError) as error:
      ckpt.restore_latest(_abstract(_state(mesh), mesh))
    ckpt.close()
    message = str(error.value)
    assert '2.corrupt' in message and '4.corrupt' in message and 'new --workdir' in message
  assert 'Event loop is closed' not in ''.join(capfd.readouterr())


def test_load_params_of_a_damaged_checkpoint_names_the_file(tmp_path, capfd):
  _saved_run(tmp_path)
  _truncate_data(tmp_path / 'checkpoints' / '4')
  capfd.readouterr()
  with pytest.raises(checkpoints.DamagedCheckpointError) as error:
    checkpoints.load_params(str(tmp_path))
  message = str(error.value)
  assert message.startswith(f'The checkpoint {tmp_path}/checkpoints/4 cannot be read')
  assert 'Requested byte range' in message and '\n' not in message
  assert 'Event loop is closed' not in ''.join(capfd.readouterr())
  assert checkpoints.load_params(str(tmp_path / 'checkpoints' / '2'))[1] == 2


def _fail_finalize(monkeypatch):
  """Makes the background part of every save fail as a full disk does."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  async def no_space(self):
    raise OSError(28, 'No space left on device', str(self.get()))
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', no_space)


def test_failed_save_stops_with_a_message_and_keeps_the_previous_checkpoint(tmp_path,
                                                                             monkeypatch):
  mesh = _saved_run(tmp_path, steps=(2,))
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=1)
  _fail_finalize(monkeypatch)
  ckpt.save(4, _state(mesh), {'step': 4})  # Asynchronous: the error comes at the next sync.
  with pytest.raises(checkpoints.CheckpointWriteError) as error:
    ckpt.wait()
  ckpt.close()  # Raises the error once, not again while closing.
  monkeypatch.undo()
  message = str(error.value)
  assert 'step 4' in message and 'No space left on device' in message
  assert 'the checkpoint of step 2 is complete' in message
  # Not taken for a checkpoint, and keep=1 did not delete step 2 for it.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) in (['2'], ['2', '4.orbax-checkpoint-tmp'])
  reopened = checkpoints.Checkpointer(str(tmp_path), keep=1)
  state, step = reopened.restore_latest(_abstract(_state(mesh), mesh))
  reopened.close()
  assert step == 2
  np.testing.assert_array_equal(state['params']['head']['bias'], [4.0, 4.0, 4.0])
