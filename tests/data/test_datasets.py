"""Tests for ddep_jax.data.datasets: registry, label tables, missing-dataset errors, info."""

import dataclasses

import numpy as np
import pytest

from ddep_jax.data import datasets
from ddep_jax.data import input_pipeline
from ddep_jax.data.builders import ade20k
from ddep_jax.data.builders import digit_scenes
from ddep_jax.data.builders import pascal_context
from ddep_jax.data.builders import voc2012

CITYSCAPES_PAIRS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def test_cityscapes_label_table_maps_label_ids_to_19_train_ids():
  spec = datasets.get_spec('cityscapes')
  table = spec.label_table
  assert spec.num_classes == 19 and len(spec.class_names) == 19
  for label_id in range(34):
    assert table[label_id] == CITYSCAPES_PAIRS.get(label_id, 255), label_id
  assert (table[34:255] == datasets.UNEXPECTED_LABEL).all()
  assert table[255] == 255
  assert (spec.tfds_name, spec.image_key, spec.label_key) == (
      'cityscapes/semantic_segmentation', 'image_left', 'segmentation_label')


def test_other_label_tables():
  ade = datasets.get_spec('ade20k').label_table
  assert ade[0] == 255 and ade[1] == 0 and ade[150] == 149
  assert (ade[151:255] == datasets.UNEXPECTED_LABEL).all()
  pc59 = datasets.get_spec('pascal_context_59')
  assert pc59.num_classes == 59 and pc59.label_table[58] == 58
  assert pc59.label_table[59] == datasets.UNEXPECTED_LABEL and pc59.label_table[255] == 255
  assert len(pc59.class_names) == 59 and 'background' not in pc59.class_names
  assert len(datasets.get_spec('pascal_context_60').class_names) == 60
  digits = datasets.get_spec('digit_scenes')
  np.testing.assert_array_equal(digits.label_table[:12], list(range(11)) + [-1])
  assert len(datasets.get_spec('ade20k').class_names) == 150
  assert len(datasets.get_spec('voc2012').class_names) == 21


def test_get_spec_names():
  spec = datasets.get_spec('tfds:imagenet2012')
  assert (spec.tfds_name, spec.image_key, spec.label_key) == ('imagenet2012', 'image', 'label')
  with pytest.raises(ValueError, match="Unknown dataset 'citiscapes'.*cityscapes"):
    datasets.get_spec('citiscapes')
  with pytest.raises(ValueError, match='give a TFDS name'):
    datasets.get_spec('tfds:')


def test_register_dataset_validates_the_table():
  bad = dataclasses.replace(datasets.get_spec('voc2012'), name='bad_voc',
                            label_table=np.full([256], 30, np.int32))
  with pytest.raises(ValueError, match='label_table must have 256 entries'):
    datasets.register_dataset(bad)
  with pytest.raises(ValueError, match='already registered'):
    datasets.register_dataset(datasets.get_spec('voc2012'))


def test_missing_cityscapes_names_dataset_data_dir_and_manual_files(tmp_path):
  with pytest.raises(datasets.DatasetNotPreparedError) as info:
    datasets.load_builder(datasets.get_spec('cityscapes'), str(tmp_path))
  message = str(info.value)
  for part in ("'cityscapes'", 'cityscapes/semantic_segmentation', str(tmp_path), 'tfds build',
               'leftImg8bit_trainvaltest.zip', 'gtFine_trainvaltest.zip'):
    assert part in message, part


def test_missing_project_dataset_says_what_to_run(tmp_path):
  with pytest.raises(datasets.DatasetNotPreparedError) as info:
    datasets.load_builder(datasets.get_spec('ade20k'), str(tmp_path))
  message = str(info.value)
  for part in ('ddep_ade20k', str(tmp_path), '--imports=ddep_jax.data.builders'):
    assert part in message, part


def _input_config(**fields):
  config = input_pipeline.default_config()
  config.update(fields)
  return config


