"""Tests for ddep_jax.data.preprocessing: label mapping, crops, rescale, flips, eval padding."""

import numpy as np
import pytest
import tensorflow as tf

from ddep_jax.data import datasets
from ddep_jax.data import preprocessing


def _seed(i):
  return tf.constant([i, 17], tf.int64)


def test_map_labels_cityscapes_counts_unexpected_values():
  table = datasets.get_spec('cityscapes').label_table
  # 0 (unlabeled) is a void class: ignored, not counted. 40 and 34 are not label ids: counted.
  # -1 is crop padding: ignored, not counted.
  mask = tf.constant([[7, 8, 0, 33], [26, 40, 255, 34], [-1, -1, 24, 11]])[..., None]
  labels = preprocessing.map_labels(mask, table)
  np.testing.assert_array_equal(labels, [[0, 1, 255, 18], [13, 255, 255, 255], [255, 255, 11, 2]])
  assert int(preprocessing.count_unexpected_labels(mask, table)) == 2


def test_map_labels_ade20k_reduces_zero_label():
  mask = tf.constant([[0, 1, 150, 151], [151, 151, 200, 255]], tf.uint8)
  table = datasets.get_spec('ade20k').label_table
  np.testing.assert_array_equal(preprocessing.map_labels(mask, table),
                                [[255, 0, 149, 255], [255, 255, 255, 255]])
  assert int(preprocessing.count_unexpected_labels(mask, table)) == 4


def test_rescale_crop_flip_at_scale_one_is_slicing_and_flip_reverses():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (6, 8, 3), np.uint8)
  mask = rng.integers(0, 20, (6, 8, 1)).astype(np.uint8)
  for flip in (False, True):
    out_image, out_mask = preprocessing.rescale_crop_flip(
        image, mask, scale=1.0, offset=[1, 2], crop_size=(4, 5), flip=flip)
    want_image, want_mask = image[1:5, 2:7], mask[1:5, 2:7]
    if flip:
      want_image, want_mask = want_image[:, ::-1], want_mask[:, ::-1]
    np.testing.assert_allclose(out_image, want_image, atol=0.01)
    np.testing.assert_array_equal(out_mask, want_mask)


def test_rescale_crop_flip_pads_beyond_the_image_and_flip_moves_padding_left():
  image = np.full((6, 8, 3), 200, np.uint8)
  mask = np.full((6, 8, 1), 3, np.uint8)
  out_image, out_mask = preprocessing.rescale_crop_flip(
      image, mask, scale=1.0, offset=[0, 0], crop_size=(8, 10), flip=False)
  out_mask = np.asarray(out_mask)[..., 0]
  assert (out_mask[:6, :8] == 3).all() and (out_mask[6:] == -1).all()
  assert (out_mask[:, 8:] == -1).all()
  np.testing.assert_allclose(np.asarray(out_image)[6:], preprocessing.IMAGE_PAD_VALUE)
  np.testing.assert_allclose(np.asarray(out_image)[:6, :8], 200, atol=0.1)
  _, flipped = preprocessing.rescale_crop_flip(image, mask, scale=1.0, offset=[0, 0],
                                               crop_size=(8, 10), flip=True)
  flipped = np.asarray(flipped)[..., 0]
  assert (flipped[:6, :2] == -1).all() and (flipped[:6, 2:] == 3).all()
  # After label mapping the padding is ignore (255) and not counted as unexpected.
  table = datasets.get_spec('voc2012').label_table
  labels = preprocessing.map_labels(flipped[..., None], table)
  assert (np.asarray(labels)[6:] == 255).all() and (np.asarray(labels)[:6, 2:] == 3).all()
  assert int(preprocessing.count_unexpected_labels(flipped, table)) == 0


