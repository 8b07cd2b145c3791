"""The train input: this process's infinite, resumable stream of augmented batches.

Each process reads its own disjoint part of the split (or of the labelled subset), in a fixed
order. Epoch `e` is that part shuffled with a seed derived from (seed, e); augmentations use
stateless ops seeded by (seed, e, example id). The stream is the concatenation of epochs 0, 1,
2, ... cut into local batches, so the batch at step `k` is a pure function of the config, seed
and k: resuming at `start_step=k` skips whole epochs arithmetically and the rest of the epoch
before any image is decoded.
"""

from collections.abc import Callable, Iterator

from absl import logging
import ml_collections
from ml_collections import config_dict
import numpy as np
import tensorflow as tf

from ddep_jax import config_fields
from ddep_jax import fileio
from ddep_jax.data import datasets
from ddep_jax.data import preprocessing
from ddep_jax.data import reading
from ddep_jax.data import subsets

SUBSET_IDS_FILENAME = 'subset_ids.txt'
_POSITION = '_position'  # Index of an example in this process's stream; stripped from batches.


def default_config() -> ml_collections.ConfigDict:
  """The `config.input` section (train input), locked: every field, with its default."""
  c = ml_collections.ConfigDict()
  c.dataset = 'digit_scenes'  # A `datasets` name, or 'tfds:<name>' for any TFDS image dataset.
  c.split = 'train'
  c.batch_size = 32  # Global; each process reads batch_size / process_count.
  # (height, width); None: 224x224 for denoise / classify, the dataset's crop for segment
  # (1024 Cityscapes, 512 ADE20K / Pascal Context).
  c.crop_size = config_dict.placeholder(tuple)
  c.scale_range = (0.5, 2.0)  # Segment: random rescale factor range.
  # Segment: what scale_range is relative to. None: the stored image; (long, short): the
  # keep-ratio size MMSegmentation's scale=(long, short) gives, e.g. (2048, 512) for ADE20K,
  # whose evaluation resizes to that scale.
  c.reference_size = config_dict.placeholder(tuple)
  c.flip = True  # Random left-right flip.
  c.inception_crop = (0.05, 1.0)  # Denoise / classify: area range of the inception crop.
  c.inception_aspect_ratio = (3 / 4, 4 / 3)
  # Label-efficient subset (at most one of the three): fraction, count, or a split file of ids.
  c.label_fraction = config_dict.placeholder(float)
  c.label_count = config_dict.placeholder(int)
  c.subset_seed = 0
  c.split_file = config_dict.placeholder(str)
  c.shuffle_buffer = 10_000  # Encoded examples held for the per-epoch shuffle.
  # Keep this process's encoded examples in memory after the first epoch; None: only when a
  # labelled subset is used (else every epoch would re-read the whole split to filter it).
  c.cache = config_dict.placeholder(bool)
  # TFDS data_dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.data_dir = config_dict.placeholder(str)
  c.skip_corrupt = False  # Skip (and count) undecodable examples instead of raising.
  c.deterministic = True  # False lets tf.data reorder elements for speed (breaks exact resume).
  c.threadpool_size = 48  # tf.data private threadpool (per process).
  c.prefetch = 2  # Batches prefetched.
  c.lock()
  return c


def _check(input_config) -> None:
  config_fields.check_fields(input_config, default_config(),
                             'The train input config (config.input)',
                             'ddep_jax.data.input_pipeline.default_config()', exact=True)


def train_crop_size(input_config, task: str) -> tuple[int, int]:
  """(height, width) of training images: `input.crop_size`, or the task's / dataset's default."""
  _check(input_config)
  crop_size = input_config.crop_size
  if crop_size is None:
    spec = datasets.get_spec(input_config.dataset)
    crop_size = tuple(spec.crop_size) if task == 'segment' else reading.PRETRAIN_CROP_SIZE
  return int(crop_size[0]), int(crop_size[1])


