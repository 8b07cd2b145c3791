"""Train and eval tf.data pipelines over TFDS: sharding, resumable order, eval padding.

Train (`get_train_dataset`): each process reads its own disjoint part of the split (or of the
labelled subset), in a fixed order. Epoch `e` is that part shuffled with a seed derived from
(seed, e); augmentations use stateless ops seeded by (seed, e, example id). The stream is the
concatenation of epochs 0, 1, 2, ... cut into local batches, so the batch at step `k` is a pure
function of the config, seed and k: resuming at `start_step=k` skips whole epochs arithmetically
and the rest of the epoch before any image is decoded.

Eval (`get_eval_dataset`): whole images (optionally resized), padded to one shape with label 255,
and padded with `valid=False` examples so that every process runs the same number of batches.

Batches are dicts of numpy arrays, this process's slice of the global batch:
  denoise:  {'image'}
  segment:  {'image', 'label', 'num_invalid_label_pixels'}
  classify: {'image', 'label'}
and eval batches add 'valid' bool [B], 'orig_size' int32 [B, 2] and 'id_hash' int32 [B] (a
stable hash of the example's id, 0 for padding: it keys per-example evaluation randomness, such as
the denoising noise, by the example rather than by its place in a batch, which depends on the
batch size and the number of processes). `num_invalid_label_pixels` (int32 [B]) counts mask
pixels holding values the dataset never uses; they are trained/evaluated as ignore (255), and the
trainer can sum the count to notice corrupt masks.
"""

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

from absl import logging
import ml_collections
from ml_collections import config_dict
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddep_jax import fileio
from ddep_jax.data import datasets
from ddep_jax.data import preprocessing
from ddep_jax.data import subsets

TASKS = ('denoise', 'segment', 'classify')
SUBSET_IDS_FILENAME = 'subset_ids.txt'
# Crop of denoising / classification pretraining when config crop_size is None (paper §5).
PRETRAIN_CROP_SIZE = (224, 224)
_POSITION = '_position'  # Index of an example in this process's stream; stripped from batches.


def default_config() -> ml_collections.ConfigDict:
  """The `config.input` section (train input)."""
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
  return c


def default_eval_config() -> ml_collections.ConfigDict:
  """One entry of `config.evals` (input fields; the lead adds mode / scales / flip ...)."""
  c = ml_collections.ConfigDict()
  c.dataset = 'digit_scenes'
  c.split = 'validation'
  c.batch_size = 8  # Global.
  # None: original resolution (the metric is computed there, as MMSegmentation does); an int:
  # resize so the short side has this length (e.g. ADE20K 512); (h, w): fixed size. Labels are
  # resized with nearest neighbour, so with a resize the metric is computed at that resolution.
  # For classify / denoise: an int S resizes the short side to S and takes the central SxS crop
  # (None: 224), (h, w) resizes to exactly that.
  c.resize = None
  # Padded (height, width) of eval batches; None: the largest image in the split (after resize)
  # rounded up to a multiple of pad_multiple.
  c.pad_to = config_dict.placeholder(tuple)
  c.pad_multiple = 32
  # Segmentation inference (`ddep_jax.inference.plan`): window sides of images smaller than the
  # crop are padded (with 0, after normalisation) to a multiple of this; None: the model's size
  # divisor, MMSegmentation's padding. Coarser steps compile fewer programs.
  c.window_step = config_dict.placeholder(int)
  c.data_dir = config_dict.placeholder(str)
  return c


def _field(config, name: str, default: Any = None) -> Any:
  """config.name, or `default` when the field is absent (dicts and ConfigDicts alike)."""
  try:
    value = config[name]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


def _tuple(value) -> tuple | None:
  return None if value is None else tuple(value)


# ------------------------------------------------------------------------------------------
# Processes, options, reading.
# ------------------------------------------------------------------------------------------


def _processes(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, {process_count}).')
  return process_index, process_count


def local_batch_size(batch_size: int, process_count: int) -> int:
  """Global batch / process count; an error when it does not divide."""
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f'Global batch_size={batch_size} must be a positive multiple of the '
                     f'process count ({process_count}); every process reads batch_size / '
                     'process_count examples per step.')
  return batch_size // process_count


def _options(deterministic: bool, threadpool_size: int) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  options.autotune.enabled = True
  # A private pool keeps tf.data off the threads that feed the accelerators (big_vision).
  options.threading.private_threadpool_size = threadpool_size
  options.threading.max_intra_op_parallelism = 1
  return options


