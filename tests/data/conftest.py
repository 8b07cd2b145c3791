"""Tiny real TFDS datasets for the input-pipeline tests, generated and prepared offline.

`PipelineTestScenes` writes deterministic synthetic examples with the feature keys of the real
datasets (Cityscapes' `image_left` / `segmentation_label` with raw label ids, the project
builders' `image` / `segmentation_mask` / `image_id`). Images encode their mask: the red channel
is `RED_PER_VALUE * stored value`, so tests can check image/label alignment after augmentation.
"""

import dataclasses
import io
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from ddep_jax.data import datasets

BLOCK = 4  # Masks are constant on BLOCK x BLOCK tiles.
RED_PER_VALUE = 6
CITYSCAPES_SHAPE = (24, 40)
CITYSCAPES_VALUES = (0, 7, 8, 11, 26, 33, 24, 21)  # Raw label ids.
UNEXPECTED_CITYSCAPES_VALUE = 40  # Not a Cityscapes label id: counted, trained as ignore.
NUM_TRAIN = {'cityscapes_like': 20, 'ade_like': 12, 'classification': 10, 'corrupt': 6}
NUM_VALIDATION = {'cityscapes_like': 6, 'ade_like': 7, 'classification': 5, 'corrupt': 2}
CORRUPT_ID = 'corrupt_000003'


def cityscapes_id(i: int) -> str:
  return f"{('aachen', 'bonn')[i % 2]}_{i:06d}_000019"


def _mask(shape, values, i):
  """Block mask whose tile (by, bx) holds values[(7 * by + 3 * bx + i) % len(values)]."""
  by, bx = np.meshgrid(np.arange(shape[0]) // BLOCK, np.arange(shape[1]) // BLOCK, indexing='ij')
  return np.asarray(values, np.uint8)[(7 * by + 3 * bx + i) % len(values)]


def _image(mask, i):
  h, w = mask.shape
  red = (RED_PER_VALUE * mask.astype(np.int32)).clip(0, 255)
  green = np.broadcast_to(np.round(np.arange(w) * 255 / max(w - 1, 1)), (h, w))
  blue = np.full((h, w), 10 * (i % 25))  # Identifies the example (train 0.., validation 100..).
  return np.stack([red, green, blue], -1).astype(np.uint8)


def cityscapes_mask(i: int) -> np.ndarray:
  mask = _mask(CITYSCAPES_SHAPE, CITYSCAPES_VALUES, i)
  if i == 3:
    mask[:BLOCK, :BLOCK] = UNEXPECTED_CITYSCAPES_VALUE
  return mask


def ade_shape(i: int) -> tuple[int, int]:
  return 20 + BLOCK * (i % 4), 24 + BLOCK * (i % 5)


def ade_mask(i: int) -> np.ndarray:
  return _mask(ade_shape(i), range(0, 151, 5), i)  # Includes 0 ("other", ignored).


class PipelineTestScenes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Synthetic scenes; loaded back by name from the prepared files."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in NUM_TRAIN]
  # No source file to look for checksums next to: pytest imports conftest modules under names
  # TFDS cannot resolve to a path.
  code_path = None

  def _info(self):
    name = self.builder_config.name
    if name == 'cityscapes_like':
      features = {'image_id': tfds.features.Text(),
                  'image_left': tfds.features.Image(shape=(*CITYSCAPES_SHAPE, 3),
                                                    encoding_format='png'),
                  'segmentation_label': tfds.features.Image(shape=(*CITYSCAPES_SHAPE, 1),
                                                            encoding_format='png')}
    elif name == 'classification':
      features = {'image_id': tfds.features.Text(),
                  'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
                  'label': tfds.features.ClassLabel(names=['a', 'b', 'c'])}
    else:
      features = {'image_id': tfds.features.Text(),
                  'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
                  'segmentation_mask': tfds.features.Image(shape=(None, None, 1),
                                                           encoding_format='png')}
    # DatasetInfo directly: dataset_info_from_configs would look for metadata files next to
    # this module's package.
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    name = self.builder_config.name
    return {'train': self._generate_examples(0, NUM_TRAIN[name]),
            'validation': self._generate_examples(100, NUM_VALIDATION[name])}

  def _generate_examples(self, start, count):
    name = self.builder_config.name
    for i in range(start, start + count):
      if name == 'cityscapes_like':
        mask = cityscapes_mask(i)
        yield cityscapes_id(i), {'image_id': cityscapes_id(i), 'image_left': _image(mask, i),
                                 'segmentation_label': mask[..., None]}
      elif name == 'classification':
        mask = _mask((20, 28), range(0, 40, 5), i)
        yield f'cls_{i:06d}', {'image_id': f'cls_{i:06d}', 'image': _image(mask, i),
                               'label': i % 3}
      else:
        prefix = 'ADE_train' if name == 'ade_like' else 'corrupt'
        key = f'{prefix}_{i:06d}'
        mask = ade_mask(i)
        image = _image(mask, i)
        if key == CORRUPT_ID:
          buffer = io.BytesIO(tf.io.encode_png(image).numpy())
          image = buffer.getvalue()[:60]  # A PNG header with its pixel data cut off.
        yield key, {'image_id': key, 'image': image, 'segmentation_mask': mask[..., None]}


TEST_SPECS = {
    'test_cityscapes': dataclasses.replace(
        datasets.get_spec('cityscapes'), name='test_cityscapes',
        tfds_name='pipeline_test_scenes/cityscapes_like', crop_size=(16, 16)),
    'test_ade': dataclasses.replace(
        datasets.get_spec('ade20k'), name='test_ade', tfds_name='pipeline_test_scenes/ade_like',
        crop_size=(16, 16)),
    'test_corrupt': dataclasses.replace(
        datasets.get_spec('ade20k'), name='test_corrupt',
        tfds_name='pipeline_test_scenes/corrupt', crop_size=(16, 16)),
    'test_classification': datasets.DatasetSpec(
        name='test_classification', tfds_name='pipeline_test_scenes/classification',
        kind=datasets.CLASSIFICATION, label_key='label', num_classes=3),
}


@pytest.fixture(scope='session')
def scenes(tmp_path_factory):
  """Prepares every PipelineTestScenes config and registers TEST_SPECS.

  Returns a namespace: `data_dir`, the helpers and constants of this module (tests reach them
  through the fixture, as conftest modules are not importable under --import-mode=importlib).
  """
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  for config in NUM_TRAIN:
    PipelineTestScenes(config=config, data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  for spec in TEST_SPECS.values():
    datasets.register_dataset(spec, overwrite=True)
  return types.SimpleNamespace(
      data_dir=data_dir, block=BLOCK, red_per_value=RED_PER_VALUE,
      cityscapes_shape=CITYSCAPES_SHAPE, num_train=NUM_TRAIN, num_validation=NUM_VALIDATION,
      corrupt_id=CORRUPT_ID, cityscapes_id=cityscapes_id, cityscapes_mask=cityscapes_mask,
      ade_shape=ade_shape, ade_mask=ade_mask, image=_image)
