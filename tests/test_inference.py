"""Inference protocols: sliding window, multi-scale and flips against plain inference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddep_jax import inference

_KERNEL = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32)


def _pointwise_model(images):
  """A per-pixel linear model: translation-equivariant with no spatial context."""
  return images @ _KERNEL


def _context_model(images):
  """A model whose output depends on global context (the image mean), unlike a window."""
  return images @ _KERNEL + jnp.mean(images, axis=(1, 2), keepdims=True) @ _KERNEL * 3.0


def _images(shape=(2, 40, 72, 3), seed=1):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, size=shape), jnp.float32)


def test_window_starts_follow_mmseg_grid():
  assert inference.window_starts(2048, 1024, 1024) == [0, 1024]
  assert inference.window_starts(512, 512, 341) == [0]
  # 683-wide ADE20K image, 512 crop, 341 stride: windows at 0 and flush right at 171.
  assert inference.window_starts(683, 512, 341) == [0, 171]
  assert inference.window_starts(1100, 512, 341) == [0, 341, 588]


def test_sliding_window_equals_whole_for_pointwise_model():
  images = _images()
  whole = inference.predict_probabilities(_pointwise_model, images)
  sliding = inference.predict_probabilities(_pointwise_model, images, mode='sliding',
                                            crop_size=(32, 32), stride=(16, 21))
  np.testing.assert_allclose(sliding, whole, atol=1e-6)


def test_sliding_window_really_crops_windows():
  # With a context-dependent model the windows see different context: results must differ,
  # which shows the windows are real crops rather than the whole image.
  images = _images()
  whole = inference.predict_probabilities(_context_model, images)
  sliding = inference.predict_probabilities(_context_model, images, mode='sliding',
                                            crop_size=(32, 32), stride=(16, 16))
  assert float(jnp.max(jnp.abs(whole - sliding))) > 1e-3


def test_sliding_average_of_overlaps_by_hand():
  # A model returning the window's mean: overlapping windows average their values.
  def mean_model(x):
    return jnp.broadcast_to(jnp.mean(x, axis=(1, 2, 3), keepdims=True), x.shape[:3] + (1,))
  images = jnp.concatenate([jnp.zeros((1, 16, 16, 3)), jnp.ones((1, 16, 16, 3))], axis=2)
  logits = inference.sliding_window_logits(mean_model, images, crop_size=(16, 16),
                                           stride=(16, 8), size_divisor=16)
  # Windows at columns 0, 8, 16 with means 0, 0.5, 1.
  np.testing.assert_allclose(logits[0, 0, :, 0],
                             [0.0] * 8 + [0.25] * 8 + [0.75] * 8 + [1.0] * 8, atol=1e-6)


def test_cityscapes_halves_protocol_matches_hand_assembly():
  images = _images((1, 32, 64, 3))
  probs = inference.predict_probabilities(_context_model, images, mode='sliding',
                                          crop_size=(32, 32), stride=(32, 32), flip=True)
  def half(x):
    p = jax.nn.softmax(_context_model(x), -1)
    q = jax.nn.softmax(_context_model(x[:, :, ::-1]), -1)[:, :, ::-1]
    return (p + q) / 2
  expected = jnp.concatenate([half(images[:, :, :32]), half(images[:, :, 32:])], axis=2)
  np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_flip_and_multiscale_equal_plain_on_constant_image():
  images = jnp.full((1, 32, 48, 3), 0.3)
  plain = inference.predict_probabilities(_pointwise_model, images)
  tta = inference.predict_probabilities(_pointwise_model, images,
                                        scales=inference.MULTI_SCALE_SCALES, flip=True)
  np.testing.assert_allclose(tta, plain, atol=1e-6)


def test_multiscale_averages_softmax_of_each_scale():
  images = _images((1, 32, 32, 3))
  got = inference.predict_probabilities(_pointwise_model, images, scales=(0.5, 1.0))
  small = jax.image.resize(images, (1, 16, 16, 3), 'bilinear', antialias=False)
  up = jax.image.resize(_pointwise_model(small), (1, 32, 32, 5), 'bilinear', antialias=False)
  expected = (jax.nn.softmax(up, -1) + jax.nn.softmax(_pointwise_model(images), -1)) / 2
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_whole_pads_to_size_divisor_and_crops_back():
  seen = []
  def model(x):
    seen.append(x.shape)
    return _pointwise_model(x)
  images = _images((1, 20, 36, 3))
  probs = inference.predict_probabilities(model, images, size_divisor=16)
  assert seen == [(1, 32, 48, 3)]
  assert probs.shape == (1, 20, 36, 5)


def test_bad_protocol_errors():
  with pytest.raises(ValueError, match='crop_size and stride'):
    inference.predict_probabilities(_pointwise_model, _images(), mode='sliding')
  with pytest.raises(ValueError, match='Unknown inference mode'):
    inference.predict_probabilities(_pointwise_model, _images(), mode='tiles')
