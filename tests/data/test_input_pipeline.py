"""Tests for ddep_jax.data.input_pipeline on tiny TFDS datasets prepared by the tests."""

import dataclasses
import os
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddep_jax.data import datasets
from ddep_jax.data import input_pipeline
from ddep_jax.data import reading
from ddep_jax.data import subsets

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ram_filesystem  # pylint: disable=g-import-not-at-top,wrong-import-position

CITYSCAPES_TRAIN_TO_RAW = {v: k for k, v in datasets.CITYSCAPES_LABEL_ID_TO_TRAIN_ID.items()}


def _train_config(scenes, dataset='test_cityscapes', **overrides):
  config = input_pipeline.default_config()
  config.dataset = dataset
  config.data_dir = scenes.data_dir
  config.batch_size = 4
  config.crop_size = (16, 16)
  config.threadpool_size = 2
  for k, v in overrides.items():
    config[k] = v
  return config


def _eval_config(scenes, dataset='test_ade', **overrides):
  config = input_pipeline.default_eval_config()
  config.dataset = dataset
  config.data_dir = scenes.data_dir
  config.batch_size = 6
  for k, v in overrides.items():
    config[k] = v
  return config


def _raw(image):
  """[-1, 1] -> [0, 255]."""
  return (np.asarray(image) + 1.0) * 127.5


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_default_configs_have_the_owned_fields():
  config = input_pipeline.default_config()
  for field in ('dataset', 'split', 'batch_size', 'crop_size', 'scale_range', 'flip',
                'inception_crop', 'label_fraction', 'label_count', 'subset_seed', 'split_file',
                'shuffle_buffer', 'cache', 'data_dir', 'skip_corrupt', 'reference_size'):
    assert field in config, field
  assert tuple(config.scale_range) == (0.5, 2.0)
  eval_config = input_pipeline.default_eval_config()
  for field in ('dataset', 'split', 'batch_size', 'resize', 'pad_to'):
    assert field in eval_config, field


def test_a_misspelt_or_missing_input_field_fails_loudly(tmp_path):
  # The locked default: a misspelt field cannot even be set.
  with pytest.raises(AttributeError, match='shuffel_buffer'):
    input_pipeline.default_config().shuffel_buffer = 8
  # A config built another way (e.g. from JSON) is checked before any data is read.
  unlocked = ml_collections.ConfigDict(input_pipeline.default_config().to_dict())
  unlocked.data_dir = str(tmp_path)
  misspelt = unlocked.copy_and_resolve_references()
  misspelt.shuffel_buffer = 8
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['shuffel_buffer'\]; misspelt"):
    input_pipeline.get_train_dataset(misspelt, 'segment', seed=0, process_index=0,
                                     process_count=1)
  missing = unlocked.copy_and_resolve_references()
  del missing['shuffle_buffer']
  for read in (lambda: input_pipeline.get_train_dataset(missing, 'segment', seed=0,
                                                        process_index=0, process_count=1),
               lambda: input_pipeline.train_crop_size(missing, 'segment')):
    with pytest.raises(ValueError, match=r"config.input\) has no field\(s\) \['shuffle_buffer'\]"
                       r'\. Build it from ddep_jax.data.input_pipeline.default_config\(\)'):
      read()
  eval_config = input_pipeline.default_eval_config()
  eval_config.data_dir = str(tmp_path)
  del eval_config['pad_multiple']
  with pytest.raises(ValueError, match=r"has no field\(s\) \['pad_multiple'\]\. Build it from "
                     r'ddep_jax.data.input_pipeline.default_eval_config\(\)'):
    input_pipeline.get_eval_dataset(eval_config, 'segment', process_index=0, process_count=1)


def test_segment_train_batches_align_labels_and_count_unexpected_values(scenes):
  config = _train_config(scenes)
  iterator = input_pipeline.get_train_dataset(config, 'segment', seed=0, process_index=0,
                                              process_count=1)
  batches = _take(iterator, 5)  # 20 examples / 4: exactly one epoch.
  assert set(batches[0]) == {'image', 'label', 'num_invalid_label_pixels'}
  assert batches[0]['image'].shape == (4, 16, 16, 3) and batches[0]['image'].dtype == np.float32
  assert batches[0]['label'].shape == (4, 16, 16) and batches[0]['label'].dtype == np.int32
  # Only example 3 holds unexpected values: one 4x4 block of 40, counted once per epoch.
  assert sum(int(b['num_invalid_label_pixels'].sum()) for b in batches) == 16
  checked = 0
  for batch in batches:
    labels = batch['label']
    assert set(np.unique(labels)) <= set(range(19)) | {255}
    red = _raw(batch['image'])[..., 0]
    # Where the labels are constant on a 3x3 neighbourhood (scales <= 2 sample every half pixel
    # or coarser), the bilinear image reads only that block.
    for b, y, x in np.argwhere(labels[:, 1:-1, 1:-1] != 255) + [0, 1, 1]:
      if (labels[b, y - 1:y + 2, x - 1:x + 2] == labels[b, y, x]).all():
        want = scenes.red_per_value * CITYSCAPES_TRAIN_TO_RAW[labels[b, y, x]]
        assert abs(red[b, y, x] - want) < 1.0
        checked += 1
  assert checked > 1000


