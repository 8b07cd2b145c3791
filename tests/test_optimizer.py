"""Tests for ddep_jax.optimizer: schedules, freezing by regex, weight decay and multipliers."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddep_jax import optimizer

DDEP_SCHEDULE = [('encoder/.*', None), ('.*', dict(decay_type='constant'))]


def _params():
  """A miniature tree with the model's top-level layout."""
  return {
      'encoder': {'conv_root': {'kernel': jnp.full((2, 3), 2.0)},
                  'gn_root': {'bias': jnp.full((3,), 2.0), 'scale': jnp.ones((3,))}},
      'decoder': {'stage0': {'conv0': {'conv': {'kernel': jnp.full((3, 4), 2.0)}}}},
      'head': {'kernel': jnp.full((4, 3), 2.0), 'bias': jnp.full((3,), 2.0)},
  }


def _config(**overrides):
  config = optimizer.default_config()
  config.total_steps = 100
  config.schedule = (('.*', dict(decay_type='constant')),)
  config.lr = 0.1
  for key, value in overrides.items():
    config[key] = value
  return config


def _first_update(config, grads=None, params=None):
  params = _params() if params is None else params
  opt = optimizer.make_optimizer(config, params)
  grads = jax.tree.map(jnp.ones_like, params) if grads is None else grads
  updates, _ = opt.tx.update(grads, opt.tx.init(params), params)
  return jax.tree.map(np.asarray, updates), opt


def _leaf_paths(tree):
  return [optimizer.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_cosine_schedule_with_warmup_by_hand():
  schedule = optimizer.make_schedule(dict(decay_type='cosine', warmup_steps=2), total_steps=10)
  # Linear warm-up 0 -> 1 over 2 steps, then 0.5 (1 + cos(pi t / 8)) over the remaining 8.
  expected = {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.5 * (1 + np.cos(np.pi / 4)), 6: 0.5, 10: 0.0}
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, abs=1e-6), step


def test_linear_constant_and_multiplied_schedules_by_hand():
  linear = optimizer.make_schedule(dict(decay_type='linear', end_mult=0.2), total_steps=10)
  assert [float(linear(s)) for s in (0, 5, 10)] == pytest.approx([1.0, 0.6, 0.2])
  constant = optimizer.make_schedule(dict(decay_type='constant', mult=0.3, warmup_steps=3), 10)
  assert [float(constant(s)) for s in (0, 3, 9)] == pytest.approx([0.0, 0.3, 0.3])
  cosine = optimizer.make_schedule(dict(mult=2.0, end_mult=0.5), total_steps=4)
  assert [float(cosine(s)) for s in (0, 2, 4)] == pytest.approx([2.0, 1.25, 0.5])


@pytest.mark.parametrize('schedule, total_steps, message', [
    (dict(decay_type='step'), 10, "decay_type='step'"),
    (dict(warmup=3), 10, r"unknown key\(s\) \['warmup'\]"),
    (dict(warmup_steps=10), 10, 'warmup_steps=10 must lie in'),
    (dict(), None, 'positive number of steps'),
])
def test_bad_schedules_are_rejected(schedule, total_steps, message):
  with pytest.raises(ValueError, match=message):
    optimizer.make_schedule(schedule, total_steps)


def test_a_misspelt_schedule_key_fails_loudly_naming_the_entry_and_the_known_keys():
  # A schedule entry may omit keys (their defaults are optimizer.default_schedule()), but a key
  # it does not know is a typo, not a silently ignored setting.
  assert optimizer.default_schedule().to_dict() == dict(decay_type='cosine', warmup_steps=0,
                                                        mult=1.0, end_mult=0.0)
  with pytest.raises(AttributeError):
    optimizer.default_schedule().warmup = 3  # Locked.
  config = _config(schedule=[('encoder/.*', None), ('.*', dict(decay_typ='linear'))])
  with pytest.raises(ValueError, match=re.escape(
      "config.schedule[1] ('.*', ...) has unknown key(s) ['decay_typ']; misspelt? The known "
      "keys are ['decay_type', 'end_mult', 'mult', 'warmup_steps'], with defaults in "
      'ddep_jax.optimizer.default_schedule().')):
    optimizer.make_optimizer(config, _params())
  config = _config(schedule=None)
  config.schedule = dict(warmup_step=3)  # The plain-dict form.
  with pytest.raises(ValueError, match=r"^config.schedule has unknown key\(s\) \['warmup_step'\]"):
    optimizer.make_optimizer(config, _params())


