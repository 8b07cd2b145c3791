r"""Images/second of the train input pipelines on this machine (a benchmark, not a test).

Prepares (once) a synthetic TFDS dataset of realistic sizes in a local data_dir:
  * `cityscapes_like`: 1024x2048 PNG images with Cityscapes label ids (PNG masks), read through
    the `cityscapes` spec (19 train ids),
  * `ade_like`: 512x683 JPEG images with ADE20K-style PNG masks (values 0..150), read through the
    `ade20k` spec,
then times the denoising (inception crop to 224) and segmentation (rescale 0.5-2, crop 1024 /
512, flip) pipelines after a warm-up.

  PYTHONPATH=. python experiments/benchmarks/input_pipeline_benchmark.py --data_dir=/tmp/ddep_bench

(PYTHONPATH only when the package is not pip-installed.)
"""

import dataclasses
import os
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddep_jax.data import datasets
from ddep_jax.data import input_pipeline

_DATA_DIR = flags.DEFINE_string('data_dir', '/tmp/ddep_input_benchmark', 'Where to prepare data.')
_NUM_CITYSCAPES = flags.DEFINE_integer('num_cityscapes', 48, '1024x2048 examples to prepare.')
_NUM_ADE = flags.DEFINE_integer('num_ade', 192, '512x683 examples to prepare.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Batch size (one process).')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', 24, 'Timed batches per pipeline.')
_WARMUP = flags.DEFINE_integer('warmup_batches', 4, 'Untimed batches first.')
_THREADS = flags.DEFINE_integer('threadpool_size', 48, 'tf.data private threadpool size.')

CITYSCAPES_SHAPE = (1024, 2048)
ADE_SHAPE = (512, 683)


def _scene(shape, values, rng):
  """A smooth random scene (so PNG/JPEG sizes are realistic) and its block mask."""
  h, w = shape
  coarse = rng.integers(0, 256, (h // 64 + 1, w // 64 + 1, 3)).astype(np.float32)
  image = tf.image.resize(coarse, shape, method='bicubic').numpy()
  image += rng.normal(0.0, 6.0, image.shape)
  labels = rng.choice(np.asarray(values, np.uint8), (h // 32 + 1, w // 32 + 1))
  mask = np.kron(labels, np.ones((32, 32), np.uint8))[:h, :w]
  return np.clip(image, 0, 255).astype(np.uint8), mask[..., None]


class BenchmarkScenes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Synthetic Cityscapes-like and ADE-like scenes of the real image sizes."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='cityscapes_like'),
                     tfds.core.BuilderConfig(name='ade_like')]
  code_path = None  # Defined in a script: no checksums file to look for.

  def _info(self):
    if self.builder_config.name == 'cityscapes_like':
      features = {'image_id': tfds.features.Text(),
                  'image_left': tfds.features.Image(shape=(*CITYSCAPES_SHAPE, 3),
                                                    encoding_format='png'),
                  'segmentation_label': tfds.features.Image(shape=(*CITYSCAPES_SHAPE, 1),
                                                            encoding_format='png')}
    else:
      features = {'image_id': tfds.features.Text(),
                  'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                  'segmentation_mask': tfds.features.Image(shape=(None, None, 1),
                                                           encoding_format='png')}
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    if self.builder_config.name == 'cityscapes_like':
      for i in range(_NUM_CITYSCAPES.value):
        image, mask = _scene(CITYSCAPES_SHAPE, range(34), rng)
        key = f'city_{i:06d}_000019'
        yield key, {'image_id': key, 'image_left': image, 'segmentation_label': mask}
    else:
      for i in range(_NUM_ADE.value):
        image, mask = _scene(ADE_SHAPE, range(151), rng)
        key = f'ADE_train_{i:08d}'
        yield key, {'image_id': key, 'image': image, 'segmentation_mask': mask}


def _time(config, task, name):
  iterator = input_pipeline.get_train_dataset(config, task, seed=0, process_index=0,
                                              process_count=1)
  for _ in range(_WARMUP.value):
    next(iterator)
  start = time.perf_counter()
  for _ in range(_NUM_BATCHES.value):
    next(iterator)
  seconds = time.perf_counter() - start
  images = _NUM_BATCHES.value * config.batch_size
  print(f'{name:48s} {images / seconds:8.1f} images/s  ({images} images in {seconds:.1f} s)',
        flush=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  datasets.disable_tfds_gcs()
  for config in ('cityscapes_like', 'ade_like'):
    builder = BenchmarkScenes(config=config, data_dir=_DATA_DIR.value)
    if not builder.is_prepared():
      start = time.perf_counter()
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
      print(f'prepared {config} in {time.perf_counter() - start:.0f} s', flush=True)
  datasets.register_dataset(dataclasses.replace(
      datasets.get_spec('cityscapes'), name='bench_cityscapes',
      tfds_name='benchmark_scenes/cityscapes_like'), overwrite=True)
  datasets.register_dataset(dataclasses.replace(
      datasets.get_spec('ade20k'), name='bench_ade', tfds_name='benchmark_scenes/ade_like'),
                            overwrite=True)

  def config(dataset, **overrides):
    c = input_pipeline.default_config()
    c.dataset = dataset
    c.data_dir = _DATA_DIR.value
    c.batch_size = _BATCH_SIZE.value
    c.shuffle_buffer = 64
    c.threadpool_size = _THREADS.value
    c.update(overrides)
    return c

  print(f'{os.cpu_count()} CPUs, batch {_BATCH_SIZE.value}, {_NUM_BATCHES.value} timed batches '
        f'after {_WARMUP.value} warm-up batches', flush=True)
  _time(config('bench_cityscapes'), 'denoise', 'denoise     cityscapes-like 1024x2048 -> 224')
  _time(config('bench_ade'), 'denoise', 'denoise     ade-like 512x683 -> 224')
  _time(config('bench_cityscapes'), 'segment', 'segment     cityscapes-like, crop 1024x1024')
  _time(config('bench_ade'), 'segment', 'segment     ade-like, crop 512x512')


if __name__ == '__main__':
  app.run(main)