def test_segment_crop_larger_than_image_is_padded_with_ignore(scenes):
  config = _train_config(scenes, crop_size=(32, 48), scale_range=(1.0, 1.0))
  batch = next(input_pipeline.get_train_dataset(config, 'segment', seed=1, process_index=0,
                                                process_count=1))
  height, width = scenes.cityscapes_shape  # 24 x 40: 8 rows and 8 columns of padding.
  assert (batch['label'][:, height:] == 255).all()
  np.testing.assert_allclose(batch['image'][:, height:], -1.0)
  for labels, image in zip(batch['label'], batch['image']):
    padded_columns = np.flatnonzero((labels[:height] == 255).all(axis=0))
    # Padding is on the right, or on the left after a flip.
    assert set(range(width, 48)) <= set(padded_columns) or set(range(8)) <= set(padded_columns)
    np.testing.assert_allclose(image[:, padded_columns[padded_columns >= width]], -1.0)


def test_segment_rescale_is_relative_to_the_reference_size(scenes):
  # Frames are 24x40 with a green ramp of 255 / 39 per column; the keep-ratio scale (160, 48)
  # doubles them (short side 48), so at scale_range 1 the crops show half the slope.
  slopes = {}
  for reference in (None, (160, 48)):
    config = _train_config(scenes, scale_range=(1.0, 1.0), reference_size=reference)
    batch = next(input_pipeline.get_train_dataset(config, 'segment', seed=0, process_index=0,
                                                  process_count=1))
    slopes[reference] = np.abs(np.diff(_raw(batch['image'])[..., 1], axis=2)).mean()
  assert slopes[None] == pytest.approx(255 / 39, rel=0.03)
  assert slopes[(160, 48)] == pytest.approx(255 / 79, rel=0.03)
  with pytest.raises(ValueError, match=r'input.reference_size=\(512,\) must be \(long side'):
    input_pipeline.get_train_dataset(_train_config(scenes, reference_size=(512,)), 'segment',
                                     seed=0, process_index=0, process_count=1)


@pytest.mark.parametrize('task', ['segment', 'denoise'])
def test_resume_at_start_step_equals_uninterrupted_run(scenes, task):
  # 2 processes, global batch 6: process 1 reads 10 of the 20 examples, 3 per step, so step 4
  # starts inside the second epoch.
  config = _train_config(scenes, batch_size=6, shuffle_buffer=8)
  kwargs = dict(seed=7, process_index=1, process_count=2)
  uninterrupted = _take(input_pipeline.get_train_dataset(config, task, **kwargs), 7)
  resumed = _take(input_pipeline.get_train_dataset(config, task, start_step=4, **kwargs), 3)
  for want, got in zip(uninterrupted[4:], resumed):
    assert set(want) == set(got)
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  # Steps differ (the stream is not constant), and the seed matters.
  assert not np.array_equal(uninterrupted[0]['image'], uninterrupted[1]['image'])
  other_seed = next(input_pipeline.get_train_dataset(config, task, **{**kwargs, 'seed': 8}))
  assert not np.array_equal(other_seed['image'], uninterrupted[0]['image'])


def _stream_ids(scenes, process_index, process_count, subset=None, dataset='test_cityscapes'):
  """Ids of one process's examples in read order (the per-process stream both inputs read)."""
  source = reading.open_source(dataset, 'train', 'segment', scenes.data_dir)
  stream = reading.process_stream(source, subset, process_index, process_count)
  ids = [ex['key'].decode() for ex in stream.dataset.as_numpy_iterator()]
  assert len(ids) == stream.num_examples
  return ids


def test_processes_read_disjoint_parts_whose_union_is_the_split_or_subset(scenes):
  all_ids = {scenes.cityscapes_id(i) for i in range(scenes.num_train['cityscapes_like'])}
  subset = subsets.select_subset(all_ids, label_count=7, subset_seed=2)
  for chosen, want_sizes in ((None, [7, 7, 6]), (subset, [3, 2, 2])):
    parts = [_stream_ids(scenes, p, 3, chosen) for p in range(3)]
    assert [len(p) for p in parts] == want_sizes
    union = set().union(*parts)
    assert sum(len(p) for p in parts) == len(union)  # Disjoint.
    assert union == (all_ids if chosen is None else set(subset))