def test_optimizer_fields_have_no_second_default():
  config = _config()
  del config['lr_mults']
  with pytest.raises(AttributeError, match='lr_mults'):
    optimizer.make_optimizer(config, _params())
  config = _config()
  del config['total_steps']
  with pytest.raises(AttributeError, match='total_steps'):
    optimizer.make_optimizer(config, _params())
  optimizer.make_optimizer(config, _params(), total_steps=10)  # Given: not read from config.


def test_adam_first_step_is_minus_lr_times_sign():
  # Bias-corrected Adam at step 1: m = g, v = g^2 -> update = -lr g / (|g| + eps).
  config = _config()
  grads = jax.tree.map(lambda p: -3.0 * jnp.ones_like(p), _params())
  updates, opt = _first_update(config, grads)
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_allclose(leaf, 0.1 * 3.0 / (3.0 + 1e-8), rtol=1e-5)
  assert all(jax.tree.leaves(opt.trainable_mask))
  assert float(opt.learning_rate_fn(7)) == pytest.approx(0.1)


def test_ddep_freezes_encoder_without_optimizer_state():
  config = _config(schedule=DDEP_SCHEDULE)
  params = _params()
  opt = optimizer.make_optimizer(config, params)
  assert opt.trainable_mask['encoder'] == {'conv_root': {'kernel': False},
                                           'gn_root': {'bias': False, 'scale': False}}
  assert all(jax.tree.leaves(opt.trainable_mask['decoder']))
  assert all(jax.tree.leaves(opt.trainable_mask['head']))
  state = opt.tx.init(params)
  paths = _leaf_paths(state)
  assert not [p for p in paths if 'encoder' in p]
  # One mu and one nu per trainable parameter: decoder kernel + head kernel and bias.
  assert len([p for p in paths if '/mu/' in p]) == 3
  assert len([p for p in paths if '/nu/' in p]) == 3
  # Huge gradients on the encoder change nothing; the rest moves by -lr * sign(g).
  grads = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
  updates, _ = opt.tx.update(grads, state, params)
  for leaf in jax.tree.leaves(updates['encoder']):
    assert np.all(np.asarray(leaf) == 0.0)
  for leaf in jax.tree.leaves(updates['decoder']) + jax.tree.leaves(updates['head']):
    np.testing.assert_allclose(leaf, -0.1, rtol=1e-5)


def test_adamw_weight_decay_is_decoupled_and_on_kernels_only():
  # Zero gradients: Adam's part is 0, so the update is -s_t * wd * w on kernels, 0 elsewhere.
  config = _config(wd=0.01, optimizer=dict(name='adamw', b1=0.9, b2=0.999, eps=1e-8))
  zero = jax.tree.map(jnp.zeros_like, _params())
  updates, _ = _first_update(config, zero)
  np.testing.assert_allclose(updates['decoder']['stage0']['conv0']['conv']['kernel'], -0.02)
  np.testing.assert_allclose(updates['head']['kernel'], -0.02)
  np.testing.assert_allclose(updates['encoder']['conv_root']['kernel'], -0.02)
  assert np.all(updates['head']['bias'] == 0) and np.all(updates['encoder']['gn_root']['bias'] == 0)
  # Decoupled from lr: the same decay with a 10x smaller learning rate.
  config.lr = 0.01
  updates_small_lr, _ = _first_update(config, zero)
  np.testing.assert_allclose(updates_small_lr['head']['kernel'], -0.02)
  # ... but it follows the schedule's shape (here 0.5 at the start of a linear 1 -> 0 over 2).
  config.schedule = (('.*', dict(decay_type='linear')),)
  config.total_steps = 2
  params = _params()
  opt = optimizer.make_optimizer(config, params)
  state = opt.tx.init(params)
  _, state = opt.tx.update(zero, state, params)
  updates, _ = opt.tx.update(zero, state, params)
  np.testing.assert_allclose(updates['head']['kernel'], -0.01)


def test_adam_weight_decay_is_coupled_l2():
  # Zero gradients: g' = wd * w enters Adam, whose first step is -lr * sign(g') = -lr.
  config = _config(wd=0.01)
  updates, _ = _first_update(config, jax.tree.map(jnp.zeros_like, _params()))
  np.testing.assert_allclose(updates['head']['kernel'], -0.1, rtol=1e-5)
  assert np.all(updates['head']['bias'] == 0)


def test_frozen_parameters_get_no_weight_decay():
  config = _config(wd=0.01, schedule=DDEP_SCHEDULE,
                   optimizer=dict(name='adamw', b1=0.9, b2=0.999, eps=1e-8))
  updates, _ = _first_update(config, jax.tree.map(jnp.zeros_like, _params()))
  assert np.all(updates['encoder']['conv_root']['kernel'] == 0)
  np.testing.assert_allclose(updates['head']['kernel'], -0.02)


