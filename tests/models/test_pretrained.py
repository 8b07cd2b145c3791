"""Tests for loading vision_transformer ImageNet-21k `.npz` checkpoints (fake ones, offline)."""

import collections

import flax
import numpy as np
import pytest

from ddep_jax import models
from ddep_jax import testing
from ddep_jax.models import pretrained

NUM_CLASSES = 10
# Released key -> (shape in the file, path in our tree) for the tiny preset with a 16-wide
# pre_logits, 10 classes, written at 64x64 (4x4 grid) with (1, 1, 1, C) GroupNorm params.
RELEASED_LAYOUT = {
    'conv_root/kernel': ((7, 7, 3, 32), 'encoder/conv_root/kernel'),
    'gn_root/scale': ((1, 1, 1, 32), 'encoder/gn_root/scale'),
    'block1/unit1/gn_proj/bias': ((1, 1, 1, 128), 'encoder/block1/unit1/gn_proj/bias'),
    'block3/unit1/conv2/kernel': ((3, 3, 128, 128), 'encoder/block3/unit1/conv2/kernel'),
    'embedding/kernel': ((1, 1, 512, 32), 'encoder/embedding/kernel'),
    'cls': ((1, 1, 32), 'encoder/cls'),
    'Transformer/encoderblock_0/LayerNorm_0/scale':
        ((32,), 'encoder/Transformer/encoderblock_0/LayerNorm_0/scale'),
    'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel':
        ((32, 2, 16),
         'encoder/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel'),
    'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel':
        ((2, 16, 32),
         'encoder/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel'),
    'Transformer/encoderblock_0/LayerNorm_2/bias':
        ((32,), 'encoder/Transformer/encoderblock_0/LayerNorm_1/bias'),
    'Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel':
        ((64, 32), 'encoder/Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel'),
    'Transformer/encoder_norm/scale': ((32,), 'encoder/Transformer/encoder_norm/scale'),
    'pre_logits/kernel': ((32, 16), 'head/pre_logits/kernel'),
    'head/kernel': ((16, 10), 'head/kernel'),
    'head/bias': ((10,), 'head/bias'),
}


def bilinear_align_corners_np(grid, out_h, out_w):
  """Bilinear interpolation with corner-aligned sampling (scipy.ndimage.zoom's grid), float64."""
  in_h, in_w = grid.shape[:2]
  out = np.zeros((out_h, out_w, grid.shape[-1]))
  for i in range(out_h):
    y = i * (in_h - 1) / (out_h - 1)
    y0 = min(int(np.floor(y)), in_h - 2)
    for j in range(out_w):
      x = j * (in_w - 1) / (out_w - 1)
      x0 = min(int(np.floor(x)), in_w - 2)
      fy, fx = y - y0, x - x0
      out[i, j] = ((1 - fy) * (1 - fx) * grid[y0, x0] + (1 - fy) * fx * grid[y0, x0 + 1]
                   + fy * (1 - fx) * grid[y0 + 1, x0] + fy * fx * grid[y0 + 1, x0 + 1])
  return out


def _config(**overrides):
  return models.get_config('tiny', representation_size=16, **overrides)


def _init(random_params, config, task, size, num_classes=NUM_CLASSES):
  model = models.build_model(config, task=task, num_classes=num_classes)
  return random_params(model, np.zeros((1, *size, 3), np.float32), train=False, seed=7)


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep='/')


@pytest.fixture(name='fake_npz')
def fake_npz_fixture(tmp_path):
  path = tmp_path / 'R50+ViT-tiny.npz'
  written = testing.write_fake_npz(str(path), _config(), NUM_CLASSES,
                                      np.random.default_rng(0), image_size=64,
                                      groupnorm_4d=True)
  return str(path), written


def test_fake_checkpoint_has_the_released_layout(fake_npz):
  path, written = fake_npz
  with np.load(path) as npz:
    stored = {k: npz[k].shape for k in npz.files}
  for key, (shape, _) in RELEASED_LAYOUT.items():
    assert stored[key] == shape, key
  assert stored['Transformer/posembed_input/pos_embedding'] == (1, 1 + 4 * 4, 32)
  # Pre-Linen names only inside the transformer layers.
  block_modules = {k.split('/')[2] for k in stored if k.startswith('Transformer/encoderblock_')}
  assert block_modules == {'LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2',
                           'MlpBlock_3'}
  assert set(written) == set(stored)


