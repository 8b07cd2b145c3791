"""Tests for TransUNets of output stride 4, 8 and 16: the decoder follows the encoder's stride.

The paper's stride-16 presets must stay what they were: their parameter trees are compared with
digests taken before the decoder learnt other strides, and the tiny model's outputs bitwise with
a frozen copy of the five-stage decoder of that time.
"""

import hashlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddep_jax import models
from ddep_jax.models import decoder as decoder_lib

# sha256 (first 16 hex digits) of the sorted 'path:shape' lines of each model's parameters,
# 19 classes, computed with the code of commit 5da8f09 (stride 16 only).
PARAMETER_TREE_DIGESTS = [
    ('R50+ViT-B_16', 'segment', (224, 224), {'decoder_width': 1}, '9dc08ce8a46717af'),
    ('R50+ViT-B_16', 'segment', (224, 224), {'decoder_width': 2}, '9087355bdde49165'),
    ('R50+ViT-B_16', 'segment', (224, 224), {'decoder_width': 3}, '11a5eba99f6e6cb0'),
    ('R50+ViT-B_16', 'denoise', (224, 224), {'noise_conditioning': True}, '1ee31d1f93698948'),
    ('R50+ViT-B_16-TransUNet', 'segment', (224, 224), {}, 'dd105d47746d3198'),
    ('ViT-B_16', 'segment', (224, 224), {}, '8e7884fdbc5bf4cc'),
    ('R50-UNet', 'denoise', (224, 224), {}, 'd50e2c57e4a93099'),
    ('tiny', 'segment', (32, 32), {}, '80e29cb07dc0ceeb'),
    ('tiny-R50-UNet', 'denoise', (32, 32), {}, 'be0c95bc18ff26cb'),
]


def _build(name='tiny', task='segment', num_classes=5, **overrides):
  return models.build_model(models.get_config(name, **overrides), task=task,
                            num_classes=None if task == 'denoise' else num_classes)


def _images(size=(32, 48), batch=2, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, *size, 3)).astype(np.float32)


@pytest.mark.parametrize('name,task,size,overrides,digest', PARAMETER_TREE_DIGESTS)
def test_paper_presets_keep_their_parameter_trees(name, task, size, overrides, digest):
  model = _build(name, task, num_classes=19, **overrides)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *size, 3)),
                                             train=False, noise_level=jnp.ones(1)))['params']
  lines = sorted(f'{jax.tree_util.keystr(path)}:{tuple(x.shape)}'
                 for path, x in jax.tree_util.tree_leaves_with_path(shapes))
  assert hashlib.sha256('\n'.join(lines).encode()).hexdigest()[:16] == digest


# -- A frozen copy of the stride-16 decoder before strides 4 and 8 (ConvNormReLU, NoiseEmbedding
# and upsample2x are unchanged and shared) --------------------------------------------------------


class _FrozenStage(nn.Module):
  features: int
  num_convs: int
  upsample: bool
  num_groups: int

  @nn.compact
  def __call__(self, x, skip, noise_emb):
    if self.upsample:
      x = decoder_lib.upsample2x(x)
    if skip is not None:
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
    for j in range(self.num_convs):
      x = decoder_lib.ConvNormReLU(self.features, self.num_groups, name=f'conv{j}')(x, noise_emb)
    return x


class _FrozenDecoder(nn.Module):
  variant: str
  widths: tuple[int, ...]
  noise_conditioning: bool
  num_groups: int

  @nn.compact
  def __call__(self, x, skips, *, noise_level=None):
    assert len(self.widths) == len(skips) == 5
    noise_emb = None
    if self.noise_conditioning:
      noise_level = jnp.broadcast_to(jnp.asarray(noise_level, jnp.float32), (x.shape[0],))
      noise_emb = decoder_lib.NoiseEmbedding(name='noise_embedding')(noise_level)
    for i, (features, skip) in enumerate(zip(self.widths, skips)):
      num_convs = 1 if (i == 0 and self.variant == 'transunet') else 2
      x = _FrozenStage(features, num_convs, i > 0 or skip is not None, self.num_groups,
                       name=f'stage{i}')(x, skip, noise_emb)
    return x


class _FrozenUNet(nn.Module):
  encoder: nn.Module
  decoder: nn.Module
  head: nn.Module

  def __call__(self, images, *, noise_level=None):
    x, _, aux = self.encoder(images, train=False)
    skips = (None, aux.get('block2'), aux.get('block1'), aux.get('stem'), None)  # Then fixed.
    return self.head(self.decoder(x, skips, noise_level=noise_level))