@dataclasses.dataclass(frozen=True)
class _Source:
  """An opened dataset and what the task reads from it."""
  spec: datasets.DatasetSpec
  builder: tfds.core.DatasetBuilder
  task: str
  split: str

  @property
  def label_key(self) -> str | None:
    return None if self.task == 'denoise' else self.spec.label_key

  @property
  def keys(self) -> list[str]:
    return [k for k in (self.spec.image_key, self.label_key, self.spec.id_key) if k]

  def describe(self) -> str:
    return f'dataset {self.spec.name!r} (TFDS {self.spec.tfds_name!r}, split {self.split!r})'


def _open(name: str, split: str, task: str, data_dir) -> _Source:
  if task not in TASKS:
    raise ValueError(f'task must be one of {TASKS}, got {task!r}.')
  spec = datasets.get_spec(name)
  builder = datasets.load_builder(spec, data_dir)
  source = _Source(spec, builder, task, split)
  features = builder.info.features
  if task == 'segment' and spec.kind != datasets.SEGMENTATION:
    raise ValueError(f'task "segment" needs a segmentation dataset; {source.describe()} has no '
                     'segmentation masks.')
  if task == 'classify' and not isinstance(datasets.label_feature(spec, builder),
                                           tfds.features.ClassLabel):
    raise ValueError(f'task "classify" needs a ClassLabel feature {spec.label_key!r}; '
                     f'{source.describe()} has features {sorted(features.keys())}.')
  datasets.check_features(spec, builder, source.keys)
  split_names = list(builder.info.splits.keys())
  base_splits = [s.split('[')[0] for s in split.split('+')]
  unknown = [s for s in base_splits if s not in split_names]
  if unknown:
    raise ValueError(f'Split {split!r} of {source.describe()}: unknown split(s) {unknown}; the '
                     f'prepared dataset has {split_names}.')
  return source


def _read(source: _Source, split) -> tf.data.Dataset:
  """Encoded examples {'key', 'image' (bytes), ['label']} in the split's fixed order."""
  spec, label_key = source.spec, source.label_key
  skip = {spec.image_key: tfds.decode.SkipDecoding()}
  if label_key and source.task == 'segment':
    skip[label_key] = tfds.decode.SkipDecoding()
  decoders = tfds.decode.PartialDecoding({k: True for k in source.keys}, decoders=skip)
  # Unshuffled files read with a deterministic interleave: the same order on every run.
  read_config = tfds.ReadConfig(add_tfds_id=True, try_autocache=False, skip_prefetch=True)
  ds = source.builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                 read_config=read_config)

  def select(ex):
    out = {'key': ex[spec.id_key] if spec.id_key else ex['tfds_id'],
           'tfds_id': ex['tfds_id'], 'image': ex[spec.image_key]}
    if label_key:
      out['label'] = ex[label_key]
    return out

  return ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)


def _read_ids(source: _Source, split: str) -> list[str]:
  """The id feature of every example of `split`, in read order (images are not decoded)."""
  id_key = source.spec.id_key
  decoders = tfds.decode.PartialDecoding({id_key: True})
  ds = source.builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                 read_config=tfds.ReadConfig(try_autocache=False))
  ids = []
  for batch in ds.map(lambda ex: ex[id_key]).batch(4096).as_numpy_iterator():
    ids.extend(i.decode('utf-8') for i in batch)
  return ids


def _decode(source: _Source, ex: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor | None]:
  """Decodes the image (3 channels, uint8) and, for segmentation, the stored mask [H, W, 1]."""
  features = source.builder.info.features
  image = preprocessing.to_rgb(features[source.spec.image_key].decode_example(ex['image']))
  mask = None
  if source.task == 'segment':
    mask = features[source.spec.label_key].decode_example(ex['label'])
  return image, mask


# ------------------------------------------------------------------------------------------
# Label-efficient subsets and per-process streams.
# ------------------------------------------------------------------------------------------