def _subset_ids(source: reading.Source, input_config) -> list[str] | None:
  """Sorted ids of the labelled subset, or None for the whole split."""
  fraction = input_config.label_fraction
  count = input_config.label_count
  split_file = input_config.split_file
  if split_file and (fraction is not None or count is not None):
    raise ValueError(f'Give input.split_file ({split_file}) or label_fraction / label_count, '
                     'not both.')
  if not split_file and count is None and (fraction is None or fraction == 1.0):
    return None
  if source.spec.id_key is None:
    raise ValueError(f'Label-efficient subsets need example ids, and {source.describe()} has no '
                     'id feature.')
  all_ids = reading.read_ids(source, source.split)
  if split_file:
    chosen = subsets.read_split_file(split_file)
    missing = sorted(set(chosen) - set(all_ids))
    if missing:
      raise ValueError(f'Split file {split_file} lists {len(missing)} ids that are not in '
                       f'{source.describe()}, e.g. {missing[:5]}.')
    return sorted(chosen)
  return subsets.select_subset(all_ids, label_fraction=fraction, label_count=count,
                               subset_seed=int(input_config.subset_seed))


def _train_preprocess(source: reading.Source, input_config, seed: int) -> Callable:
  """Encoded example with '_epoch' -> one training example of `source.task`."""
  spec, task = source.spec, source.task
  crop_size = train_crop_size(input_config, task)
  flip = bool(input_config.flip)
  scale_range = tuple(float(s) for s in input_config.scale_range)
  area_range = tuple(float(a) for a in input_config.inception_crop)
  aspect_range = tuple(float(a) for a in input_config.inception_aspect_ratio)
  if not 0 < scale_range[0] <= scale_range[1]:
    raise ValueError(f'input.scale_range={scale_range} must be (low, high) with 0 < low <= high.')
  reference_size = input_config.reference_size
  reference_size = None if reference_size is None else tuple(reference_size)
  if reference_size is not None and (len(reference_size) != 2 or min(reference_size) <= 0):
    raise ValueError(f'input.reference_size={reference_size} must be (long side, short side) > 0, '
                     'e.g. (2048, 512), or None for the stored image size.')
  if not 0 < area_range[0] <= area_range[1] <= 1:
    raise ValueError(f'input.inception_crop={area_range} must be an area range in (0, 1].')

  def preprocess(ex):
    seed_ = preprocessing.example_seed(seed, ex['_epoch'], ex['key'])
    image, mask = reading.decode(source, ex)
    out = {_POSITION: ex[_POSITION]}
    if task == 'segment':
      # Unexpected stored values are counted over the whole mask, not only the crop.
      out['num_invalid_label_pixels'] = preprocessing.count_unexpected_labels(
          mask, spec.label_table)
      image, mask = preprocessing.random_rescale_crop_flip(
          image, mask, seed_, crop_size=crop_size, scale_range=scale_range, flip=flip,
          reference_size=reference_size)
      out['label'] = preprocessing.map_labels(mask, spec.label_table)
    else:
      image = preprocessing.inception_crop_flip(
          image, seed_, crop_size=crop_size, area_range=area_range,
          aspect_ratio_range=aspect_range, flip=flip)
      if task == 'classify':
        out['label'] = tf.cast(ex['label'], tf.int32)
    out['image'] = preprocessing.normalize_image(image)
    return out

  return preprocess