def test_round_trip_puts_every_value_where_it_belongs(fake_npz, random_params):
  path, written = fake_npz
  config = _config()
  init = _init(random_params, config, 'classify', (32, 48))
  loaded = _flat(pretrained.load_pretrained(init, path, config, drop_head=False,
                                            image_size=(32, 48)))
  assert set(loaded) == set(_flat(init))
  for key, (_, ours) in RELEASED_LAYOUT.items():
    np.testing.assert_array_equal(loaded[ours], written[key].reshape(loaded[ours].shape))
  # Nothing lost or duplicated: the multiset of values is the same, position embedding aside.
  posemb_key = 'Transformer/posembed_input/pos_embedding'
  as_bytes = lambda arrays: collections.Counter(np.ravel(a).tobytes() for a in arrays)  # noqa: E731
  assert as_bytes(v for k, v in loaded.items() if k != pretrained.POSEMB_PATH) == as_bytes(
      v for k, v in written.items() if k != posemb_key)
  # The 4x4 grid resampled to the 2x3 grid of a 32x48 input; the class slot kept in front.
  posemb = written[posemb_key]
  expected = bilinear_align_corners_np(posemb[0, 1:].reshape(4, 4, 32).astype(np.float64), 2, 3)
  got = loaded[pretrained.POSEMB_PATH]
  assert got.shape == (1, 1 + 6, 32)
  np.testing.assert_array_equal(got[0, 0], posemb[0, 0])
  np.testing.assert_allclose(got[0, 1:], expected.reshape(6, 32), rtol=1e-5, atol=1e-6)


def test_groupnorm_params_load_from_both_file_layouts(tmp_path, random_params):
  path = str(tmp_path / 'linen_layout.npz')
  written = testing.write_fake_npz(path, _config(), NUM_CLASSES, np.random.default_rng(1),
                                      image_size=32, groupnorm_4d=False)
  assert written['gn_root/scale'].shape == (32,)
  init = _init(random_params, _config(), 'classify', (32, 32))
  loaded = pretrained.load_pretrained(init, path, drop_head=False)
  np.testing.assert_array_equal(loaded['encoder']['gn_root']['scale'], written['gn_root/scale'])
  # Same grid: the position embedding is taken as stored.
  np.testing.assert_array_equal(
      loaded['encoder']['Transformer']['posembed_input']['pos_embedding'],
      written['Transformer/posembed_input/pos_embedding'])


@pytest.mark.parametrize('keep_class_token', [True, False])
def test_resample_posemb_matches_explicit_bilinear(keep_class_token):
  posemb = np.random.default_rng(0).normal(size=(1, 1 + 3 * 3, 5)).astype(np.float32)
  out = pretrained.resample_posemb(posemb, (5, 7), has_class_token=True,
                                   keep_class_token=keep_class_token)
  expected = bilinear_align_corners_np(posemb[0, 1:].reshape(3, 3, 5).astype(np.float64), 5, 7)
  grid = out[0, int(keep_class_token):]
  assert out.shape == (1, int(keep_class_token) + 35, 5)
  np.testing.assert_allclose(grid, expected.reshape(35, 5), rtol=1e-5, atol=1e-6)
  if keep_class_token:
    np.testing.assert_array_equal(out[0, 0], posemb[0, 0])
  # Corners are copied exactly (corner-aligned, as vision_transformer's zoom(order=1)).
  np.testing.assert_allclose(grid[[0, 6, 28, 34]], posemb[0, [1, 3, 7, 9]], rtol=1e-6)


def test_model_without_class_token_drops_cls_and_its_slot(fake_npz, random_params):
  path, written = fake_npz
  config = _config(classifier='none')
  init = _init(random_params, config, 'segment', (64, 64), num_classes=3)
  loaded = pretrained.load_pretrained(init, path, config, drop_head=True)
  assert 'cls' not in loaded['encoder']
  np.testing.assert_array_equal(loaded['encoder']['Transformer']['posembed_input']['pos_embedding'],
                                written['Transformer/posembed_input/pos_embedding'][:, 1:])


def test_drop_head_keeps_fresh_head_and_decoder(fake_npz, random_params):
  path, written = fake_npz
  config = _config()
  init = _init(random_params, config, 'segment', (64, 64), num_classes=3)
  with pytest.raises(TypeError, match='drop_head'):
    pretrained.load_pretrained(init, path, config)  # pylint: disable=missing-kwoa
  loaded = pretrained.load_pretrained(init, path, config, drop_head=True)
  for section in ('head', 'decoder'):
    for (ka, a), (kb, b) in zip(_flat(loaded[section]).items(), _flat(init[section]).items()):
      assert ka == kb
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(loaded['encoder']['embedding']['kernel'],
                                written['embedding/kernel'])