def test_label_fraction_subset_is_written_and_can_be_imported(scenes, tmp_path):
  workdir = str(tmp_path / 'run')
  config = _train_config(scenes, label_fraction=0.25, subset_seed=5)
  iterator = input_pipeline.get_train_dataset(config, 'segment', seed=0, process_index=0,
                                              process_count=1, workdir=workdir)
  all_ids = [scenes.cityscapes_id(i) for i in range(scenes.num_train['cityscapes_like'])]
  want = subsets.select_subset(all_ids, label_fraction=0.25, subset_seed=5)
  path = os.path.join(workdir, input_pipeline.SUBSET_IDS_FILENAME)
  assert subsets.read_split_file(path) == want
  assert iterator.num_examples == 5 and iterator.subset_ids == want
  # Importing the written ids gives the same batches.
  imported = input_pipeline.get_train_dataset(
      _train_config(scenes, split_file=path), 'segment', seed=0, process_index=0,
      process_count=1)
  for a, b in zip(_take(iterator, 3), _take(imported, 3)):
    np.testing.assert_array_equal(a['label'], b['label'])
  # Only process 0 writes.
  other = str(tmp_path / 'other')
  input_pipeline.get_train_dataset(config, 'segment', seed=0, process_index=1, process_count=2,
                                   workdir=other)
  assert not os.path.exists(os.path.join(other, input_pipeline.SUBSET_IDS_FILENAME))


def test_split_file_with_unknown_ids_is_an_error(scenes, tmp_path):
  path = str(tmp_path / 'ids.txt')
  subsets.write_split_file(path, ['aachen_000000_000019', 'nowhere_000001_000019'])
  with pytest.raises(ValueError, match="1 ids that are not in.*'nowhere_000001_000019'"):
    input_pipeline.get_train_dataset(_train_config(scenes, split_file=path), 'segment', seed=0,
                                     process_index=0, process_count=1)


def test_eval_pads_examples_and_batches_so_every_process_runs_the_same_number(scenes):
  config = _eval_config(scenes)  # 7 validation images, global batch 6 over 3 processes.
  seen = {}
  for process in range(3):
    batches, num_batches = input_pipeline.get_eval_dataset(config, 'segment',
                                                           process_index=process,
                                                           process_count=3)
    assert num_batches == 2 == len(list(batches))  # ceil(ceil(7 / 3) / 2) on every process.
    for batch in batches:
      assert batch['image'].shape == (2, 32, 64, 3)  # Largest 32 x 40, rounded up to 32.
      for image, labels, valid, size in zip(batch['image'], batch['label'], batch['valid'],
                                            batch['orig_size']):
        if not valid:
          assert (labels == 255).all() and tuple(size) == (0, 0)
          continue
        i = 100 + int(round(_raw(image)[0, 0, 2] / 10))  # Blue channel = 10 * (i % 25).
        seen[i] = process
        height, width = scenes.ade_shape(i)
        assert tuple(size) == (height, width)
        mask = scenes.ade_mask(i).astype(np.int64)
        np.testing.assert_array_equal(labels[:height, :width], np.where(mask == 0, 255, mask - 1))
        assert (labels[height:] == 255).all() and (labels[:, width:] == 255).all()
        np.testing.assert_allclose(_raw(image)[:height, :width], scenes.image(scenes.ade_mask(i),
                                                                               i), atol=1e-4)
        np.testing.assert_allclose(image[height:], -1.0)
  assert sorted(seen) == list(range(100, 107))


def test_eval_resize_short_side_and_fixed_pad_to(scenes):
  config = _eval_config(scenes, resize=16, batch_size=8)
  batches, num_batches = input_pipeline.get_eval_dataset(config, 'segment', process_index=0,
                                                         process_count=1)
  batch = next(iter(batches))
  assert num_batches == 1 and batch['valid'].sum() == 7
  sizes = {tuple(s) for s in batch['orig_size'][batch['valid']]}
  # Short side 16, long side round(16 * long / short): e.g. 20 x 24 -> 16 x 19.
  assert (16, 19) in sizes and all(min(s) == 16 for s in sizes)
  assert batch['image'].shape[1:3] == (32, 32)  # Largest resized (16 x 32) rounded up to 32.
  config = _eval_config(scenes, dataset='test_cityscapes', pad_to=(24, 48))
  batch = next(iter(input_pipeline.get_eval_dataset(config, 'segment', process_index=0,
                                                    process_count=1)[0]))
  assert batch['label'].shape == (6, 24, 48) and (batch['label'][:, :, 40:] == 255).all()


