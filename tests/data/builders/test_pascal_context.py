"""Tests of `ddep_pascal_context`: the RLE decoder, the 59/60 mappings and the builder."""

import json
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddep_jax.data.builders import builder_utils
from ddep_jax.data.builders import dummy_data
from ddep_jax.data.builders import pascal_context

# A hand-made 3x4 mask and its COCO RLE. Column-major pixels: 0 0 1 | 1 1 0 | 1 0 0 | 0 0 0,
# i.e. runs [2, 3, 1, 1, 5]. Compressed: 2 -> '2', 3 -> '3', 1 -> '1' (the 3rd count is stored
# as is), then differences to the count two before: 1 - 3 = -2 -> 0b11110 = 30 -> chr(78) 'N',
# 5 - 1 = 4 -> '4'.
HAND_MASK = np.array([[0, 1, 1, 0],
                      [0, 1, 0, 0],
                      [1, 0, 0, 0]], np.uint8)
HAND_COUNTS = [2, 3, 1, 1, 5]
HAND_STRING = '231N4'


def test_rle_decode_hand_made_mask():
  for counts in (HAND_STRING, HAND_STRING.encode(), HAND_COUNTS):
    np.testing.assert_array_equal(
        pascal_context.rle_decode({'size': [3, 4], 'counts': counts}), HAND_MASK)


def test_rle_decode_multi_character_count():
  # 16 needs two 5-bit groups: (16 | 0x20) + 48 = '`', then 0 + 48 = '0'. Then 4 ones.
  mask = pascal_context.rle_decode({'size': [5, 4], 'counts': '`04'})
  assert mask.T.reshape(-1).tolist() == [0] * 16 + [1] * 4


def test_rle_encode_matches_hand_made_and_round_trips():
  assert pascal_context.rle_encode(HAND_MASK) == {'size': [3, 4], 'counts': HAND_STRING}
  assert pascal_context.rle_encode(HAND_MASK, compressed=False)['counts'] == HAND_COUNTS
  rng = np.random.default_rng(0)
  for shape in ((7, 5), (1, 1), (40, 33)):
    mask = (rng.random(shape) < 0.3).astype(np.uint8)
    mask[0, 0] = 1  # A mask that starts with 1s needs a leading zero-length run.
    np.testing.assert_array_equal(
        pascal_context.rle_decode(pascal_context.rle_encode(mask)), mask)


def test_rle_decode_rejects_wrong_total():
  with pytest.raises(ValueError, match='sum to 12 .* 4x4 = 16'):
    pascal_context.rle_decode({'size': [4, 4], 'counts': HAND_COUNTS})


def test_59_and_60_class_mappings_of_a_hand_made_mask():
  # Detail category ids: 0 background, 2 aeroplane, 284 person, 458 wood, 1 (not a benchmark
  # class). Painted in order, so the later 'person' covers part of 'aeroplane'.
  annotations = []
  for category, rows, cols in ((2, slice(0, 2), slice(0, 3)), (284, slice(1, 3), slice(1, 3)),
                               (458, slice(3, 4), slice(0, 4)), (1, slice(0, 1), slice(3, 4))):
    region = np.zeros((4, 4), bool)
    region[rows, cols] = True
    annotations.append({'id': len(annotations), 'category_id': category,
                        'segmentation': pascal_context.rle_encode(region)})
  mask_60 = pascal_context.paint_mask(annotations, 4, 4, example='hand')
  expected_60 = np.array([[1, 1, 1, 0],
                          [1, 37, 37, 0],
                          [0, 37, 37, 0],
                          [59, 59, 59, 59]])
  np.testing.assert_array_equal(mask_60, expected_60)
  expected_59 = np.array([[0, 0, 0, 255],
                          [0, 36, 36, 255],
                          [255, 36, 36, 255],
                          [58, 58, 58, 58]])
  np.testing.assert_array_equal(pascal_context.to_59_classes(mask_60), expected_59)
  assert pascal_context.CLASSES_60[37] == 'person' and pascal_context.CLASSES_59[58] == 'wood'


def test_paint_mask_reports_size_mismatch():
  annotation = {'id': 7, 'category_id': 2,
                'segmentation': pascal_context.rle_encode(np.ones((2, 2), np.uint8))}
  with pytest.raises(builder_utils.CorruptExampleError, match='img: annotation 7 is 2x2 .* 3x3'):
    pascal_context.paint_mask([annotation], 3, 3, example='img')


class PascalContextTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = pascal_context.PascalContext
  SPLITS = {'train': 2, 'validation': 3}  # Both configs, '59' and '60'.

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.EXAMPLE_DIR = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.EXAMPLE_DIR)
    dummy_data.write_pascal_context(cls.EXAMPLE_DIR, num_train=2, num_validation=3)


# Train ids of the categories dummy_data paints (independent of the builder's table).
_EXPECTED_60 = {0: 0, 2: 1, 9: 2, 284: 37, 458: 59, 1: 0}


@pytest.mark.parametrize('config', ['59', '60'])
def test_builder_masks_follow_the_detail_annotations(tmp_path, build, read_split, config):
  written = dummy_data.write_pascal_context(tmp_path, num_train=2, num_validation=2)
  builder = build(pascal_context.PascalContext, config, tmp_path)
  for split in ('train', 'validation'):
    examples = read_split(builder, split)
    assert sorted(examples) == sorted(written[split])
    for image_id, categories in written[split].items():
      expected = np.vectorize(_EXPECTED_60.get)(categories)
      if config == '59':
        expected = np.where(expected == 0, 255, expected - 1)
      np.testing.assert_array_equal(examples[image_id]['segmentation_mask'][..., 0], expected)


def test_missing_json_error_names_it(tmp_path, build):
  dummy_data.write_pascal_context(tmp_path)
  (tmp_path / 'trainval_merged.json').unlink()
  with pytest.raises(FileNotFoundError) as error:
    build(pascal_context.PascalContext, '59', tmp_path)
  message = str(error.value)
  assert 'trainval_merged.json' in message and str(tmp_path) in message
  assert 'VOCtrainval_03-May-2010.tar' not in message


def test_wrong_json_is_reported(tmp_path, build):
  dummy_data.write_pascal_context(tmp_path)
  (tmp_path / 'trainval_merged.json').write_text(json.dumps({'images': []}))
  with pytest.raises(ValueError, match=r"lacks the key\(s\) \['annos_segmentation'\]"):
    build(pascal_context.PascalContext, '60', tmp_path)


def test_corrupt_image_is_named_or_skipped(tmp_path, build, read_split):
  dummy_data.write_pascal_context(tmp_path, num_train=2, num_validation=1,
                                  corrupt=['2008_000001'])
  with pytest.raises(builder_utils.CorruptExampleError, match='2008_000001 .*JPEGImages'):
    build(pascal_context.PascalContext, '60', tmp_path)
  config = pascal_context.PascalContextConfig(name='60_skip', num_classes=60,
                                              skip_corrupt_images=True)
  assert sorted(read_split(build(pascal_context.PascalContext, config, tmp_path), 'train')) == [
      '2008_000000']