def test_loading_the_classifier_into_a_dense_model_is_an_error(fake_npz, random_params):
  path, _ = fake_npz
  init = _init(random_params, _config(), 'segment', (64, 64), num_classes=3)
  with pytest.raises(ValueError) as error:
    pretrained.load_pretrained(init, path, drop_head=False)
  message = str(error.value)
  assert path in message
  assert 'in checkpoint but not in model: head/pre_logits/kernel (32, 16)' in message
  assert 'shape mismatch: head/kernel: checkpoint (16, 10) vs model (1, 1, 8, 3)' in message
  assert 'pass drop_head=True' in message


def test_every_missing_unexpected_and_mismatched_path_is_named(fake_npz, tmp_path,
                                                               random_params):
  path, written = fake_npz
  broken = dict(written)
  del broken['block2/unit1/conv1/kernel']
  del broken['Transformer/encoder_norm/bias']
  broken['block9/unit1/conv1/kernel'] = np.zeros((1, 1, 8, 8), np.float32)
  broken['embedding/bias'] = np.zeros((31,), np.float32)
  broken_path = str(tmp_path / 'broken.npz')
  np.savez(broken_path, **broken)
  init = _init(random_params, _config(), 'classify', (64, 64))
  with pytest.raises(ValueError) as error:
    pretrained.load_pretrained(init, broken_path, drop_head=False)
  message = str(error.value)
  assert 'in checkpoint but not in model: encoder/block9/unit1/conv1/kernel (1, 1, 8, 8)' in message
  assert 'in model but not in checkpoint: encoder/block2/unit1/conv1/kernel (1, 1, 128, 64)' in (
      message)
  assert 'in model but not in checkpoint: encoder/Transformer/encoder_norm/bias (32,)' in message
  assert 'shape mismatch: encoder/embedding/bias: checkpoint (31,) vs model (32,)' in message
  assert 'drop_head' not in message  # The head fits; no hint about it.


def test_drop_head_false_needs_a_head_in_the_checkpoint(fake_npz, tmp_path, random_params):
  _, written = fake_npz
  headless = {k: v for k, v in written.items() if not k.startswith(('head/', 'pre_logits/'))}
  headless_path = str(tmp_path / 'headless.npz')
  np.savez(headless_path, **headless)
  init = _init(random_params, _config(), 'classify', (64, 64))
  with pytest.raises(ValueError, match=r'in model but not in checkpoint: head/bias \(10,\)'):
    pretrained.load_pretrained(init, headless_path, drop_head=False)
  loaded = pretrained.load_pretrained(init, headless_path, drop_head=True)
  np.testing.assert_array_equal(loaded['head']['kernel'], init['head']['kernel'])


def test_non_square_grid_needs_image_size(fake_npz, random_params):
  path, _ = fake_npz
  init = _init(random_params, _config(), 'classify', (32, 48))
  with pytest.raises(ValueError, match=r'grid of 6 tokens is not square; pass image_size=\(H, W\)'):
    pretrained.load_pretrained(init, path, drop_head=False)


def test_missing_file_says_where_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'not found: .*nowhere.npz.*gs://vit_models'):
    pretrained.read_npz(str(tmp_path / 'nowhere.npz'))


def test_stride_4_hybrid_loads_its_layout_and_names_what_a_stride_16_file_has_more(
    fake_npz, tmp_path, random_params):
  config = _config(output_stride=4)
  path = str(tmp_path / 'stride4.npz')
  written = testing.write_fake_npz(path, config, NUM_CLASSES, np.random.default_rng(2),
                                      image_size=32)
  init = _init(random_params, config, 'segment', (32, 32))
  loaded = _flat(pretrained.load_pretrained(init, path, drop_head=True))
  for key in ('block1/unit1/conv1/kernel', 'embedding/kernel',
              'Transformer/posembed_input/pos_embedding'):
    np.testing.assert_array_equal(loaded[f'encoder/{key}'], written[key])
  assert 'encoder/block2/unit1/conv1/kernel' not in loaded
  np.testing.assert_array_equal(loaded['decoder/stage2/conv1/conv/kernel'],
                                _flat(init)['decoder/stage2/conv1/conv/kernel'])
  # The R50 file (3 stages, 1/16) does not fit a 1-stage hybrid: every extra stage is named.
  with pytest.raises(ValueError) as error:
    pretrained.load_pretrained(init, fake_npz[0], drop_head=True)
  message = str(error.value)
  assert 'in checkpoint but not in model: encoder/block2/unit1/conv1/kernel' in message
  assert 'in checkpoint but not in model: encoder/block3/unit1/conv1/kernel' in message
  assert ('shape mismatch: encoder/embedding/kernel: checkpoint (1, 1, 512, 32) vs model '
          '(1, 1, 128, 32)') in message