def test_lr_mults_and_per_group_schedules():
  config = _config(lr_mults=(('decoder/.*', 0.5),))
  updates, _ = _first_update(config)
  np.testing.assert_allclose(updates['decoder']['stage0']['conv0']['conv']['kernel'], -0.05,
                             rtol=1e-5)
  np.testing.assert_allclose(updates['head']['kernel'], -0.1, rtol=1e-5)
  # A schedule per group; `learning_rate_fn` reports the first trained group.
  config = _config(schedule=[('encoder/.*', dict(decay_type='constant', mult=0.1)),
                             ('.*', dict(decay_type='constant'))])
  updates, opt = _first_update(config)
  np.testing.assert_allclose(updates['encoder']['conv_root']['kernel'], -0.01, rtol=1e-5)
  np.testing.assert_allclose(updates['head']['kernel'], -0.1, rtol=1e-5)
  assert len(opt.schedule_fns) == 2
  assert float(opt.learning_rate_fn(0)) == pytest.approx(0.01)


def test_gradient_clipping_ignores_frozen_gradients():
  # eps = 1 makes Adam's first step g / (|g| + 1) sensitive to the gradient's scale.
  adam = dict(name='adam', b1=0.9, b2=0.999, eps=1.0)
  params = {'encoder': {'kernel': jnp.zeros((1,))}, 'decoder': {'kernel': jnp.zeros((1,))}}
  grads = {'encoder': {'kernel': jnp.full((1,), 100.0)}, 'decoder': {'kernel': jnp.full((1,), 3.0)}}
  unclipped, _ = _first_update(_config(optimizer=adam, schedule=DDEP_SCHEDULE), grads, params)
  np.testing.assert_allclose(unclipped['decoder']['kernel'], -0.1 * 3 / 4, rtol=1e-5)
  clipped, _ = _first_update(_config(optimizer=adam, schedule=DDEP_SCHEDULE, grad_clip_norm=1.0),
                             grads, params)
  # Global norm over trainable gradients only: 3 -> 1 (the encoder's 100 does not count).
  np.testing.assert_allclose(clipped['decoder']['kernel'], -0.1 * 1 / 2, rtol=1e-5)
  assert clipped['encoder']['kernel'][0] == 0.0


@pytest.mark.parametrize('overrides, message', [
    (dict(schedule=[('enocder/.*', None), ('.*', dict())]), r"schedule\[0\]: regex 'enocder/"),
    (dict(schedule=[('.*', dict()), ('encoder/.*', None)]), 'shadowed by an earlier rule'),
    (dict(schedule=[('encoder/.*', None), ('decoder/.*', dict())]), r'match no rule.*head/'),
    (dict(schedule=[('.*', None)]), 'freezes every parameter'),
    (dict(schedule=[('/encoder/.*', None), ('.*', dict())]), 'starts with "/"'),
    (dict(lr_mults=(('head/.*', 0.0),)), 'multipliers must be > 0'),
    (dict(lr_mults=(('heads/.*', 2.0),)), r"lr_mults\[0\]: regex 'heads/"),
    (dict(optimizer=dict(name='sgd', b1=0.9, b2=0.999, eps=1e-8)), "name='sgd'"),
    (dict(lr=0.0), 'config.lr=0.0 must be > 0'),
])
def test_bad_optimizer_config_is_rejected(overrides, message):
  with pytest.raises(ValueError, match=message):
    optimizer.make_optimizer(_config(**overrides), _params())


def test_works_on_abstract_params_and_default_config_has_paper_values():
  config = optimizer.default_config()
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.optimizer.name == 'adam' and config.lr == 6e-5  # §5.1, 1x decoder.
  assert config.schedule[0][1]['decay_type'] == 'cosine'
  config.total_steps = 10
  config.schedule = DDEP_SCHEDULE  # The list form replaces the default list.
  abstract = jax.eval_shape(_params)
  opt = optimizer.make_optimizer(config, abstract)
  state = jax.eval_shape(opt.tx.init, abstract)
  assert not [p for p in _leaf_paths(state) if 'encoder' in p]
  # The plain-dict schedule form of big_vision applies to every parameter.
  config = _config(schedule=None)
  config.schedule = dict(decay_type='cosine')
  assert all(jax.tree.leaves(optimizer.make_optimizer(config, abstract).trainable_mask))


def test_match_rules_first_match_wins():
  indices = optimizer.match_rules(_params(), [('head/.*', 0), ('.*/kernel', 1), ('.*', 2)], 'x')
  assert indices['head'] == {'kernel': 0, 'bias': 0}
  assert indices['encoder']['conv_root']['kernel'] == 1
  assert indices['encoder']['gn_root'] == {'bias': 2, 'scale': 2}
