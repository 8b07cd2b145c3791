"""Tests for the weight-standardised GroupNorm ResNet against hand computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddep_jax.models import resnet


def _standardize_np(kernel):
  """(w - mean) / (std + 1e-5) per output channel, in float64."""
  kernel = np.asarray(kernel, np.float64)
  mean = kernel.mean(axis=(0, 1, 2), keepdims=True)
  std = np.sqrt(((kernel - mean) ** 2).mean(axis=(0, 1, 2), keepdims=True))
  return (kernel - mean) / (std + 1e-5)


def test_weight_standardize_matches_hand_computation():
  kernel = np.arange(2 * 2 * 3 * 2, dtype=np.float32).reshape(2, 2, 3, 2) ** 1.5
  out = np.asarray(resnet.weight_standardize(jnp.asarray(kernel)))
  np.testing.assert_allclose(out, _standardize_np(kernel), rtol=1e-5, atol=1e-6)
  # Each output channel has zero mean and unit (population) std, up to the 1e-5 epsilon.
  np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0, atol=1e-6)
  np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1, atol=1e-4)
  # Hand-computed: channel 0 holds 0^1.5, 2^1.5, ..., 22^1.5; its first entry is -mean/std.
  channel = np.arange(0, 24, 2) ** 1.5
  np.testing.assert_allclose(out[0, 0, 0, 0], -channel.mean() / (channel.std() + 1e-5), rtol=1e-5)


class _Stem(nn.Module):
  """Only the root of `resnet_features` (no stages): conv_root -> gn_root -> ReLU."""

  @nn.compact
  def __call__(self, x):
    return resnet.resnet_features(x, num_layers=(), width_factor=1.0, dtype=jnp.float32,
                                  remat=False)['stem']


def _same_conv_np(x, kernel, stride):
  """SAME-padded strided conv in float64 by explicit loops (TF/XLA padding: extra pad after)."""
  _, height, width, _ = x.shape
  k = kernel.shape[0]
  out_h, out_w = -(-height // stride), -(-width // stride)
  pad_h = max((out_h - 1) * stride + k - height, 0)
  pad_w = max((out_w - 1) * stride + k - width, 0)
  x = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                 (0, 0)))
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
  for i in range(out_h):
    for j in range(out_w):
      patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
      out[:, i, j] = np.einsum('bhwc,hwco->bo', patch, kernel)
  return out


def _group_norm_np(x, scale, bias, groups, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


def test_stem_is_std_conv_same_padding_and_groupnorm_32(random_params):
  # A non-square 9x6 input makes SAME padding asymmetric (7x7/2: pad 2 before, 3 after on H).
  images = np.random.default_rng(1).uniform(-1, 1, (2, 9, 6, 3)).astype(np.float32)
  params = random_params(_Stem(), images)
  out = np.asarray(_Stem().apply({'params': params}, images))

  kernel = _standardize_np(params['conv_root']['kernel'])
  expected = _same_conv_np(images.astype(np.float64), kernel, stride=2)
  expected = _group_norm_np(expected, params['gn_root']['scale'], params['gn_root']['bias'],
                            groups=32)
  expected = np.maximum(expected, 0)
  assert out.shape == (2, 5, 3, 64)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_residual_unit_projection_only_when_shape_changes():
  x = jnp.zeros((1, 8, 8, 128))
  def shapes(unit):
    return jax.eval_shape(lambda: unit.init(jax.random.key(0), x))['params']

  same = shapes(resnet.ResidualUnit(32))
  strided = shapes(resnet.ResidualUnit(32, strides=(2, 2)))
  widened = shapes(resnet.ResidualUnit(64))
  assert 'conv_proj' not in same and 'gn_proj' not in same
  assert strided['conv_proj']['kernel'].shape == (1, 1, 128, 128)
  assert widened['conv_proj']['kernel'].shape == (1, 1, 128, 256)
  assert widened['conv2']['kernel'].shape == (3, 3, 64, 64)
  # No bias on standardised convs: GroupNorm follows each of them.
  assert set(same['conv1']) == {'kernel'}


def test_resnet_encoder_rejects_sizes_not_divisible_by_32():
  encoder = resnet.ResNetEncoder(num_layers=(1, 1, 1, 1), width_factor=0.5)
  with pytest.raises(ValueError, match=r'multiples of 32.*got 48x64.*64x64'):
    jax.eval_shape(lambda: encoder.init(jax.random.key(0), jnp.zeros((1, 48, 64, 3)),
                                        train=False))