@pytest.mark.parametrize('task,overrides', [
    ('segment', {}),
    ('denoise', {'noise_conditioning': True}),
    ('segment', {'variant': 'transunet'}),
    ('segment', {'encoder': {'resnet': {'num_layers': ()}}, 'patch_size': (16, 16)}),
])
def test_stride_16_outputs_equal_the_frozen_decoder_bitwise(random_params, task, overrides):
  model = _build('tiny', task, **overrides)
  dec = model.decoder
  frozen = _FrozenUNet(model.encoder, _FrozenDecoder(dec.variant, dec.widths,
                                                     dec.noise_conditioning, dec.num_groups),
                       model.head)
  images, gammas = _images(), jnp.array([0.9, 0.5])
  params = random_params(model, images, train=False, noise_level=gammas)
  # One jitted program each (op-by-op dispatch is slower here); same HLO, same bits.
  out = jax.jit(lambda p: model.apply({'params': p}, images, train=False,
                                      noise_level=gammas)[0])(params)
  reference = jax.jit(lambda p: frozen.apply({'params': p}, images, noise_level=gammas))(params)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(reference))


# -- Strides 4 and 8 ------------------------------------------------------------------------------

# stride -> (ResNet stages kept from 'tiny', the encoder features feeding stages 0 ... n-1).
STRIDES = {4: ((1,), (None, 'stem', None)), 8: ((1, 1), (None, 'block1', 'stem', None))}


