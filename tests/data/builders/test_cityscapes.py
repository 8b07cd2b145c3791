"""TFDS's own `cityscapes/semantic_segmentation` on archives written in the real layout."""

import shutil
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.cityscapes import cityscapes_dataset_builder

from ddep_jax.data.builders import dummy_data

class CityscapesSemanticSegmentationTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = cityscapes_dataset_builder.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ['semantic_segmentation']
  SPLITS = {'train': 2, 'validation': 1, 'test': 1}

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.EXAMPLE_DIR = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.EXAMPLE_DIR)
    dummy_data.write_cityscapes(cls.EXAMPLE_DIR)  # aachen, bochum / frankfurt / berlin.


def test_raw_label_ids_survive(tmp_path, build, read_split):
  written = dummy_data.write_cityscapes(tmp_path)
  builder = build(cityscapes_dataset_builder.Builder, 'semantic_segmentation', tmp_path)
  for split, image_id in (('train', 'bochum_000000_000019'),
                          ('validation', 'frankfurt_000000_000019')):
    examples = read_split(builder, split)
    assert sorted(examples) == sorted(written[split])
    example = examples[image_id]
    label = example['segmentation_label'][..., 0]
    np.testing.assert_array_equal(label, written[split][image_id])
    assert label[650, 1100] == 26  # Raw id of 'car' (its train id would be 13).
    assert example['image_left'].shape == dummy_data.CITYSCAPES_SIZE + (3,)