def test_eval_image_larger_than_pad_to_names_the_example(scenes):
  config = _eval_config(scenes, pad_to=(16, 16))
  batches, _ = input_pipeline.get_eval_dataset(config, 'segment', process_index=0,
                                               process_count=1)
  with pytest.raises(input_pipeline.CorruptExampleError, match=r'ADE_train_0001\d\d.*pad_to'):
    list(batches)


def test_classify_train_and_eval(scenes):
  config = _train_config(scenes, dataset='test_classification', crop_size=(8, 8))
  batch = next(input_pipeline.get_train_dataset(config, 'classify', seed=0, process_index=0,
                                                process_count=1))
  assert batch['image'].shape == (4, 8, 8, 3) and batch['label'].dtype == np.int32
  assert set(batch['label']) <= {0, 1, 2}
  batches, num_batches = input_pipeline.get_eval_dataset(
      _eval_config(scenes, dataset='test_classification', resize=8), 'classify',
      process_index=0, process_count=1)
  labels = np.concatenate([b['label'][b['valid']] for b in batches])
  assert num_batches == 1 and sorted(labels) == sorted(i % 3 for i in range(100, 105))


def test_denoise_reads_any_tfds_image_dataset_by_name(scenes):
  config = _train_config(scenes, dataset='tfds:pipeline_test_scenes/ade_like', crop_size=(8, 8))
  batch = next(input_pipeline.get_train_dataset(config, 'denoise', seed=0, process_index=0,
                                                process_count=1))
  assert set(batch) == {'image'} and batch['image'].shape == (4, 8, 8, 3)
  assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0


def test_corrupt_image_is_named_or_skipped_and_counted(scenes):
  config = _train_config(scenes, dataset='test_corrupt', batch_size=3, shuffle_buffer=1)
  iterator = input_pipeline.get_train_dataset(config, 'segment', seed=0, process_index=0,
                                              process_count=1)
  with pytest.raises(input_pipeline.CorruptExampleError, match=f"'{scenes.corrupt_id}'.*PNG"):
    _take(iterator, 2)
  config.skip_corrupt = True
  iterator = input_pipeline.get_train_dataset(config, 'segment', seed=0, process_index=0,
                                              process_count=1)
  _take(iterator, 4)  # 12 examples: 2 epochs of 5 intact examples, then 2 more.
  # Unshuffled, each epoch reads the examples in file order; the corrupt one is skipped each
  # time, and once more in the third epoch if it comes before its second intact example.
  position = _stream_ids(scenes, 0, 1, dataset='test_corrupt').index(scenes.corrupt_id)
  assert iterator.num_skipped_corrupt == 2 + int(position < 2)


def test_bad_inputs_get_clear_errors(scenes, tmp_path):
  with pytest.raises(ValueError, match='batch_size=6 must be a positive multiple of the '
                     r'process count \(4\)'):
    input_pipeline.get_train_dataset(_train_config(scenes, batch_size=6), 'segment', seed=0,
                                     process_index=0, process_count=4)
  with pytest.raises(ValueError, match='needs a segmentation dataset'):
    input_pipeline.get_train_dataset(_train_config(scenes, dataset='test_classification'),
                                     'segment', seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"unknown split\(s\) \['val'\]"):
    input_pipeline.get_eval_dataset(_eval_config(scenes, split='val'), 'segment',
                                    process_index=0, process_count=1)
  with pytest.raises(datasets.DatasetNotPreparedError, match=str(tmp_path)):
    input_pipeline.get_train_dataset(_train_config(scenes, data_dir=str(tmp_path)), 'segment',
                                     seed=0, process_index=0, process_count=1)


def _batches_and_info(scenes, data_dir, workdir):
  """What the trainer and the evaluator read from `data_dir`, and the subset ids in `workdir`.

  Train steps on a labelled subset (whose ids process 0 writes to `workdir`), the same steps
  read through that file as `split_file`, every eval batch, the dataset info and split sizes.
  """
  config = _train_config(scenes, data_dir=data_dir, label_count=9, subset_seed=4,
                         shuffle_buffer=8)
  subset = _take(input_pipeline.get_train_dataset(config, 'segment', seed=3, process_index=0,
                                                  process_count=1, workdir=workdir), 4)
  split_file = f'{workdir}/{input_pipeline.SUBSET_IDS_FILENAME}'
  config = _train_config(scenes, data_dir=data_dir, split_file=split_file, shuffle_buffer=8)
  imported = _take(input_pipeline.get_train_dataset(config, 'segment', seed=3, process_index=0,
                                                    process_count=1), 4)
  evaluated = list(input_pipeline.get_eval_dataset(_eval_config(scenes, data_dir=data_dir),
                                                   'segment', process_index=0,
                                                   process_count=1)[0])
  info = input_pipeline.dataset_info('test_ade', data_dir)
  sizes = (info.split_size('train[:50%]'),
           input_pipeline.dataset_info('test_cityscapes', data_dir).train_size(config))
  return subset + imported + evaluated, info, sizes


