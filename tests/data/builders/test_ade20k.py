"""Tests of `ddep_ade20k` on tiny `ADEChallengeData2016.zip` archives written by dummy_data."""

import shutil
import tempfile
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddep_jax.data.builders import ade20k
from ddep_jax.data.builders import builder_utils
from ddep_jax.data.builders import dummy_data


class Ade20kTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = ade20k.Ade20k
  SPLITS = {'train': 3, 'validation': 2}

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.EXAMPLE_DIR = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.EXAMPLE_DIR)
    dummy_data.write_ade20k(cls.EXAMPLE_DIR, num_train=3, num_validation=2)


def test_masks_keep_raw_values_and_pair_by_file_name(tmp_path, build, read_split):
  # dummy_data writes every annotation after every image, in reverse order, and each image has
  # its own size and mask, so pairing by position instead of file stem would fail here.
  written = dummy_data.write_ade20k(tmp_path, num_train=3, num_validation=2)
  builder = build(ade20k.Ade20k, 'default', tmp_path)
  for split in ('train', 'validation'):
    examples = read_split(builder, split)
    assert sorted(examples) == sorted(written[split])
    for image_id, labels in written[split].items():
      mask = examples[image_id]['segmentation_mask']
      np.testing.assert_array_equal(mask[..., 0], labels)
      assert examples[image_id]['image'].shape == labels.shape + (3,)
  all_values = np.unique(np.concatenate([m.ravel() for m in written['train'].values()]))
  assert {0, 150} <= set(all_values.tolist())  # "other" and the last class are stored raw.


def test_annotation_without_image_is_named(tmp_path, build):
  dummy_data.write_ade20k(tmp_path, num_train=2, num_validation=1)
  with zipfile.ZipFile(tmp_path / ade20k.ARCHIVE, 'a') as zf:
    zf.writestr('ADEChallengeData2016/annotations/training/ADE_train_00000099.png', b'')
  with pytest.raises(ValueError, match=r"annotations without image \(1\): \['ADE_train_00000099'"):
    build(ade20k.Ade20k, 'default', tmp_path)


def test_missing_archive_error_names_file_and_directory(tmp_path, build):
  (tmp_path / 'README').write_text('not the dataset')
  with pytest.raises(FileNotFoundError) as error:
    build(ade20k.Ade20k, 'default', tmp_path)
  assert 'ADEChallengeData2016.zip' in str(error.value)
  assert str(tmp_path) in str(error.value)
  assert 'ADEChallengeData2016.zip' in ade20k.Ade20k.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_corrupt_image_is_named_or_skipped(tmp_path, build, read_split):
  dummy_data.write_ade20k(tmp_path, num_train=3, num_validation=1, corrupt=['ADE_train_00000002'])
  with pytest.raises(builder_utils.CorruptExampleError,
                     match='ADE_train_00000002 .*images/training'):
    build(ade20k.Ade20k, 'default', tmp_path)
  config = builder_utils.ManualDataConfig(name='skip_corrupt', skip_corrupt_images=True)
  builder = build(ade20k.Ade20k, config, tmp_path)
  assert sorted(read_split(builder, 'train')) == ['ADE_train_00000001', 'ADE_train_00000003']
  assert builder.info.splits['train'].num_examples == 2