@pytest.mark.parametrize('stride', [4, 8])
def test_output_stride_preset_shortens_encoder_and_decoder(stride):
  config = models.get_config('tiny', output_stride=stride)
  num_layers, skip_names = STRIDES[stride]
  assert tuple(config.encoder.resnet.num_layers) == num_layers
  assert tuple(config.decoder.base_widths) == (32, 16, 16, 8, 8)[-len(skip_names):]
  model = models.build_model(config, task='segment', num_classes=5)
  assert model.encoder.output_stride == stride
  assert model.encoder.decoder_scales == tuple(stride >> i for i in range(len(skip_names)))

  (out, aux), variables = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, 32, 48, 3)), train=False))
  assert out.shape == (2, 32, 48, 5) and aux['decoder'].shape == (2, 32, 48, 8)
  assert aux['tokens'].shape == (2, 1 + (32 // stride) * (48 // stride), 32)
  decoder = variables['params']['decoder']
  assert sorted(decoder) == [f'stage{i}' for i in range(len(skip_names))]
  # Each stage's first conv reads the previous stage (the token map for stage 0) and its skip.
  widths = config.decoder.base_widths
  in_channels = [decoder[f'stage{i}']['conv0']['conv']['kernel'].shape[2]
                 for i in range(len(skip_names))]
  skip_channels = [aux[name].shape[-1] if name else 0 for name in skip_names]
  assert in_channels == [32] + [w + s for w, s in zip(widths[:-1], skip_channels[1:])]

  # Pure ViTs: 4x4 or 8x8 patches, no skips.
  denoise = models.build_model(config, task='denoise')
  out = jax.eval_shape(lambda: denoise.init_with_output(
      jax.random.key(0), jnp.zeros((2, 32, 48, 3)), train=False))[0][0]
  assert out.shape == (2, 32, 48, 3)

  vit = models.get_config('ViT-B_16', output_stride=stride)
  assert tuple(vit.encoder.patch_size) == (stride, stride)
  assert models.build_model(vit, task='denoise').encoder.output_stride == stride


@pytest.mark.parametrize('stride', [4, 8])
def test_every_skip_reaches_the_output(random_params, stride):
  model = _build('tiny', output_stride=stride)
  images = _images()
  params = random_params(model, images, train=False)
  x, skips, aux = model.encoder.apply({'params': params['encoder']}, images, train=False)
  _, skip_names = STRIDES[stride]
  assert x.shape == (2, 32 // stride, 48 // stride, 32)
  assert all((skip is None) == (name is None) for skip, name in zip(skips, skip_names))
  for skip, name in zip(skips, skip_names):
    if name:
      np.testing.assert_array_equal(np.asarray(skip), np.asarray(aux[name]))

  decode = jax.jit(lambda skips: model.decoder.apply({'params': params['decoder']}, x, skips))
  reference = np.asarray(decode(skips))
  assert reference.shape == (2, 32, 48, 8)
  for i, skip in enumerate(skips):
    if skip is not None:
      changed = skips[:i] + (skip + 1.0,) + skips[i + 1:]
      assert np.abs(np.asarray(decode(changed)) - reference).max() > 1e-3, skip_names[i]


# One compile per case on a busy CPU: stride 4 with the (noise-conditioned) denoising head, stride 8
# with the segmentation head; both heads at both strides are shaped in the test above.
@pytest.mark.parametrize('stride,task', [(4, 'denoise'), (8, 'segment')])
def test_gradients_reach_every_parameter(random_params, stride, task):
  overrides = {'noise_conditioning': True} if task == 'denoise' else {}
  model = _build('tiny', task, output_stride=stride, **overrides)
  images, gammas = _images(), jnp.array([0.9, 0.3])
  params = random_params(model, images, train=False, noise_level=gammas)
  out_channels = 3 if task == 'denoise' else 5
  weights = np.random.default_rng(1).normal(size=(2, 32, 48, out_channels)).astype(np.float32)

  def loss(params):
    out, _ = model.apply({'params': params}, images, train=False, noise_level=gammas)
    assert out.shape == (2, 32, 48, out_channels) and out.dtype == jnp.float32
    return jnp.sum(out * weights)

  grads = jax.jit(jax.grad(loss))(params)
  dead = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(np.asarray(g))]
  assert not dead
  if task == 'denoise':
    assert 'noise_embedding' in grads['decoder']


# -- Configuration errors -------------------------------------------------------------------------


@pytest.mark.parametrize('overrides,match', [
    (dict(encoder={'resnet': {'num_layers': (1, 1, 1, 1)}}),
     r'output stride \(4, 8, 16\), but this encoder has output stride 32 '
     r'\(model.encoder.resnet.num_layers=\(1, 1, 1, 1\), patch_size=\(1, 1\)\); with patch '
     r'\(1, 1\) use 1, 2 or 3 ResNet stages'),
    (dict(encoder={'resnet': {'num_layers': ()}}, patch_size=(12, 12)),
     r'has output stride 12 .*or no ResNet with patch \(4, 4\), \(8, 8\) or \(16, 16\)'),
    (dict(encoder={'resnet': {'num_layers': ()}}, patch_size=(2, 2)), r'has output stride 2 '),
    (dict(encoder={'resnet': {'num_layers': (1,)}}),
     r'model.decoder.base_widths=\(32, 16, 16, 8, 8\) has 5 widths, but the encoder feeds 3 '
     r'decoder stages \(1/4, 1/2, 1/1: one at 1/4, the encoder output, then one per x2 '
     r'upsampling\)\. Set model.decoder.base_widths to one width per stage, e.g. \(16, 8, 8\)'),
    (dict(output_stride=8, base_widths=(16, 8, 8)),
     r'base_widths=\(16, 8, 8\) has 3 widths, but the encoder feeds 4 decoder stages '
     r'\(1/8, 1/4, 1/2, 1/1: .* e.g. \(512, 256, 128, 64\)'),
])
def test_mismatched_encoder_and_decoder_are_config_errors(overrides, match):
  config = models.get_config('tiny', **overrides)
  with pytest.raises(ValueError, match=match):
    models.build_model(config, task='segment', num_classes=3)
  models.build_model(config, task='classify', num_classes=3)  # The encoder alone is fine.


def test_output_stride_argument_errors():
  with pytest.raises(ValueError, match=r'output_stride=...\) must be 16, 8 or 4; got 2'):
    models.get_config('tiny', output_stride=2)
  with pytest.raises(ValueError, match=r"get_config\('R50-UNet', output_stride=8\): the "
                                       r'ResNet-50 U-Net'):
    models.get_config('R50-UNet', output_stride=8)


def test_decoder_needs_one_width_per_skip():
  decoder = decoder_lib.Decoder(base_widths=(16, 8, 8, 8), num_groups=4)
  x = jnp.zeros((1, 4, 4, 8))
  with pytest.raises(ValueError, match=r'has 4 widths, but the encoder feeds 3 decoder stages '
                                       r'\(1/4, 1/2, 1/1: .*e.g. \(8, 8, 8\)'):
    jax.eval_shape(lambda: decoder.init(jax.random.key(0), x, (None, None, None)))
  out = jax.eval_shape(lambda: decoder.init_with_output(jax.random.key(0), x,
                                                        (None, None, None, None)))[0]
  assert out.shape == (1, 32, 32, 8)


def test_full_size_hybrid_at_stride_8_and_4_shapes():
  for stride, num_layers, widths in ((8, (3, 4), (512, 256, 128, 64)),
                                     (4, (3,), (256, 128, 64))):
    config = models.get_config('R50+ViT-Ti_16', output_stride=stride, decoder_width=2)
    assert tuple(config.encoder.resnet.num_layers) == num_layers
    model = models.build_model(config, task='segment', num_classes=19)
    (out, aux), variables = jax.eval_shape(lambda m=model: m.init_with_output(
        jax.random.key(0), jnp.zeros((1, 64, 96, 3)), train=False))
    assert out.shape == (1, 64, 96, 19)
    assert aux['tokens'].shape == (1, 1 + (64 // stride) * (96 // stride), 192)
    assert model.decoder.widths == tuple(2 * w for w in widths)
    assert 'block3' not in variables['params']['encoder']