def test_dataset_info_of_a_prepared_dataset(scenes):
  info = datasets.dataset_info('test_cityscapes', scenes.data_dir)
  assert info.num_classes == 19 and info.class_names[0] == 'road'
  assert info.splits == {'train': 20, 'validation': 6}
  assert info.split_size('train[:50%]') == 10
  assert info.train_size(_input_config(split='train', label_fraction=0.25)) == 5
  assert info.train_size(_input_config(split='train', label_count=7)) == 7
  classification = datasets.dataset_info('tfds:pipeline_test_scenes/classification',
                                         scenes.data_dir)
  assert (classification.kind, classification.num_classes) == ('classification', 3)
  assert classification.class_names == ('a', 'b', 'c')
  images = datasets.dataset_info('tfds:pipeline_test_scenes/ade_like', scenes.data_dir)
  assert (images.kind, images.num_classes) == ('images', None)


def _builder_value_names(tmp_path) -> dict[str, dict[int, str]]:
  """{registry name: {stored mask value / class label: name}} as each project builder defines."""
  digit_names = digit_scenes.DigitScenes(
      config='classification', data_dir=str(tmp_path)).info.features['label'].names
  return {
      'ade20k': {k + 1: name for k, name in enumerate(ade20k.CLASSES)},  # 0 = "other".
      'pascal_context_60': dict(enumerate(pascal_context.CLASSES_60)),
      'pascal_context_59': dict(enumerate(pascal_context.CLASSES_59)),
      'voc2012': dict(enumerate(voc2012.CLASSES)),
      # Masks: 0 = background, 1..10 = digit 0..9 (the builder's docstring).
      'digit_scenes': {0: 'background', **{d + 1: n for d, n in enumerate(digit_names)}},
      'digit_scenes_classification': dict(enumerate(digit_names)),
      # The same masks with every digit one class (issue 19's foreground check).
      'digit_scenes_foreground': {0: 'background', **{d + 1: 'digit' for d in range(10)}},
  }


def test_class_names_follow_each_builders_ids(tmp_path):
  expected = _builder_value_names(tmp_path)
  # ImageNet-21k's names come from the prepared ClassLabel (its synset order), so the registry
  # holds none; unlabelled datasets have none.
  from_prepared = {'imagenet21k_fall11', 'imagenet21k_winter21'}
  checked = set()
  for name in datasets.registered_names():
    spec = datasets.get_spec(name)
    if not spec.tfds_name.startswith('ddep_'):
      continue  # TFDS's own builders (Cityscapes) and test datasets.
    if spec.kind == datasets.IMAGES or name in from_prepared:
      assert spec.class_names is None, name
      continue
    assert name in expected, f'{name}: add its builder names to this test'
    names = expected[name]
    # A spec may merge stored values into one class (digit_scenes_foreground): names repeat.
    assert len(spec.class_names) == spec.num_classes == len(set(names.values())), name
    if spec.kind == datasets.CLASSIFICATION:
      assert tuple(spec.class_names) == tuple(names[i] for i in range(len(names))), name
    else:
      # Id by id through the label table: stored value v trains as id table[v], named as v is.
      table = spec.label_table
      for value, value_name in names.items():
        assert spec.class_names[table[value]] == value_name, (name, value)
      assert sorted({table[v] for v in names}) == list(range(spec.num_classes)), name
      if len(set(names.values())) == len(names):
        assert len({table[v] for v in names}) == len(names), name  # One id per stored value.
    checked.add(name)
  assert checked == set(expected)


def test_pascal_context_names_are_mmsegmentations_order():
  # MMSegmentation's PascalContextDataset(59) METAINFO: background, then alphabetical; the
  # builder's ids sort PASCAL-in-Detail's category ids, whose label list is alphabetical.
  pc60, pc59 = datasets.get_spec('pascal_context_60'), datasets.get_spec('pascal_context_59')
  assert pc60.class_names[0] == 'background'
  assert list(pc60.class_names[1:]) == sorted(pc60.class_names[1:])
  assert tuple(pc59.class_names) == tuple(pc60.class_names[1:])
  spot = {1: 'aeroplane', 2: 'bag', 11: 'building', 13: 'cabinet', 37: 'person', 40: 'pottedplant',
          50: 'table', 55: 'tvmonitor', 59: 'wood'}
  assert {i: pc60.class_names[i] for i in spot} == spot
  assert pc59.class_names[1] == 'bag' and pc59.class_names[58] == 'wood'
