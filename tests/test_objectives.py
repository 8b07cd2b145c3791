"""Tests for ddep_jax.objectives: noise maths (Eq. 1, 5, 6), targets and losses."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddep_jax import objectives


def _denoising(**overrides):
  config = objectives.default_config().denoising
  config.update(overrides)
  return config


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


# One compile instead of one per primitive in eager mode.
_pixel_cross_entropy = jax.jit(objectives.pixel_cross_entropy)


def test_default_config_is_the_papers_ddep_setting():
  config = objectives.default_config()
  assert config.denoising.noise_type == 'scaled'
  assert config.denoising.noise_std == 0.22
  assert config.denoising.predict_target == 'noise'
  assert config.classification_loss == 'softmax'


def test_sigma_gamma_relation_by_hand():
  # Eq. 5: gamma = 1 / (1 + sigma^2); sigma = 0.22 -> 1 / 1.0484.
  assert objectives.gamma_from_noise_std(0.22) == pytest.approx(0.9538344143)
  assert objectives.gamma_from_noise_std(0.0) == 1.0
  # gamma = 0.95 (Table 4) -> sigma = sqrt(0.05 / 0.95).
  assert float(objectives.noise_std_from_gamma(0.95)) == pytest.approx(0.2294157339, rel=1e-6)
  sigma = np.array([0.1, 0.22, 0.8, 2.0], np.float32)
  np.testing.assert_allclose(
      objectives.noise_std_from_gamma(objectives.gamma_from_noise_std(sigma)), sigma, rtol=1e-5)


def test_add_noise_by_hand():
  x = jnp.array([[1.0, -1.0, 0.5]])
  eps = jnp.array([[0.5, 2.0, -1.0]])
  # Eq. 5 with gamma = 0.64: 0.8 x + 0.6 eps.
  np.testing.assert_allclose(objectives.add_noise(x, eps, jnp.array([0.64]), 'scaled'),
                             [[1.1, 0.4, -0.2]], rtol=1e-6)
  # Eq. 1 with gamma = 0.8 <-> sigma = 0.5: x + 0.5 eps.
  np.testing.assert_allclose(objectives.add_noise(x, eps, jnp.array([0.8]), 'simple'),
                             [[1.25, 0.0, 0.0]], atol=1e-6)
  # Per-example gamma broadcasts over the pixels: second example unchanged at gamma = 1.
  x2, eps2 = jnp.ones((2, 2, 2, 3)), jnp.full((2, 2, 2, 3), 3.0)
  out = objectives.add_noise(x2, eps2, jnp.array([0.64, 1.0]), 'scaled')
  np.testing.assert_allclose(out[0], np.full((2, 2, 3), 0.8 + 1.8), rtol=1e-6)
  np.testing.assert_allclose(out[1], np.ones((2, 2, 3)), rtol=1e-6)


def test_scaled_noise_is_simple_noise_divided_by_sqrt_one_plus_sigma_squared():
  # The right-hand side of Eq. 5.
  sigma = 0.22
  x, eps = jnp.linspace(-1, 1, 12).reshape(1, 2, 2, 3), jnp.linspace(2, -2, 12).reshape(1, 2, 2, 3)
  gamma = jnp.array([objectives.gamma_from_noise_std(sigma)], jnp.float32)
  np.testing.assert_allclose(objectives.add_noise(x, eps, gamma, 'scaled'),
                             (x + sigma * eps) / np.sqrt(1 + sigma**2), rtol=1e-5, atol=1e-6)


# One batch shape for every noise test: eager JAX compiles each primitive once per shape.
SHAPE = (64, 16, 16, 3)


@pytest.mark.parametrize('noise_type, expected_variance', [('scaled', 1.0), ('simple', 1.64)])
def test_variance_of_noisy_image(noise_type, expected_variance):
  # Unit-variance images: scaled noise keeps variance 1 (§4.1); simple noise adds sigma^2 = 0.64.
  images = jax.random.normal(jax.random.key(1), SHAPE)
  noisy, _, _ = objectives.denoising_inputs(images, _keys(64),
                                            _denoising(noise_type=noise_type, noise_std=0.8))
  # 49152 samples: the standard error of the variance estimate is about 0.007.
  assert float(jnp.var(noisy)) == pytest.approx(expected_variance, abs=0.03)


@pytest.mark.parametrize('noise_type', ['scaled', 'simple'])
def test_target_is_the_noise_that_was_added_or_the_image(noise_type):
  images = jax.random.uniform(jax.random.key(2), SHAPE, minval=-1, maxval=1)
  noisy, eps, gamma = objectives.denoising_inputs(
      images, _keys(64), _denoising(noise_type=noise_type, noise_std=0.5))
  np.testing.assert_allclose(gamma, np.full(64, 0.8), rtol=1e-6)
  # Eq. 5 (gamma = 0.8) / Eq. 1 (sigma = 0.5) solved for the noise.
  expected = ((noisy - np.sqrt(0.8) * images) / np.sqrt(0.2) if noise_type == 'scaled'
              else (noisy - images) / 0.5)
  np.testing.assert_allclose(eps, expected, rtol=1e-4, atol=1e-4)
  assert abs(float(jnp.std(eps)) - 1.0) < 0.02  # Standard normal noise.
  assert abs(float(jnp.mean(eps))) < 0.02
  noisy_img, target, _ = objectives.denoising_inputs(
      images, _keys(64), _denoising(noise_type=noise_type, noise_std=0.5, predict_target='image'))
  np.testing.assert_array_equal(target, images)  # Eq. 2.
  np.testing.assert_array_equal(noisy_img, noisy)  # Same keys, same noise.


def test_noise_differs_between_examples_and_follows_their_keys():
  images = jnp.zeros(SHAPE)
  keys = _keys(64)
  _, eps, _ = objectives.denoising_inputs(images, keys, _denoising())
  flat = np.asarray(eps).reshape(64, -1)
  correlation = np.corrcoef(flat)[np.triu_indices(64, 1)]
  # Independent draws: |r| of 768 samples has std 0.036; 2016 pairs stay below 5.5 std.
  assert np.abs(correlation).max() < 0.2
  # An example's noise depends on its key only, not on the rest of the batch.
  _, eps_one, _ = objectives.denoising_inputs(images[1:2], keys[1:2], _denoising())
  np.testing.assert_array_equal(eps_one[0], eps[1])


def test_fixed_gamma_and_per_example_gamma_range():
  images = jnp.zeros(SHAPE)
  _, _, gamma = objectives.denoising_inputs(images, _keys(64),
                                            _denoising(noise_std=None, gamma=0.95))
  np.testing.assert_array_equal(gamma, np.full(64, 0.95, np.float32))
  # Table 4: gamma ~ U(0.9, 0.95), drawn per example.
  _, _, gamma = objectives.denoising_inputs(images, _keys(64),
                                            _denoising(noise_std=None, gamma_range=(0.9, 0.95)))
  gamma = np.asarray(gamma)
  assert gamma.min() >= 0.9 and gamma.max() <= 0.95
  assert len(np.unique(gamma)) >= 60  # Distinct per example (float32 ties are rare).
  assert gamma.mean() == pytest.approx(0.925, abs=0.006)  # std of the mean: 0.0018.
  # Each example is noised with its own gamma: zero images give sqrt(1 - gamma_i) * eps_i.
  noisy, eps, gamma = objectives.denoising_inputs(
      images, _keys(64), _denoising(noise_std=None, gamma_range=(0.1, 0.9)))
  assert np.ptp(np.asarray(gamma)) > 0.5
  np.testing.assert_allclose(noisy, np.sqrt(1 - gamma)[:, None, None, None] * eps, rtol=1e-5,
                             atol=1e-7)


@pytest.mark.parametrize('overrides, message', [
    (dict(gamma=0.95), 'exactly one of noise_std, gamma, gamma_range'),
    (dict(noise_std=None), 'exactly one'),
    (dict(noise_std=None, gamma=1.5), r'gamma=1.5 must lie in \(0, 1\]'),
    (dict(noise_std=None, gamma=0.0), 'must lie in'),
    (dict(noise_std=None, gamma_range=(0.95, 0.9)), '0 < a <= b <= 1'),
    (dict(noise_std=-0.1), 'must be >= 0'),
    (dict(noise_type='gaussian'), "noise_type='gaussian'"),
    (dict(predict_target='x'), "predict_target='x'"),
])
def test_bad_denoising_config_is_rejected(overrides, message):
  with pytest.raises(ValueError, match=message):
    objectives.check_denoising_config(_denoising(**overrides))


def test_a_misspelt_or_missing_denoising_field_fails_loudly():
  # A misspelt field would otherwise leave the default noise level in force, silently.
  misspelt = _denoising(noise_std=None).to_dict()
  misspelt['gama'] = 0.95
  with pytest.raises(ValueError, match=re.escape(
      "config.denoising has unknown field(s) ['gama']; misspelt? Its fields are those of "
      "ddep_jax.objectives.default_config(): ['gamma', 'gamma_range', 'noise_std', "
      "'noise_type', 'predict_target'].")):
    objectives.denoising_inputs(jnp.zeros((2, 4, 4, 3)), _keys(2), misspelt)
  missing = _denoising().to_dict()
  del missing['predict_target']
  with pytest.raises(ValueError, match=re.escape(
      "config.denoising has no field(s) ['predict_target']. Build it from "
      'ddep_jax.objectives.default_config()')):
    objectives.check_denoising_config(missing)


def test_squared_l2_loss_by_hand():
  prediction = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  assert float(objectives.squared_l2_loss(prediction, jnp.zeros((2, 2)))) == 7.5
  assert float(objectives.squared_l2_loss(prediction, prediction)) == 0.0
  with pytest.raises(ValueError, match='prediction shape'):
    objectives.squared_l2_loss(prediction, jnp.zeros((2, 3)))


def test_pixel_cross_entropy_by_hand():
  # p(class 1) = 3 / 4 -> -log(3/4); the ignored pixel contributes nothing whatever its logits.
  logits = jnp.array([[[0.0, np.log(3.0)], [0.0, np.log(3.0)], [100.0, -100.0]]])
  labels = jnp.array([[1, 0, 255]])
  loss, num_valid = _pixel_cross_entropy(logits, labels)
  assert int(num_valid) == 2
  assert float(loss) == pytest.approx((np.log(4 / 3) + np.log(4)) / 2, rel=1e-6)
  # Uniform logits: log K per valid pixel.
  loss, _ = _pixel_cross_entropy(jnp.zeros((2, 3, 3, 19)), jnp.zeros((2, 3, 3), int))
  assert float(loss) == pytest.approx(np.log(19), rel=1e-6)


def test_pixel_cross_entropy_equals_loss_with_ignored_pixels_removed():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, size=(2, 6, 5)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.4] = 255
  valid = labels != 255
  loss, num_valid = _pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  kept_loss, kept_num = _pixel_cross_entropy(jnp.asarray(logits[valid][None]),
                                                       jnp.asarray(labels[valid][None]))
  assert int(num_valid) == int(kept_num) == valid.sum()
  np.testing.assert_allclose(loss, kept_loss, rtol=1e-6)
  # And ignored pixels get exactly zero gradient.
  grads = jax.grad(lambda lg: _pixel_cross_entropy(lg, jnp.asarray(labels))[0])(
      jnp.asarray(logits))
  assert np.all(np.asarray(grads)[~valid] == 0.0)
  assert np.all(np.abs(np.asarray(grads)[valid]).sum(-1) > 0)


def test_pixel_cross_entropy_with_every_pixel_ignored_is_zero():
  loss, num_valid = _pixel_cross_entropy(jnp.ones((1, 2, 2, 3)),
                                                   jnp.full((1, 2, 2), 255))
  assert float(loss) == 0.0 and int(num_valid) == 0


def test_weighted_pixel_cross_entropy_by_hand():
  # Pixel losses log(4/3) (class 1, weight 2) and log 4 (class 0, weight 0.5); 255 ignored.
  logits = jnp.array([[[0.0, np.log(3.0)], [0.0, np.log(3.0)], [100.0, -100.0]]])
  labels = jnp.array([[1, 0, 255]])
  loss, num_valid = objectives.pixel_cross_entropy(logits, labels, class_weights=(0.5, 2.0))
  assert int(num_valid) == 2
  assert float(loss) == pytest.approx((2 * np.log(4 / 3) + 0.5 * np.log(4)) / 2.5, rel=1e-6)
  # Unit weights are the unweighted loss; weight 0 removes a class like the ignore label does.
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 4, 4, 3)).astype(np.float32))
  labels = rng.integers(0, 3, size=(2, 4, 4)).astype(np.int32)
  np.testing.assert_allclose(
      objectives.pixel_cross_entropy(logits, jnp.asarray(labels), class_weights=(1, 1, 1))[0],
      objectives.pixel_cross_entropy(logits, jnp.asarray(labels))[0], rtol=1e-6)
  np.testing.assert_allclose(
      objectives.pixel_cross_entropy(logits, jnp.asarray(labels), class_weights=(0, 1, 1))[0],
      objectives.pixel_cross_entropy(logits, jnp.asarray(np.where(labels == 0, 255, labels)))[0],
      rtol=1e-6)
  with pytest.raises(ValueError, match='2 class weights for 3 classes'):
    objectives.pixel_cross_entropy(logits, jnp.asarray(labels), class_weights=(1, 1))


@pytest.mark.parametrize('weights, message', [
    ((1.0, 1.0), 'has 2 entries but config.num_classes=3'),
    ((1.0, -1.0, 1.0), 'finite number >= 0'),
    ((1.0, float('nan'), 1.0), 'finite number >= 0'),
    ((0, 0, 0), 'all 0'),
])
def test_check_class_weights_rejects(weights, message):
  with pytest.raises(ValueError, match=message):
    objectives.check_class_weights(weights, 3)
  objectives.check_class_weights(None, 3)
  objectives.check_class_weights((0.1, 1, 1), 3)


def test_classification_losses_by_hand():
  logits = jnp.array([[0.0, np.log(3.0)], [0.0, 0.0]])
  labels = jnp.array([1, 0])
  assert float(objectives.classification_loss(logits, labels, 'softmax')) == pytest.approx(
      (np.log(4 / 3) + np.log(2)) / 2, rel=1e-6)
  # Sigmoid: sum over classes of binary cross-entropies. Example 1: -log s(ln 3) - log(1 - s(0)).
  expected_first = -np.log(0.75) - np.log(0.5)
  expected_second = 2 * np.log(2)
  assert float(objectives.classification_loss(logits, labels, 'sigmoid')) == pytest.approx(
      (expected_first + expected_second) / 2, rel=1e-6)
  # Multi-hot targets give the same as class ids when they are one-hot.
  one_hot = jax.nn.one_hot(labels, 2)
  for loss_type in ('softmax', 'sigmoid'):
    np.testing.assert_allclose(objectives.classification_loss(logits, one_hot, loss_type),
                               objectives.classification_loss(logits, labels, loss_type),
                               rtol=1e-6)
  with pytest.raises(ValueError, match="classification_loss='hinge'"):
    objectives.classification_loss(logits, labels, 'hinge')
  with pytest.raises(ValueError, match='do not fit logits'):
    objectives.classification_loss(logits, jnp.zeros((2, 3)), 'softmax')


def test_default_config_is_a_configdict_that_accepts_gamma_instead_of_sigma():
  config = objectives.default_config()
  assert isinstance(config, ml_collections.ConfigDict)
  config.denoising.noise_std = None
  config.denoising.gamma_range = (0.9, 0.95)
  objectives.check_denoising_config(config.denoising)
