"""Tests for ddep_jax.sharding on 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ddep_jax import optimizer
from ddep_jax import sharding


def _config(**overrides):
  config = sharding.default_config()
  for key, value in overrides.items():
    config[key] = value
  return config


FSDP = dict(mesh=(('data', -1), ('fsdp', 2)),
            sharding_rules=(('decoder/.*', 'fsdp'), ('.*', 'replicate')))


def _abstract_params():
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  return {
      'encoder': {'embedding': {'kernel': f32(1, 1, 64, 32)}},
      'decoder': {'stage0': {'conv0': {'conv': {'kernel': f32(3, 3, 32, 64)},
                                       'gn': {'scale': f32(7)}}}},
      'head': {'kernel': f32(1, 1, 64, 3), 'bias': f32(3)},
  }


def test_make_mesh_sizes():
  assert jax.device_count() == 8
  assert dict(sharding.make_mesh(_config()).shape) == {'data': 8}
  mesh = sharding.make_mesh(_config(**FSDP))
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  one = sharding.make_mesh(_config(), devices=jax.devices()[:1])
  assert dict(one.shape) == {'data': 1}


@pytest.mark.parametrize('mesh, message', [
    ((('data', 3),), 'needs 3 devices but 8 are present'),
    ((('data', -1), ('fsdp', 3)), 'not divisible by the fixed axis sizes'),
    ((('data', -1), ('fsdp', -1)), 'at most one -1'),
    ((('batch', -1),), 'axis names must be distinct, include "data"'),
    ((('data', -1), ('model', 2)), 'axis names'),
])
def test_bad_mesh_is_rejected(mesh, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(_config(mesh=mesh))


def test_param_shardings_follow_rules():
  mesh = sharding.make_mesh(_config(**FSDP))
  shardings = sharding.param_shardings(_abstract_params(), mesh, _config(**FSDP))
  decoder = shardings['decoder']['stage0']['conv0']
  # Largest dimension divisible by fsdp=2: the 64 output channels.
  assert decoder['conv']['kernel'].spec == P(None, None, None, 'fsdp')
  assert decoder['gn']['scale'].spec == P()  # 7 is not divisible by 2: replicated.
  assert shardings['encoder']['embedding']['kernel'].spec == P()
  assert shardings['head']['bias'].spec == P()
  # Each device holds half the kernel.
  kernel = jax.device_put(jnp.zeros((3, 3, 32, 64)), decoder['conv']['kernel'])
  assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 32, 32)}


@pytest.mark.parametrize('overrides, message', [
    (dict(sharding_rules=(('decoder/.*', 'fsdp'), ('.*', 'replicate'))), "has no 'fsdp' axis"),
    (dict(sharding_rules=(('decoder/.*', 'replicate'),)), r'match no rule.*encoder/'),
    (dict(sharding_rules=(('.*', 'shard'),)), "rule must be one of"),
    (dict(sharding_rules=(('.*', 'replicate'), ('decoder/.*', 'replicate'))), 'shadowed'),
])
def test_bad_sharding_rules_are_rejected(overrides, message):
  config = _config(**overrides)
  with pytest.raises(ValueError, match=message):
    sharding.param_shardings(_abstract_params(), sharding.make_mesh(config), config)


def test_optimizer_state_mirrors_parameter_shardings():
  config = _config(**FSDP)
  opt_config = optimizer.default_config()
  opt_config.total_steps = 10
  opt_config.schedule = [('encoder/.*', None), ('.*', dict(decay_type='cosine'))]
  params = _abstract_params()
  tx = optimizer.make_optimizer(opt_config, params).tx
  state = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': params,
           'opt_state': jax.eval_shape(tx.init, params)}
  mesh = sharding.make_mesh(config)
  shardings = sharding.state_shardings(state, mesh, config)
  assert shardings['step'].spec == P()
  flat = {optimizer.path_name(p): s for p, s in
          jax.tree_util.tree_flatten_with_path(shardings['opt_state'])[0]}
  moments = {k: s.spec for k, s in flat.items() if '/mu/' in k or '/nu/' in k}
  # Adam mu and nu of the decoder kernel are split like the kernel; the rest is replicated.
  assert len(moments) == 2 * 4
  for path, spec in moments.items():
    expected = P(None, None, None, 'fsdp') if path.endswith('conv/kernel') else P()
    assert spec == expected, path
  assert all(s.spec == P() for k, s in flat.items() if k not in moments)


def test_global_batch_splits_the_leading_axis_over_all_devices():
  mesh = sharding.make_mesh(_config(**FSDP))
  local = {'image': np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
           'label': np.arange(16, dtype=np.int32)}
  batch = sharding.global_batch(local, mesh)
  for key, value in local.items():
    np.testing.assert_array_equal(np.asarray(batch[key]), value)
    assert batch[key].sharding == sharding.batch_sharding(mesh)
    shards = batch[key].addressable_shards
    assert len(shards) == 8 and {s.data.shape[0] for s in shards} == {2}
    for shard in shards:  # Each device holds exactly its rows.
      np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
  with pytest.raises(ValueError, match=r"batch\['image'\] has shape \(6, 3\).*divisible by the 8"):
    sharding.global_batch({'image': np.zeros((6, 3))}, mesh)


def test_initialize_distributed(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  assert not sharding.initialize_distributed(_config())
  assert calls == []
  config = _config()
  config.distributed.initialize = True
  assert sharding.initialize_distributed(config)  # Auto-detection (Cloud TPU, SLURM).
  assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None)]
  config.distributed.update(dict(coordinator_address='10.0.0.1:1234', num_processes=4,
                                 process_id=2))
  sharding.initialize_distributed(config)
  assert calls[-1] == dict(coordinator_address='10.0.0.1:1234', num_processes=4, process_id=2)
  config.distributed.process_id = None
  with pytest.raises(ValueError, match=r"but not \['process_id'\]"):
    sharding.initialize_distributed(config)


def test_default_config():
  config = sharding.default_config()
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.mesh == (('data', -1),) and config.sharding_rules == (('.*', 'replicate'),)
  assert config.distributed.initialize is False