def test_data_dir_and_split_files_on_a_non_local_file_system(scenes, tmp_path):
  """The prepared data, the subset ids and the split file on `ram://`: what the local copy gives.

  `ram://` goes through `tf.io.gfile` as `gs://` does on a pod (tests/ram_filesystem.py says
  why not the GCS emulator), so equal batches mean no `os.path` or `open()` on the data_dir.
  """
  local = _batches_and_info(scenes, scenes.data_dir, str(tmp_path))
  with ram_filesystem.copy_on_ram(scenes.data_dir, 'pipeline_tfds') as data_dir:
    workdir = f'{data_dir}/runs/subset'  # Deleted with the data.
    on_ram = _batches_and_info(scenes, data_dir, workdir)
    source = reading.open_source('test_cityscapes', 'train', 'segment', data_dir)
    assert os.fspath(source.builder.data_dir).startswith(f'{data_dir}/'), source.builder.data_dir
    assert subsets.read_split_file(f'{workdir}/{input_pipeline.SUBSET_IDS_FILENAME}') == (
        subsets.read_split_file(str(tmp_path / input_pipeline.SUBSET_IDS_FILENAME)))
  local_batches, local_info, local_sizes = local
  batches, info, sizes = on_ram
  assert len(batches) == len(local_batches) == 4 + 4 + 2
  for want, got in zip(local_batches, batches):
    assert set(want) == set(got)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert info == local_info and info.splits == {'train': 12, 'validation': 7}
  assert info.class_names == datasets.ADE20K_CLASSES
  assert sizes == local_sizes == (6, 9)
  assert not os.path.exists('ram:') and not os.path.exists(os.path.join(tmp_path, 'ram:'))


def test_digit_scenes_through_the_project_builder(tmp_path, request):
  """The registry's `digit_scenes` spec on real `ddep_digit_scenes` output (a tiny config)."""
  # The registry is process-wide: later test files in this worker must not see this entry.
  request.addfinalizer(lambda: datasets.unregister_dataset('tiny_digit_scenes'))
  # Imported here so that the other tests do not depend on the builders package.
  from ddep_jax.data.builders import digit_scenes  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path)
  digit_scenes.DigitScenes(
      config=digit_scenes.DigitScenesConfig(name='tiny_segmentation', task='segmentation',
                                            num_train=8, num_validation=3),
      data_dir=data_dir).download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  datasets.register_dataset(dataclasses.replace(
      datasets.get_spec('digit_scenes'), name='tiny_digit_scenes',
      tfds_name='ddep_digit_scenes/tiny_segmentation'), overwrite=True)
  config = input_pipeline.default_config()
  config.update(dataset='tiny_digit_scenes', data_dir=data_dir, batch_size=4, threadpool_size=2)
  batches = _take(input_pipeline.get_train_dataset(config, 'segment', seed=0, process_index=0,
                                                   process_count=1), 2)  # One epoch.
  labels = np.stack([b['label'] for b in batches])
  assert set(np.unique(labels)) <= set(range(11)) | {255}
  assert len(set(np.unique(labels)) - {0, 255}) >= 2  # Several digits in view.
  assert sum(int(b['num_invalid_label_pixels'].sum()) for b in batches) == 0
  # The masks hold no 255: ignore pixels are crop padding, which is black (-1) in the image.
  images = np.stack([b['image'] for b in batches])
  np.testing.assert_allclose(images[labels == 255], -1.0)
  eval_config = input_pipeline.default_eval_config()
  eval_config.update(dataset='tiny_digit_scenes', data_dir=data_dir, batch_size=2)
  eval_batches, num_batches = input_pipeline.get_eval_dataset(eval_config, 'segment',
                                                              process_index=0, process_count=1)
  sizes = np.concatenate([b['orig_size'][b['valid']] for b in eval_batches])
  assert num_batches == 2 and sizes.tolist() == [[32, 32]] * 3 and eval_batches.pad_to == (32, 32)