class TrainIterator(Iterator[dict[str, np.ndarray]]):
  """Infinite iterator of this process's train batches (numpy dicts), from `start_step` on.

  Attributes:
    step: the step of the next batch.
    num_examples: examples in the (sub)set over all processes (one epoch).
    local_batch_size: examples per batch on this process.
    subset_ids: sorted ids of the labelled subset, or None for the whole split.
    num_skipped_corrupt: examples skipped as undecodable so far (input.skip_corrupt).
    dataset: the underlying tf.data.Dataset (batches carry an extra '_position').
  """

  def __init__(self, dataset, *, start_step, local_batch_size, num_examples, subset_ids,
               diagnose):
    self.dataset = dataset
    self.step = start_step
    self.local_batch_size = local_batch_size
    self.num_examples = num_examples
    self.subset_ids = subset_ids
    self.num_skipped_corrupt = 0
    self._start_position = start_step * local_batch_size
    self._num_yielded = 0
    self._diagnose = diagnose
    self._iterator = dataset.as_numpy_iterator()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._iterator)
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
      self._diagnose(self.step, e)
      raise
    positions = batch.pop(_POSITION)
    self._num_yielded += len(positions)
    # max(): with deterministic=False elements may arrive out of order.
    skipped = int(positions.max()) + 1 - self._start_position - self._num_yielded
    if skipped > self.num_skipped_corrupt:
      logging.warning('Skipped %d undecodable example(s) so far (input.skip_corrupt=True).',
                      skipped)
    self.num_skipped_corrupt = skipped
    self.step += 1
    return batch


def get_train_dataset(input_config, task: str, *, seed: int, start_step: int = 0,
                      process_index: int | None = None, process_count: int | None = None,
                      workdir: str | None = None) -> TrainIterator:
  """This process's infinite stream of train batches, starting at batch `start_step`.

  Batches from `start_step` on equal those an uninterrupted iterator yields after `start_step`
  batches (given the same config, seed and process count), without decoding skipped images.
  When a labelled subset is used, process 0 writes its ids to `<workdir>/subset_ids.txt`.
  """
  _check(input_config)
  process_index, process_count = reading.processes(process_index, process_count)
  local_batch = reading.local_batch_size(int(input_config.batch_size), process_count)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  source = reading.open_source(input_config.dataset, input_config.split, task,
                               input_config.data_dir)
  subset = _subset_ids(source, input_config)
  if subset is not None and workdir and process_index == 0:
    subsets.write_split_file(fileio.join(workdir, SUBSET_IDS_FILENAME), subset)
  stream = reading.process_stream(source, subset, process_index, process_count)
  if stream.num_examples == 0:
    raise ValueError(f'Process {process_index} of {process_count} gets no examples of '
                     f'{source.describe()} ({stream.total_examples} in total); use fewer '
                     'processes or more examples.')
  base = stream.dataset
  cache = input_config.cache
  if cache or (cache is None and subset is not None):
    base = base.cache()
  shuffle_buffer = min(int(input_config.shuffle_buffer), stream.num_examples)
  n = stream.num_examples

  def epoch_examples(epoch):
    ds = base
    if shuffle_buffer > 1:
      # A fresh, seeded shuffle per epoch: epoch e's order is a function of (seed, e) alone.
      shuffle_seed = tf.random.experimental.stateless_fold_in(
          tf.constant([seed, 0x5F1E], tf.int64), epoch)[0]
      ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    return ds.enumerate().map(
        lambda i, ex: {**ex, '_epoch': epoch, _POSITION: epoch * n + i})

  def encoded_stream(position: int) -> tf.data.Dataset:
    # Whole epochs are skipped arithmetically, the rest of the epoch before decoding.
    ds = tf.data.Dataset.counter(start=position // n).flat_map(epoch_examples)
    return ds.skip(position % n)

  preprocess = _train_preprocess(source, input_config, seed)

  ds = encoded_stream(start_step * local_batch).map(
      preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  if input_config.skip_corrupt:
    ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(int(input_config.prefetch))
  ds = ds.with_options(reading.tf_options(bool(input_config.deterministic),
                                          int(input_config.threadpool_size)))

  def diagnose(step, error):
    reading.raise_corrupt(source, encoded_stream(step * local_batch).take(local_batch),
                          preprocess, error)

  return TrainIterator(ds, start_step=start_step, local_batch_size=local_batch,
                       num_examples=stream.total_examples, subset_ids=subset, diagnose=diagnose)
