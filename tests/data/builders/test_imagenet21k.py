"""Tests of `ddep_imagenet21k` on tiny tars of per-synset tars written by dummy_data."""

import shutil
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddep_jax.data.builders import builder_utils
from ddep_jax.data.builders import dummy_data
from ddep_jax.data.builders import imagenet21k

SYNSETS = dummy_data.IMAGENET_DUMMY_SYNSETS  # Sorted; written to the archive in reverse order.

# Same layout and file names as the real configs, but 3 synsets.
FALL11_TINY = imagenet21k.Imagenet21kConfig(
    name='fall11_tiny', archive='fall11_whole.tar', num_classes=3,
    synsets_file='fall11_synsets.txt')
WINTER21_TINY = imagenet21k.Imagenet21kConfig(
    name='winter21_tiny', archive='winter21_whole.tar.gz', num_classes=3,
    synsets_file='winter21_synsets.txt')


class Imagenet21kTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = imagenet21k.Imagenet21k
  # fall11: synsets listed from the archive; winter21: from the optional synsets file.
  BUILDER_CONFIG_NAMES_TO_TEST = [FALL11_TINY, WINTER21_TINY]
  SPLITS = {'train': 6}

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.EXAMPLE_DIR = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.EXAMPLE_DIR)
    dummy_data.write_imagenet21k(cls.EXAMPLE_DIR, release='fall11')
    dummy_data.write_imagenet21k(cls.EXAMPLE_DIR, release='winter21', write_synsets_file=True)


@pytest.mark.parametrize('config,release,synsets_file', [
    (FALL11_TINY, 'fall11', False), (WINTER21_TINY, 'winter21', False),
    (WINTER21_TINY, 'winter21', True)])
def test_labels_are_sorted_synset_indices(tmp_path, build, read_split, config, release,
                                          synsets_file):
  written = dummy_data.write_imagenet21k(tmp_path, release=release, images_per_synset=3,
                                         write_synsets_file=synsets_file)
  builder = build(imagenet21k.Imagenet21k, config, tmp_path)
  assert builder.info.features['label'].names == list(SYNSETS)
  examples = read_split(builder, 'train')
  assert sorted(examples) == sorted(written)
  for image_id, synset in written.items():
    assert examples[image_id]['synset'].decode() == synset
    assert examples[image_id]['label'] == SYNSETS.index(synset)
  # The PNG and the CMYK JPEG named .JPEG were stored as RGB JPEGs that decode to RGB.
  for image_id in (f'{SYNSETS[0]}_11', f'{SYNSETS[0]}_12'):
    image = examples[image_id]['image']
    assert image.ndim == 3 and image.shape[-1] == 3 and image.std() > 10


def test_release_size_mismatch_is_explained(tmp_path, build):
  dummy_data.write_imagenet21k(tmp_path, release='fall11')
  with pytest.raises(ValueError, match="found 3 synsets but the 'fall11' release has 21841"):
    build(imagenet21k.Imagenet21k, 'fall11', tmp_path)


def test_synsets_file_must_cover_the_archive(tmp_path, build):
  dummy_data.write_imagenet21k(tmp_path, release='winter21')
  (tmp_path / 'winter21_synsets.txt').write_text('n01440764\nn02084071\nn09999999\n')
  with pytest.raises(ValueError, match='holds synset n15075141, which is not in the synset list'):
    build(imagenet21k.Imagenet21k, WINTER21_TINY, tmp_path)


def test_missing_archive_error_names_it(tmp_path, build):
  dummy_data.write_imagenet21k(tmp_path, release='fall11')
  with pytest.raises(FileNotFoundError) as error:
    build(imagenet21k.Imagenet21k, WINTER21_TINY, tmp_path)
  assert 'winter21_whole.tar.gz' in str(error.value) and str(tmp_path) in str(error.value)


def test_corrupt_image_is_named_or_skipped(tmp_path, build, read_split):
  corrupt_id = f'{SYNSETS[1]}_10'
  dummy_data.write_imagenet21k(tmp_path, release='fall11', corrupt=[corrupt_id])
  with pytest.raises(builder_utils.CorruptExampleError,
                     match=f'{corrupt_id} .*fall11_whole.tar:{SYNSETS[1]}.tar'):
    build(imagenet21k.Imagenet21k, FALL11_TINY, tmp_path)
  config = imagenet21k.Imagenet21kConfig(name='fall11_tiny_skip', num_classes=3,
                                         skip_corrupt_images=True)
  examples = read_split(build(imagenet21k.Imagenet21k, config, tmp_path), 'train')
  assert len(examples) == 5 and corrupt_id not in examples
  np.testing.assert_array_equal(sorted({int(e['label']) for e in examples.values()}), [0, 1, 2])