def test_rescale_up_and_down_hand_computed():
  # Rows hold 0, 100, 200 (image) and 1, 2, 3 (mask). Scale 5/3: 5 rows sampled with aligned
  # corners at 0, 0.5, 1, 1.5, 2 (a hair below, by the edge margin): bilinear 0, 50, ..., 200;
  # nearest rounds the ties 0.5 and 1.5 down.
  image = np.repeat(np.array([0, 100, 200], np.uint8)[:, None, None], 3, axis=1)
  image = np.repeat(image, 3, axis=2)
  mask = np.repeat(np.array([1, 2, 3], np.uint8)[:, None, None], 3, axis=1)
  up_image, up_mask = preprocessing.rescale_crop_flip(
      image, mask, scale=5 / 3, offset=[0, 0], crop_size=(5, 5), flip=False)
  np.testing.assert_allclose(np.asarray(up_image)[:, 0, 0], [0, 50, 100, 150, 200], atol=0.2)
  np.testing.assert_array_equal(np.asarray(up_mask)[:, 0, 0], [1, 1, 2, 2, 3])
  # Scale 1/2 of 8 rows (values 10 r, mask r): 4 rows at 0, 7/3, 14/3, 7.
  image = np.repeat(np.repeat((10 * np.arange(8, dtype=np.uint8))[:, None, None], 2, 1), 3, 2)
  mask = np.repeat(np.arange(8, dtype=np.uint8)[:, None, None], 2, 1)
  down_image, down_mask = preprocessing.rescale_crop_flip(
      image, mask, scale=0.5, offset=[0, 0], crop_size=(4, 1), flip=False)
  np.testing.assert_allclose(np.asarray(down_image)[:, 0, 0], [0, 70 / 3, 140 / 3, 70],
                             atol=0.05)
  np.testing.assert_array_equal(np.asarray(down_mask)[:, 0, 0], [0, 2, 5, 7])


def test_random_rescale_crop_flip_keeps_image_and_mask_aligned():
  rng = np.random.default_rng(1)
  blocks = rng.integers(0, 10, (5, 7))
  mask = np.kron(blocks, np.ones((4, 4), np.int64)).astype(np.uint8)[..., None]  # 20 x 28
  image = np.repeat(25 * mask, 3, axis=2)
  scales, checked = set(), 0
  for i in range(6):
    out_image, out_mask = preprocessing.random_rescale_crop_flip(
        image, mask, _seed(i), crop_size=(16, 16), scale_range=(0.5, 2.0))
    again_image, again_mask = preprocessing.random_rescale_crop_flip(
        image, mask, _seed(i), crop_size=(16, 16), scale_range=(0.5, 2.0))
    np.testing.assert_array_equal(out_image, again_image)  # Stateless: same seed, same crop.
    np.testing.assert_array_equal(out_mask, again_mask)
    red, m = np.asarray(out_image)[..., 0], np.asarray(out_mask)[..., 0]
    scales.add(int((m == -1).sum()))
    np.testing.assert_allclose(red[m == -1], preprocessing.IMAGE_PAD_VALUE)
    # Where the mask is constant on a 3x3 neighbourhood, bilinear mixes only that block.
    for y in range(1, 15):
      for x in range(1, 15):
        window = m[y - 1:y + 2, x - 1:x + 2]
        if (window == m[y, x]).all() and m[y, x] >= 0:
          assert abs(red[y, x] - 25 * m[y, x]) < 1.0, (i, y, x)
          checked += 1
  assert checked > 300
  assert len(scales) > 1  # Different seeds give different rescales / crops.


def test_inception_crop_full_area_is_a_resize_and_flip_is_random():
  image = np.random.default_rng(2).integers(0, 256, (12, 16, 3)).astype(np.uint8)
  whole = tf.image.resize(image, (8, 8), method='bilinear').numpy()
  out = preprocessing.inception_crop_flip(image, _seed(0), crop_size=(8, 8),
                                          area_range=(1.0, 1.0), flip=False)
  np.testing.assert_allclose(out, whole, atol=1e-4)
  flips = []
  for i in range(8):
    out = preprocessing.inception_crop_flip(image, _seed(i), crop_size=(8, 8),
                                            area_range=(1.0, 1.0), flip=True).numpy()
    flips.append(not np.allclose(out, whole, atol=1e-4))
    if flips[-1]:
      np.testing.assert_allclose(out, whole[:, ::-1], atol=1e-4)
  assert any(flips) and not all(flips)


def test_inception_crop_area_is_within_range():
  # A linear ramp: the crop's span of values tells its width.
  image = np.repeat(np.repeat(np.arange(100, dtype=np.float32)[None, :, None], 100, 0), 3, 2)
  for i in range(5):
    out = preprocessing.inception_crop_flip(image, _seed(i), crop_size=(10, 10),
                                            area_range=(0.25, 0.36), flip=False).numpy()
    width = out[0, -1, 0] - out[0, 0, 0]
    # Side ~ sqrt(area) * 100 * sqrt(aspect), aspect in [3/4, 4/3]; minus the resample margin.
    assert 0.5 * np.sqrt(0.75) * 100 - 10 <= width <= 0.6 * np.sqrt(4 / 3) * 100, width


def test_normalize_image_range():
  np.testing.assert_allclose(preprocessing.normalize_image(tf.constant([0, 255], tf.uint8)),
                             [-1.0, 1.0])


