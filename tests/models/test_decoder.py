"""Tests for the U-Net decoder: upsampling, GroupNorm, widths, noise conditioning (§4.4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddep_jax.models import decoder as decoder_lib

TINY = dict(base_widths=(16, 8, 8, 8, 8), num_groups=4)


def test_upsample2x_is_half_pixel_bilinear():
  x = np.arange(2 * 3, dtype=np.float32).reshape(1, 2, 3, 1) ** 2  # [[0, 1, 4], [9, 16, 25]]
  out = np.asarray(decoder_lib.upsample2x(jnp.asarray(x)))[0, :, :, 0]
  # Half-pixel centres: output column j samples input column (j + 0.5) / 2 - 0.5, clamped.
  cols = np.clip((np.arange(6) + 0.5) / 2 - 0.5, 0, 2)
  rows = np.clip((np.arange(4) + 0.5) / 2 - 0.5, 0, 1)
  by_col = np.stack([np.interp(cols, [0, 1, 2], x[0, r, :, 0]) for r in range(2)])
  expected = np.stack([np.interp(rows, [0, 1], by_col[:, c]) for c in range(6)], axis=1)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  # Not PyTorch's align_corners: the first output pixel is the first input pixel, the second
  # one is 3/4 of it plus 1/4 of the next one.
  np.testing.assert_allclose(out[0, :2], [0.0, 0.25], atol=1e-6)


@pytest.mark.parametrize('shape', [(2, 1, 5, 3), (1, 4, 7, 2), (1, 16, 8, 4)])
def test_upsample2x_equals_jax_image_resize(shape):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  batch, height, width, channels = shape
  resized = jax.image.resize(x, (batch, 2 * height, 2 * width, channels), 'bilinear')
  np.testing.assert_allclose(np.asarray(decoder_lib.upsample2x(jnp.asarray(x))),
                             np.asarray(resized), rtol=1e-6, atol=1e-6)
  bf16 = decoder_lib.upsample2x(jnp.asarray(x, jnp.bfloat16))
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), np.asarray(resized), rtol=2e-2,
                             atol=2e-2)


@pytest.mark.parametrize('features,num_groups,expected_groups', [(16, 32, 16), (16, 4, 4),
                                                                 (12, 8, 4)])
def test_conv_norm_relu_groupnorm_matches_hand_computation(features, num_groups,
                                                           expected_groups):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 4, features)).astype(np.float32)
  # A 3x3 kernel that is the identity at its centre: the conv passes x through.
  kernel = np.zeros((3, 3, features, features), np.float32)
  kernel[1, 1] = np.eye(features)
  scale = rng.normal(size=features).astype(np.float32)
  bias = rng.normal(size=features).astype(np.float32)
  params = {'conv': {'kernel': kernel}, 'gn': {'scale': scale, 'bias': bias}}
  out = decoder_lib.ConvNormReLU(features, num_groups).apply({'params': params}, x)

  g = x.astype(np.float64).reshape(2, 5, 4, expected_groups, features // expected_groups)
  normed = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(
      g.var(axis=(1, 2, 4), keepdims=True) + 1e-6)
  expected = np.maximum(normed.reshape(x.shape) * scale + bias, 0)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)


def test_sinusoidal_embedding_hand_values():
  emb = np.asarray(decoder_lib.sinusoidal_embedding(jnp.array([0.0, 2.0]), 4))
  # Frequencies 10000^(-k/2) for k = 0, 1: 1 and 0.01.
  np.testing.assert_allclose(emb[0], [0, 0, 1, 1], atol=1e-7)
  np.testing.assert_allclose(emb[1], [np.sin(2), np.sin(0.02), np.cos(2), np.cos(0.02)],
                             rtol=1e-6)


def _decoder_inputs(rng):
  x = rng.normal(size=(2, 2, 3, 8)).astype(np.float32)  # 1/16 of a 32x48 image.
  skips = (None, rng.normal(size=(2, 4, 6, 5)).astype(np.float32),
           rng.normal(size=(2, 8, 12, 3)).astype(np.float32), None, None)
  return x, skips


def test_decoder_stage_widths_and_skip_concatenation():
  x, skips = _decoder_inputs(np.random.default_rng(0))
  decoder = decoder_lib.Decoder(decoder_width=3, **TINY)
  out, variables = jax.eval_shape(lambda: decoder.init_with_output(jax.random.key(0), x, skips))
  params = variables['params']
  assert decoder.widths == (48, 24, 24, 24, 24)
  assert out.shape == (2, 32, 48, 24)
  # Input channels of each stage's first conv: previous width + skip channels.
  in_channels = [params[f'stage{i}']['conv0']['conv']['kernel'].shape[2] for i in range(5)]
  assert in_channels == [8, 48 + 5, 24 + 3, 24, 24]
  assert all(set(params[f'stage{i}']) == {'conv0', 'conv1'} for i in range(5))


def test_transunet_variant_has_single_conv_more_stage():
  x, skips = _decoder_inputs(np.random.default_rng(0))
  decoder = decoder_lib.Decoder(variant='transunet', base_widths=(512, 256, 128, 64, 16))
  out, variables = jax.eval_shape(lambda: decoder.init_with_output(jax.random.key(0), x, skips))
  params = variables['params']
  assert set(params['stage0']) == {'conv0'}
  assert params['stage0']['conv0']['conv']['kernel'].shape == (3, 3, 8, 512)
  assert params['stage4']['conv1']['conv']['kernel'].shape == (3, 3, 16, 16)
  assert out.shape == (2, 32, 48, 16)


def test_skip_resolution_mismatch_is_reported():
  x, skips = _decoder_inputs(np.random.default_rng(0))
  skips = (None, skips[2], skips[2], None, None)  # A 1/4 map where the 1/8 one belongs.
  decoder = decoder_lib.Decoder(**TINY)
  with pytest.raises(ValueError, match=r'stage1.*8x12.*4x6'):
    jax.eval_shape(lambda: decoder.init(jax.random.key(0), x, skips))


def test_noise_conditioning_requires_noise_level():
  x, skips = _decoder_inputs(np.random.default_rng(0))
  decoder = decoder_lib.Decoder(noise_conditioning=True, **TINY)
  with pytest.raises(ValueError, match=r'noise_level=gamma'):
    jax.eval_shape(lambda: decoder.init(jax.random.key(0), x, skips))
  with pytest.raises(ValueError, match=r'shape \[batch\] = \(2,\); got \(3,\)'):
    jax.eval_shape(lambda: decoder.init(jax.random.key(0), x, skips, noise_level=jnp.ones(3)))


def test_noise_conditioning_film_starts_as_identity_then_depends_on_gamma(random_params):
  x, skips = _decoder_inputs(np.random.default_rng(1))
  conditioned = decoder_lib.Decoder(noise_conditioning=True, **TINY)
  plain = decoder_lib.Decoder(**TINY)
  gammas = jnp.array([0.9, 0.95])
  params = random_params(conditioned, x, skips, noise_level=gammas)
  assert set(params['noise_embedding']) == {'dense0', 'dense1'}
  assert params['stage2']['conv1']['film']['kernel'].shape == (256, 2 * 8)

  zero_film = jax.tree_util.tree_map_with_path(
      lambda path, v: np.zeros_like(v) if 'film' in str(path) else v, params)
  plain_params = {k: {c: {n: m for n, m in conv.items() if n != 'film'}
                      for c, conv in stage.items()}
                  for k, stage in zero_film.items() if k != 'noise_embedding'}

  @jax.jit
  def run(params, gammas):
    return conditioned.apply({'params': params}, x, skips, noise_level=gammas)

  reference = plain.apply({'params': plain_params}, x, skips)
  np.testing.assert_allclose(np.asarray(run(zero_film, gammas)), np.asarray(reference),
                             rtol=1e-4, atol=1e-5)
  # With non-zero FiLM weights, the same image decodes differently at another gamma.
  out_a = np.asarray(run(params, gammas))
  out_b = np.asarray(run(params, gammas[::-1]))
  assert np.abs(out_a[0] - out_b[0]).max() > 1e-3
  np.testing.assert_allclose(out_a[0], np.asarray(run(params, jnp.array([0.9, 0.5])))[0],
                             rtol=1e-5, atol=1e-6)
