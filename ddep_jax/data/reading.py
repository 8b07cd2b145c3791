"""What the train and eval inputs share: opening a prepared TFDS dataset for a task, reading its
encoded examples in a fixed order, this process's part of them, and naming corrupt examples.
"""

import dataclasses
import re
from collections.abc import Callable

import tensorflow as tf
import tensorflow_datasets as tfds

from ddep_jax import constants
from ddep_jax.data import datasets
from ddep_jax.data import preprocessing

# Crop of denoising / classification pretraining when config crop_size is None (paper §5).
PRETRAIN_CROP_SIZE = (224, 224)


# ------------------------------------------------------------------------------------------
# Processes, options.
# ------------------------------------------------------------------------------------------


def processes(process_index, process_count) -> tuple[int, int]:
  """(process_index, process_count), from JAX where None."""
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


def tf_options(deterministic: bool, threadpool_size: int) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  options.autotune.enabled = True
  # A private pool keeps tf.data off the threads that feed the accelerators (big_vision).
  options.threading.private_threadpool_size = threadpool_size
  options.threading.max_intra_op_parallelism = 1
  return options


# ------------------------------------------------------------------------------------------
# Opening and reading.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
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


def open_source(name: str, split: str, task: str, data_dir) -> Source:
  """The prepared dataset `name` for `task`; errors name what the dataset or split lacks."""
  if task not in constants.TASKS:
    raise ValueError(f'task must be one of {constants.TASKS}, got {task!r}.')
  spec = datasets.get_spec(name)
  builder = datasets.load_builder(spec, data_dir)
  source = Source(spec, builder, task, split)
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


def read_encoded(source: Source, split) -> tf.data.Dataset:
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


def read_ids(source: Source, split: str) -> list[str]:
  """The id feature of every example of `split`, in read order (images are not decoded)."""
  id_key = source.spec.id_key
  decoders = tfds.decode.PartialDecoding({id_key: True})
  ds = source.builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                 read_config=tfds.ReadConfig(try_autocache=False))
  ids = []
  for batch in ds.map(lambda ex: ex[id_key]).batch(4096).as_numpy_iterator():
    ids.extend(i.decode('utf-8') for i in batch)
  return ids


def decode(source: Source, ex: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor | None]:
  """Decodes the image (3 channels, uint8) and, for segmentation, the stored mask [H, W, 1]."""
  features = source.builder.info.features
  image = preprocessing.to_rgb(features[source.spec.image_key].decode_example(ex['image']))
  mask = None
  if source.task == 'segment':
    mask = features[source.spec.label_key].decode_example(ex['label'])
  return image, mask


# ------------------------------------------------------------------------------------------
# Per-process streams.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stream:
  """This process's encoded examples for one epoch, in a fixed order."""
  dataset: tf.data.Dataset
  num_examples: int  # In this process's part.
  total_examples: int  # In all processes' parts together.


def process_stream(source: Source, subset: list[str] | None, process_index: int,
                   process_count: int) -> Stream:
  """Disjoint per-process parts whose union is the split (or the subset)."""
  if subset is None:
    part = tfds.split_for_jax_process(source.split, process_index=process_index,
                                      process_count=process_count)
    splits = source.builder.info.splits
    return Stream(read_encoded(source, part), splits[part].num_examples,
                  splits[source.split].num_examples)
  # A subset is spread over processes by its rank in read order, so every process gets
  # len(subset) / process_count examples even when the ids cluster in a few files.
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(subset), tf.ones([len(subset)], tf.int32)),
      default_value=0)
  ds = read_encoded(source, source.split).filter(lambda ex: table.lookup(ex['key']) > 0)
  ds = ds.enumerate().filter(lambda i, ex: i % process_count == process_index)
  ds = ds.map(lambda i, ex: ex)
  total = len(subset)
  return Stream(ds, total // process_count + int(process_index < total % process_count), total)


# ------------------------------------------------------------------------------------------
# Corrupt examples.
# ------------------------------------------------------------------------------------------


class CorruptExampleError(ValueError):
  """An example of a prepared dataset cannot be decoded."""


def _short_message(error: tf.errors.OpError) -> str:
  """The op's own words, without TF's function-node and op-name decorations."""
  message = re.sub(r'\{\{[^}]*\}\}|\[Op:[^\]]*\]( name:.*)?', '', error.message)
  return ' '.join(message.split())


def raise_corrupt(source: Source, encoded: tf.data.Dataset, preprocess: Callable,
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