def test_eval_size_short_side_and_fixed():
  assert preprocessing.eval_size([300, 400], 512).numpy().tolist() == [512, 683]
  assert preprocessing.eval_size([400, 300], 512).numpy().tolist() == [683, 512]
  assert preprocessing.eval_size([400, 300], (64, 32)).numpy().tolist() == [64, 32]
  assert preprocessing.eval_size([400, 300], None).numpy().tolist() == [400, 300]


@pytest.mark.parametrize('encode', [tf.io.encode_png, tf.io.encode_jpeg])
def test_encoded_image_size_from_header(encode):
  data = encode(tf.zeros([13, 21, 3], tf.uint8))
  assert preprocessing.encoded_image_size(data).numpy().tolist() == [13, 21]


def test_pad_to_size_values():
  image = tf.fill([2, 3, 3], 0.5)
  labels = tf.constant([[1, 2, 3], [4, 5, 6]])
  padded_image, padded_labels = preprocessing.pad_to_size(image, labels, (3, 4))
  np.testing.assert_array_equal(padded_labels, [[1, 2, 3, 255], [4, 5, 6, 255],
                                                [255, 255, 255, 255]])
  assert float(tf.reduce_sum(padded_image)) == pytest.approx(0.5 * 18)


def test_example_seed_depends_on_seed_epoch_and_key():
  base = preprocessing.example_seed(0, 0, 'a').numpy()
  np.testing.assert_array_equal(base, preprocessing.example_seed(0, 0, 'a').numpy())
  for other in (preprocessing.example_seed(1, 0, 'a'), preprocessing.example_seed(0, 1, 'a'),
                preprocessing.example_seed(0, 0, 'b')):
    assert not np.array_equal(base, other.numpy())



def _crop_scales(size_hw, reference_size, seeds, crop=(24, 48)):
  """Rescale factor (rescaled / stored width) behind each seed's train crop.

  The image is a horizontal ramp (value x * 255 / (W - 1) at column x), so the slope of a crop
  gives the width of the rescaled image it was cut from.
  """
  height, width = size_hw
  ramp = np.broadcast_to(np.arange(width, dtype=np.float32) * 255 / (width - 1), (height, width))
  image = tf.constant(np.repeat(ramp[..., None], 3, axis=-1))
  mask = tf.zeros([height, width, 1], tf.int32)
  factors = []
  for seed in seeds:
    out, out_mask = preprocessing.random_rescale_crop_flip(
        image, mask, tf.constant([seed, 7], tf.int64), crop_size=crop, scale_range=(0.5, 2.0),
        flip=False, reference_size=reference_size)
    row = out.numpy()[0, :, 0][out_mask.numpy()[0, :, 0] >= 0]  # Drop bottom/right padding.
    slope = (row[-1] - row[0]) / (len(row) - 1)
    factors.append((255 / slope + 1) / width)
  return np.array(factors)


def test_train_rescale_is_relative_to_the_reference_scale():
  # MMSegmentation's (2048, 512) at a quarter: short side 128, long side at most 512. Images of
  # several sizes and shapes, one (40x480) long enough for the long-side bound to apply.
  reference, seeds = (512, 128), range(32)
  sizes = [(64, 96), (128, 96), (256, 384), (40, 480)]
  keep_ratio = {(64, 96): 2.0, (128, 96): 128 / 96, (256, 384): 0.5, (40, 480): 512 / 480}
  # Object scale in the crop relative to the image evaluation sees (resized to the reference).
  scales = {size: _crop_scales(size, reference, seeds) / keep_ratio[size] for size in sizes}
  for size in sizes[1:]:
    # The same draw shows objects at the same scale whatever the stored size (up to rounding
    # the rescaled size to whole pixels).
    np.testing.assert_allclose(scales[size], scales[sizes[0]], rtol=0.02)
  for s in scales.values():
    assert 0.49 <= s.min() < 0.6 and 1.85 < s.max() <= 2.02, (s.min(), s.max())
    assert abs(s.mean() - 1.25) < 0.12  # Uniform on [0.5, 2].
  # Without a reference the ratio is relative to the stored size, so relative to the evaluated
  # scale a 4x larger image is seen 4x larger (what ADE20K training did before).
  stored = {size: _crop_scales(size, None, seeds) for size in [(64, 96), (256, 384)]}
  np.testing.assert_allclose(stored[(256, 384)], stored[(64, 96)], rtol=0.02)
  np.testing.assert_allclose(stored[(256, 384)] / keep_ratio[(256, 384)],
                             4 * stored[(64, 96)] / keep_ratio[(64, 96)], rtol=0.02)
