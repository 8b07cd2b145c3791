"""The eval input: whole images (optionally resized), padded to one shape with label 255, and
padded with `valid=False` examples so that every process runs the same number of batches."""

import math
from collections.abc import Callable, Iterator

import ml_collections
from ml_collections import config_dict
import numpy as np
import tensorflow as tf

from ddep_jax import config_fields
from ddep_jax import constants
from ddep_jax.data import preprocessing
from ddep_jax.data import reading


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
  # Segmentation inference (`ddep_jax.inference_plan.plan`): window sides of images smaller than
  # the crop are padded (with 0, after normalisation) to a multiple of this; None: the model's
  # size divisor, MMSegmentation's padding. Coarser steps compile fewer programs.
  c.window_step = config_dict.placeholder(int)
  c.data_dir = config_dict.placeholder(str)
  return c


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


def _eval_pad_to(source: reading.Source, eval_config, resize) -> tuple[int, int]:
  """The padded eval shape: config pad_to, else the largest (resized) image rounded up."""
  pad_to = eval_config.pad_to
  if pad_to is not None:
    return int(pad_to[0]), int(pad_to[1])
  multiple = int(eval_config.pad_multiple)
  shape = source.builder.info.features[source.spec.image_key].shape
  if resize is not None and not isinstance(resize, int):
    largest = np.array(resize)
  elif None not in shape[:2] and resize is None:
    largest = np.array(shape[:2])
  else:
    # The whole split (not only this process's part), so every process pads to the same shape.
    sizes = reading.read_encoded(source, source.split).map(
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
  # Not exact: an entry of config.evals also holds its inference protocol (mode, scales, ...).
  config_fields.check_fields(eval_config, default_eval_config(),
                             'The eval config (config.evals.*)',
                             'ddep_jax.data.input_pipeline.default_eval_config()', exact=False)
  process_index, process_count = reading.processes(process_index, process_count)
  local_batch = reading.local_batch_size(int(eval_config.batch_size), process_count)
  source = reading.open_source(eval_config.dataset, eval_config.split, task,
                               eval_config.data_dir)
  resize = eval_config.resize
  if resize is not None and not isinstance(resize, int):
    resize = (int(resize[0]), int(resize[1]))
  stream = reading.process_stream(source, None, process_index, process_count)
  if stream.total_examples == 0:
    raise ValueError(f'{source.describe()} has no examples to evaluate.')
  num_batches = math.ceil(math.ceil(stream.total_examples / process_count) / local_batch)

  if task == 'segment':
    pad_to = _eval_pad_to(source, eval_config, resize)
  else:
    size = resize if resize is not None else reading.PRETRAIN_CROP_SIZE[0]
    pad_to = (size, size) if isinstance(size, int) else size
  preprocess = _eval_preprocess(source, resize, pad_to)

  ds = stream.dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  num_padding = num_batches * local_batch - stream.num_examples
  padding = tf.data.Dataset.from_tensors(_padding_example(ds.element_spec)).repeat(num_padding)
  ds = ds.concatenate(padding).batch(local_batch, drop_remainder=True).prefetch(2)
  ds = ds.with_options(reading.tf_options(True, 48))

  def diagnose(index, error):
    reading.raise_corrupt(source, stream.dataset.skip(index * local_batch).take(local_batch),
                          preprocess, error)

  return EvalBatches(ds, num_batches, pad_to, diagnose), num_batches


def _padding_example(element_spec) -> dict[str, tf.Tensor]:
  """An invalid example: zeros, label 255, valid False."""
  out = {k: tf.zeros(s.shape, s.dtype) for k, s in element_spec.items()}
  if 'label' in out and out['label'].shape.rank == 2:
    out['label'] = tf.fill(element_spec['label'].shape, tf.constant(constants.IGNORE_LABEL,
                                                                    tf.int32))
  return out


def _eval_preprocess(source: reading.Source, resize, pad_to) -> Callable:
  """Encoded example -> eval example of `source.task` (see `input_pipeline`'s docstring)."""
  spec, task = source.spec, source.task

  def preprocess(ex):
    image, mask = reading.decode(source, ex)
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