def _subset_ids(source: _Source, input_config) -> list[str] | None:
  """Sorted ids of the labelled subset, or None for the whole split."""
  fraction = _field(input_config, 'label_fraction')
  count = _field(input_config, 'label_count')
  split_file = _field(input_config, 'split_file')
  if split_file and (fraction is not None or count is not None):
    raise ValueError(f'Give input.split_file ({split_file}) or label_fraction / label_count, '
                     'not both.')
  if not split_file and count is None and (fraction is None or fraction == 1.0):
    return None
  if source.spec.id_key is None:
    raise ValueError(f'Label-efficient subsets need example ids, and {source.describe()} has no '
                     'id feature.')
  all_ids = _read_ids(source, source.split)
  if split_file:
    chosen = subsets.read_split_file(split_file)
    missing = sorted(set(chosen) - set(all_ids))
    if missing:
      raise ValueError(f'Split file {split_file} lists {len(missing)} ids that are not in '
                       f'{source.describe()}, e.g. {missing[:5]}.')
    return sorted(chosen)
  return subsets.select_subset(all_ids, label_fraction=fraction, label_count=count,
                               subset_seed=int(_field(input_config, 'subset_seed', 0)))


@dataclasses.dataclass(frozen=True)
class _Stream:
  """This process's encoded examples for one epoch, in a fixed order."""
  dataset: tf.data.Dataset
  num_examples: int  # In this process's part.
  total_examples: int  # In all processes' parts together.


