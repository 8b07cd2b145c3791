"""Orbax checkpoints: save / restore across meshes, partial loads, merge errors, partial saves."""

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


def test_merge_params_carries_matching_paths_and_keeps_new_head():
  init = {'encoder': {'k': np.zeros((2, 2))}, 'decoder': {'k': np.zeros(3)},
          'head': {'kernel': np.zeros((4, 19))}}
  loaded = {'encoder': {'k': np.ones((2, 2))}, 'decoder': {'k': np.full(3, 5.0)},
            'head': {'kernel': np.ones((4, 3))}}
  merged = checkpoints.merge_params(init, loaded, ('encoder/.*', 'decoder/.*'))
  np.testing.assert_array_equal(merged['encoder']['k'], np.ones((2, 2)))
  np.testing.assert_array_equal(merged['decoder']['k'], np.full(3, 5.0))
  np.testing.assert_array_equal(merged['head']['kernel'], np.zeros((4, 19)))


def test_merge_params_reports_every_problem_with_paths_and_shapes():
  init = {'encoder': {'a': np.zeros((2, 2)), 'b': np.zeros(3)}}
  loaded = {'encoder': {'a': np.zeros((2, 5)), 'c': np.zeros(1)}}
  with pytest.raises(ValueError) as error:
    checkpoints.merge_params(init, loaded, ('encoder/.*',))
  message = str(error.value)
  assert 'in model but not in checkpoint: encoder/b' in message
  assert 'in checkpoint but not in model: encoder/c' in message
  assert 'shape mismatch at encoder/a: checkpoint (2, 5) vs model (2, 2)' in message
