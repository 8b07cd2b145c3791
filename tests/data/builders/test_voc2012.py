"""Tests of `ddep_voc2012` on a tiny `VOCtrainval_11-May-2012.tar` written by dummy_data."""

import shutil
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddep_jax.data.builders import builder_utils
from ddep_jax.data.builders import dummy_data
from ddep_jax.data.builders import voc2012


def _write(directory, **kwargs):
  return dummy_data.write_voc2012(directory, num_train=2, num_validation=2, num_unlabelled=1,
                                  **kwargs)


class Voc2012SegmentationTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = voc2012.Voc2012
  BUILDER_CONFIG_NAMES_TO_TEST = ['segmentation']
  SPLITS = {'train': 2, 'validation': 2}

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.EXAMPLE_DIR = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.EXAMPLE_DIR)
    _write(cls.EXAMPLE_DIR)


class Voc2012ImagesTest(Voc2012SegmentationTest):
  BUILDER_CONFIG_NAMES_TO_TEST = ['images']
  SPLITS = {'train': 5}  # Every JPEG, with or without a segmentation label.


def test_palette_indices_and_boundaries_survive(tmp_path, build, read_split):
  written = _write(tmp_path)
  builder = build(voc2012.Voc2012, 'segmentation', tmp_path)
  for split in ('train', 'validation'):
    examples = read_split(builder, split)
    assert sorted(examples) == sorted(written[split])
    for image_id, labels in written[split].items():
      np.testing.assert_array_equal(examples[image_id]['segmentation_mask'][..., 0], labels)
  values = np.unique(np.concatenate([m.ravel() for m in written['train'].values()]))
  assert 255 in values and 15 in values  # Boundary and 'person' indices, not palette colours.


def test_images_config_has_every_jpeg_and_no_mask(tmp_path, build, read_split):
  written = _write(tmp_path)
  builder = build(voc2012.Voc2012, 'images', tmp_path)
  examples = read_split(builder, 'train')
  assert sorted(examples) == sorted(written['images'])
  assert set(next(iter(examples.values()))) == {'image', 'image_id'}


def test_missing_archive_error_names_it(tmp_path, build):
  (tmp_path / 'VOCtrainval_03-May-2010.tar').write_bytes(b'')  # The wrong year.
  with pytest.raises(FileNotFoundError, match=f'in {tmp_path}:\n  \\* VOCtrainval_11-May-2012.tar'):
    build(voc2012.Voc2012, 'segmentation', tmp_path)


def test_corrupt_image_is_named_or_skipped(tmp_path, build, read_split):
  _write(tmp_path, corrupt=['2007_000001'])
  with pytest.raises(builder_utils.CorruptExampleError, match='2007_000001 .*JPEGImages'):
    build(voc2012.Voc2012, 'segmentation', tmp_path)
  config = voc2012.Voc2012Config(name='segmentation_skip', skip_corrupt_images=True)
  assert sorted(read_split(build(voc2012.Voc2012, config, tmp_path), 'train')) == ['2007_000000']