def _process_stream(source: _Source, subset: list[str] | None, process_index: int,
                    process_count: int) -> _Stream:
  """Disjoint per-process parts whose union is the split (or the subset)."""
  if subset is None:
    part = tfds.split_for_jax_process(source.split, process_index=process_index,
                                      process_count=process_count)
    splits = source.builder.info.splits
    return _Stream(_read(source, part), splits[part].num_examples,
                   splits[source.split].num_examples)
  # A subset is spread over processes by its rank in read order, so every process gets
  # len(subset) / process_count examples even when the ids cluster in a few files.
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(subset), tf.ones([len(subset)], tf.int32)),
      default_value=0)
  ds = _read(source, source.split).filter(lambda ex: table.lookup(ex['key']) > 0)
  ds = ds.enumerate().filter(lambda i, ex: i % process_count == process_index)
  ds = ds.map(lambda i, ex: ex)
  total = len(subset)
  return _Stream(ds, total // process_count + int(process_index < total % process_count), total)


# ------------------------------------------------------------------------------------------
# Train.
# ------------------------------------------------------------------------------------------


def train_crop_size(input_config, task: str) -> tuple[int, int]:
  """(height, width) of training images: `input.crop_size`, or the task's / dataset's default."""
  crop_size = _tuple(_field(input_config, 'crop_size'))
  if crop_size is None:
    spec = datasets.get_spec(input_config.dataset)
    crop_size = tuple(spec.crop_size) if task == 'segment' else PRETRAIN_CROP_SIZE
  return int(crop_size[0]), int(crop_size[1])


def _train_preprocess(source: _Source, input_config, seed: int) -> Callable:
  """Encoded example with '_epoch' -> one training example of `source.task`."""
  spec, task = source.spec, source.task
  crop_size = train_crop_size(input_config, task)
  flip = bool(_field(input_config, 'flip', True))
  scale_range = tuple(float(s) for s in _field(input_config, 'scale_range', (0.5, 2.0)))
  area_range = tuple(float(a) for a in _field(input_config, 'inception_crop', (0.05, 1.0)))
  aspect_range = tuple(float(a) for a in _field(input_config, 'inception_aspect_ratio',
                                                (3 / 4, 4 / 3)))
  if not 0 < scale_range[0] <= scale_range[1]:
    raise ValueError(f'input.scale_range={scale_range} must be (low, high) with 0 < low <= high.')
  reference_size = _tuple(_field(input_config, 'reference_size'))
  if reference_size is not None and (len(reference_size) != 2 or min(reference_size) <= 0):
    raise ValueError(f'input.reference_size={reference_size} must be (long side, short side) > 0, '
                     'e.g. (2048, 512), or None for the stored image size.')
  if not 0 < area_range[0] <= area_range[1] <= 1:
    raise ValueError(f'input.inception_crop={area_range} must be an area range in (0, 1].')

  def preprocess(ex):
    seed_ = preprocessing.example_seed(seed, ex['_epoch'], ex['key'])
    image, mask = _decode(source, ex)
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
  process_index, process_count = _processes(process_index, process_count)
  local_batch = local_batch_size(int(input_config.batch_size), process_count)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  source = _open(input_config.dataset, _field(input_config, 'split', 'train'), task,
                 _field(input_config, 'data_dir'))
  subset = _subset_ids(source, input_config)
  if subset is not None and workdir and process_index == 0:
    subsets.write_split_file(fileio.join(workdir, SUBSET_IDS_FILENAME), subset)
  stream = _process_stream(source, subset, process_index, process_count)
  if stream.num_examples == 0:
    raise ValueError(f'Process {process_index} of {process_count} gets no examples of '
                     f'{source.describe()} ({stream.total_examples} in total); use fewer '
                     'processes or more examples.')
  base = stream.dataset
  cache = _field(input_config, 'cache')
  if cache or (cache is None and subset is not None):
    base = base.cache()
  shuffle_buffer = min(int(_field(input_config, 'shuffle_buffer', 0)), stream.num_examples)
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
  skip_corrupt = bool(_field(input_config, 'skip_corrupt', False))
  deterministic = bool(_field(input_config, 'deterministic', True))

  ds = encoded_stream(start_step * local_batch).map(
      preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  if skip_corrupt:
    ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(int(_field(input_config, 'prefetch', 2)))
  ds = ds.with_options(_options(deterministic, int(_field(input_config, 'threadpool_size', 48))))

  def diagnose(step, error):
    _raise_corrupt(source, encoded_stream(step * local_batch).take(local_batch), preprocess,
                   error)

  return TrainIterator(ds, start_step=start_step, local_batch_size=local_batch,
                       num_examples=stream.total_examples, subset_ids=subset, diagnose=diagnose)


class CorruptExampleError(ValueError):
  """An example of a prepared dataset cannot be decoded."""


def _short_message(error: tf.errors.OpError) -> str:
  """The op's own words, without TF's function-node and op-name decorations."""
  message = re.sub(r'\{\{[^}]*\}\}|\[Op:[^\]]*\]( name:.*)?', '', error.message)
  return ' '.join(message.split())


def _raise_corrupt(source: _Source, encoded: tf.data.Dataset, preprocess: Callable,
                   error: Exception) -> None:
  """Finds the example(s) of a failed batch that cannot be processed and names them."""
  try:
    examples = list(encoded)
  except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
    raise CorruptExampleError(f'{source.describe()}: cannot read the prepared files '
                              f'({_short_message(e)}); re-prepare the dataset.') from error
  bad = []
  for ex in examples:
    try:
      preprocess(ex)
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
      bad.append((ex['key'].numpy().decode('utf-8'), ex['tfds_id'].numpy().decode('utf-8'),
                  _short_message(e)))
  if bad:
    names = '; '.join(f'id {i!r} (tfds_id {t!r}): {m}' for i, t, m in bad)
    raise CorruptExampleError(
        f'{source.describe()}: {len(bad)} example(s) failed to decode or preprocess: {names}. '
        'If the image data is corrupt, re-prepare the dataset from intact files, or set '
        'input.skip_corrupt=True to skip (and count) such examples in training.') from error


# ------------------------------------------------------------------------------------------
# Eval.
# ------------------------------------------------------------------------------------------


class EvalBatches:
  """Re-iterable eval batches (numpy dicts) of this process; `num_batches` per pass."""

  def __init__(self, dataset, num_batches, pad_to, diagnose):
    self.dataset = dataset
    self.num_batches = num_batches
    self.pad_to = pad_to  # (height, width) of the batches.
    self._diagnose = diagnose

  def __len__(self):
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    iterator = self.dataset.as_numpy_iterator()
    for index in range(self.num_batches):
      try:
        batch = next(iterator)
      except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
        self._diagnose(index, e)
        raise
      yield batch


def _eval_pad_to(source: _Source, eval_config, resize) -> tuple[int, int]:
  """The padded eval shape: config pad_to, else the largest (resized) image rounded up."""
  pad_to = _tuple(_field(eval_config, 'pad_to'))
  if pad_to is not None:
    return int(pad_to[0]), int(pad_to[1])
  multiple = int(_field(eval_config, 'pad_multiple', 32))
  shape = source.builder.info.features[source.spec.image_key].shape
  if resize is not None and not isinstance(resize, int):
    largest = np.array(resize)
  elif None not in shape[:2] and resize is None:
    largest = np.array(shape[:2])
  else:
    # The whole split (not only this process's part), so every process pads to the same shape.
    sizes = _read(source, source.split).map(
        lambda ex: preprocessing.eval_size(preprocessing.encoded_image_size(ex['image']), resize),
        num_parallel_calls=tf.data.AUTOTUNE)
    largest = sizes.reduce(tf.zeros([2], tf.int32), tf.maximum).numpy()
  return tuple(int(-(-int(s) // multiple) * multiple) for s in largest)


def get_eval_dataset(eval_config, task: str, *, process_index: int | None = None,
                     process_count: int | None = None) -> tuple[EvalBatches, int]:
  """This process's eval batches and their number (the same on every process).

  Each process reads a disjoint part of the split; parts are padded with `valid=False` examples
  (zero image, label 255, orig_size 0) to `num_batches * local batch`.
  """
  process_index, process_count = _processes(process_index, process_count)
  local_batch = local_batch_size(int(eval_config.batch_size), process_count)
  source = _open(eval_config.dataset, _field(eval_config, 'split', 'validation'), task,
                 _field(eval_config, 'data_dir'))
  resize = _field(eval_config, 'resize')
  if resize is not None and not isinstance(resize, int):
    resize = (int(resize[0]), int(resize[1]))
  stream = _process_stream(source, None, process_index, process_count)
  if stream.total_examples == 0:
    raise ValueError(f'{source.describe()} has no examples to evaluate.')
  num_batches = math.ceil(math.ceil(stream.total_examples / process_count) / local_batch)

  if task == 'segment':
    pad_to = _eval_pad_to(source, eval_config, resize)
  else:
    size = resize if resize is not None else PRETRAIN_CROP_SIZE[0]
    pad_to = (size, size) if isinstance(size, int) else size
  preprocess = _eval_preprocess(source, resize, pad_to)

  ds = stream.dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  num_padding = num_batches * local_batch - stream.num_examples
  padding = tf.data.Dataset.from_tensors(_padding_example(ds.element_spec)).repeat(num_padding)
  ds = ds.concatenate(padding).batch(local_batch, drop_remainder=True).prefetch(2)
  ds = ds.with_options(_options(True, 48))

  def diagnose(index, error):
    _raise_corrupt(source, stream.dataset.skip(index * local_batch).take(local_batch),
                   preprocess, error)

  return EvalBatches(ds, num_batches, pad_to, diagnose), num_batches


def _padding_example(element_spec) -> dict[str, tf.Tensor]:
  """An invalid example: zeros, label 255, valid False."""
  out = {k: tf.zeros(s.shape, s.dtype) for k, s in element_spec.items()}
  if 'label' in out and out['label'].shape.rank == 2:
    out['label'] = tf.fill(element_spec['label'].shape, tf.constant(datasets.IGNORE_LABEL,
                                                                    tf.int32))
  return out


def _eval_preprocess(source: _Source, resize, pad_to) -> Callable:
  """Encoded example -> eval example of `source.task` (see module docstring)."""
  spec, task = source.spec, source.task

  def preprocess(ex):
    image, mask = _decode(source, ex)
    out = {'valid': tf.constant(True),
           'id_hash': tf.cast(tf.strings.to_hash_bucket_fast(ex['key'], 2**31 - 1), tf.int32)}
    if task == 'segment':
      out['num_invalid_label_pixels'] = preprocessing.count_unexpected_labels(
          mask, spec.label_table)
      size = preprocessing.eval_size(tf.shape(image)[:2], resize)
      if resize is not None:
        image, mask = preprocessing.resize_image_and_mask(image, mask, size)
      labels = preprocessing.map_labels(mask, spec.label_table)
      tf.debugging.Assert(
          tf.reduce_all(size <= tf.constant(pad_to)),
          [f'{source.describe()}: an image is larger than eval pad_to={pad_to}; raise pad_to or '
           'set it to None. Example id and size:', ex['key'], size])
      image, out['label'] = preprocessing.pad_to_size(tf.cast(image, tf.float32), labels, pad_to)
      out['orig_size'] = size
    else:
      if isinstance(resize, tuple):
        image, _ = preprocessing.resize_image_and_mask(image, None, resize)
      else:
        image = preprocessing.resize_small_central_crop(image, pad_to[0])
      out['orig_size'] = tf.constant(pad_to, tf.int32)
      if task == 'classify':
        out['label'] = tf.cast(ex['label'], tf.int32)
    out['image'] = preprocessing.normalize_image(image)
    return out

  return preprocess


def dataset_info(name: str, data_dir: str | None = None) -> datasets.DatasetInfo:
  """num_classes, class names (if known) and split sizes; see `datasets.dataset_info`."""
  return datasets.dataset_info(name, data_dir)
