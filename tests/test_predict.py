"""`ddep_jax.predict` on image files written here, from a tiny segmentation checkpoint."""

import io
import os
import re
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from ddep_jax import checkpoints
from ddep_jax import evaluate
from ddep_jax import fileio
from ddep_jax import inference
from ddep_jax import initialization
from ddep_jax import predict as predict_lib
from ddep_jax import sharding
from ddep_jax import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gcs_emulator  # pylint: disable=g-import-not-at-top,wrong-import-position
import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def _config(task='segment'):
  config = tiny_config.get_config(f'task={task}')
  if task == 'segment':
    # Multi-scale: 37x53 runs at 28x40 (padded to 32x48) and 37x53 (padded to 48x64). Flips add
    # nothing here but compile time (each protocol variant is one more forward pass to compile).
    config.evals.val.scales = (0.75, 1.0)
  return config


def _save_run(workdir, config, seed=0):
  """A run directory as the trainer leaves it: config.json and an Orbax checkpoint (step 4)."""
  model = initialization.build_model_for(config)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))['params']
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda s: (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]) or 1)).astype(
          np.float32), shapes)
  train._save_config(config, str(workdir))  # pylint: disable=protected-access
  checkpointer = checkpoints.Checkpointer(str(workdir), asynchronous=False)
  checkpointer.save(4, {'params': params}, {'step': 4, 'task': config.task,
                                            'model_name': config.model.name})
  checkpointer.close()
  return params


@pytest.fixture(scope='module', name='run')
def run_fixture(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  config = _config()
  _save_run(workdir, config)
  loaded_config, params, step = predict_lib.load_run(str(workdir))
  assert step == 4
  return str(workdir), loaded_config, params


def _image(height, width, seed=0, channels=3):
  shape = (height, width) if channels == 1 else (height, width, channels)
  return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def test_label_map_equals_evaluate(run):
  """predict() gives the labels evaluate's jitted step computes for the same odd-sized image."""
  _, config, params = run
  image = _image(37, 53)
  labels = predict_lib.predict(params, config, image)
  assert labels.shape == (37, 53) and labels.dtype == np.int32
  assert len(np.unique(labels)) > 1  # Not a trivially constant prediction.

  model = initialization.build_model_for(config)
  mesh = sharding.make_mesh(config, devices=jax.devices()[:1])  # A batch of one image.
  evaluator = evaluate.Evaluator('val', config, config.evals.val, model, mesh)
  batch = sharding.global_batch({'image': (image.astype(np.float32) / 127.5 - 1.0)[None],
                                 'label': np.zeros((1, 37, 53), np.int32),
                                 'valid': np.ones(1, bool),
                                 'orig_size': np.array([[37, 53]], np.int32)}, mesh)
  sizes = np.array([[37, 53]], np.int32)
  stats = evaluator._segment_statistics(params, batch, sizes)  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(stats['predictions'][0]), labels)


def test_eval_resize_is_honoured_and_undone(run):
  """With the eval's `resize`, the image is inferred at the eval size (the input pipeline's TF
  resize) and the probabilities are resized back to the image's own size before the argmax."""
  _, config, params = run
  config = ml_collections.ConfigDict(config.to_dict())
  config.evals.val.scales = (1.0,)  # One forward pass: the resize is what is under test.
  image = _image(37, 53, seed=1)
  plain = predict_lib.predict(params, config, image)
  config.evals.val.resize = 24  # Short side 24: 24 x 34.
  labels = predict_lib.predict(params, config, image)
  assert labels.shape == (37, 53)
  assert not np.array_equal(labels, plain)

  resized = tf.image.resize(image, (24, 34), method='bilinear').numpy()
  model = initialization.build_model_for(config)
  probabilities = inference.predict_probabilities(
      lambda x: model.apply({'params': params}, x, train=False)[0], resized[None] / 127.5 - 1.0,
      mode='whole', scales=(1.0,), flip=False, crop_size=None, stride=None, size_divisor=16)
  back = jax.image.resize(probabilities, (1, 37, 53, probabilities.shape[-1]), 'linear')
  np.testing.assert_array_equal(labels, np.argmax(back, axis=-1)[0])

  config = ml_collections.ConfigDict(dict(config.to_dict(), evals={'val': dict(
      config.evals.val.to_dict(), resize=(37, 53))}))  # The image's own size: nothing to do.
  np.testing.assert_array_equal(predict_lib.predict(params, config, image), plain)


def test_predict_files_writes_keeps_and_reports(run, tmp_path):
  workdir, config, params = run
  images = tmp_path / 'images'
  images.mkdir()
  # The size of the test above: its compiled program is reused (each new size compiles anew).
  rgb, gray, rgba = _image(37, 53, 1), _image(37, 53, 2, channels=1), _image(37, 53, 3, 4)
  Image.fromarray(rgb).save(images / 'rgb.png')
  Image.fromarray(gray).save(images / 'gray.png')
  Image.fromarray(rgba, 'RGBA').save(images / 'rgba.png')
  (images / 'broken.png').write_bytes(b'not a png')
  out = tmp_path / 'out'

  report = predict_lib.predict_files(os.path.join(workdir, 'checkpoints'), str(images / '*.png'),
                                     str(out))
  assert sorted(os.path.basename(p) for p in report['written']) == ['gray.png', 'rgb.png',
                                                                     'rgba.png']
  assert len(report['failed']) == 1 and 'broken.png' in report['failed'][0]

  expected = {'rgb': rgb, 'gray': np.repeat(gray[..., None], 3, -1), 'rgba': rgba[..., :3]}
  names = predict_lib.class_names_of(config)
  for stem, image in expected.items():
    labels = np.asarray(Image.open(out / f'{stem}_labels.png'))
    np.testing.assert_array_equal(labels, predict_lib.predict(params, config, image))
    overlay = np.asarray(Image.open(out / f'{stem}_overlay.png'))
    height, width = image.shape[:2]
    assert overlay.shape[1] == width + predict_lib.LEGEND_WIDTH and overlay.shape[0] >= height
    np.testing.assert_array_equal(overlay, predict_lib.overlay(image, labels, names))
    blend = np.round(0.5 * image + 0.5 * predict_lib.palette(len(names))[labels])
    np.testing.assert_allclose(overlay[:height, :width], blend, atol=1)

  # A second run keeps what is there: nothing rewritten, the bad file still named.
  before = os.path.getmtime(out / 'rgb_labels.png')
  again = predict_lib.predict_files(workdir, str(images), str(out))
  assert len(again['skipped']) == 3 and not again['written'] and len(again['failed']) == 1
  assert os.path.getmtime(out / 'rgb_labels.png') == before


def test_predict_files_with_every_path_on_gcs(run, tmp_path, monkeypatch):
  """Checkpoint, config.json, images and outputs on gs:// (an emulator): the local run's labels,
  and no local `gs:` directory (an `os.path` call on a URL makes one relative to the cwd)."""
  workdir, config, params = run
  monkeypatch.chdir(tmp_path)
  images = {'a': _image(37, 53, 4), 'b': _image(37, 53, 5)}  # The size the tests above compiled.
  local_images = tmp_path / 'images'
  local_images.mkdir()
  for stem, image in images.items():
    Image.fromarray(image).save(local_images / f'{stem}.png')
  local = predict_lib.predict_files(workdir, str(local_images), str(tmp_path / 'out'))
  assert len(local['written']) == 2

  with gcs_emulator.running() as environment, gcs_emulator.patched_environ(environment):
    root = f'gs://{gcs_emulator.BUCKET}/predict'
    _save_run(f'{root}/run', _config())  # The fixture's parameters (same seed).
    for stem in images:
      fileio.write_bytes(f'{root}/images/{stem}.png', (local_images / f'{stem}.png').read_bytes())
    # config.json is found two levels up, next to checkpoints/.
    report = predict_lib.predict_files(f'{root}/run/checkpoints/4', f'{root}/images/*.png',
                                       f'{root}/out')
    assert report == {'written': [f'{root}/images/a.png', f'{root}/images/b.png'],
                      'skipped': [], 'failed': []}
    assert fileio.listdir(f'{root}/out') == sorted(os.listdir(tmp_path / 'out'))
    for name in os.listdir(tmp_path / 'out'):
      remote = np.asarray(Image.open(io.BytesIO(fileio.read_bytes(f'{root}/out/{name}'))))
      np.testing.assert_array_equal(remote, np.asarray(Image.open(tmp_path / 'out' / name)))
    again = predict_lib.predict_files(f'{root}/run', f'{root}/images', f'{root}/out')
    assert len(again['skipped']) == 2 and not again['written']
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'out' / 'a_labels.png')),
                                predict_lib.predict(params, config, images['a']))
  assert not os.path.exists(tmp_path / 'gs:')


def test_errors_name_the_file(run, tmp_path):
  workdir, _, _ = run
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='No image files in .*empty'):
    predict_lib.predict_files(workdir, str(empty), str(tmp_path / 'out'))
  deep = tmp_path / 'deep.png'
  Image.fromarray(np.zeros((8, 8), np.uint16)).save(deep)  # 16-bit grayscale.
  with pytest.raises(ValueError, match='deep.png: unsupported image mode'):
    predict_lib.read_image(str(deep))

  denoise_run = tmp_path / 'denoise_run'
  denoise_run.mkdir()
  train._save_config(_config('denoise'), str(denoise_run))  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='denoise_run/config.json is the config of a '
                     "task='denoise' run"):
    predict_lib.load_run(str(denoise_run))


def test_protocol_defaults_come_from_the_eval_default_and_a_misspelt_field_fails():
  config = _config()
  with config.unlocked():
    config.evals.val = ml_collections.ConfigDict(dict(config.evals.val.to_dict(), flip_=True))
  with pytest.raises(ValueError, match=re.escape(
      "config.evals.val has unknown key(s) ['flip_']; misspelt? The known keys are [")):
    predict_lib.protocol_of(config)
  with config.unlocked():
    config.evals = ml_collections.ConfigDict()
  # No evals: evaluate.default_eval_config()'s protocol, the whole image at its own size.
  assert predict_lib.protocol_of(config) == predict_lib.Protocol(
      mode='whole', scales=(1.0,), flip=False, crop_size=None, stride=None, size_divisor=16,
      resize=None)


def test_original_label_ids():
  config = tiny_config.get_config('task=segment')
  config.input.dataset, config.num_classes = 'cityscapes', 19
  ids = predict_lib.original_ids(config)
  assert (ids[0], ids[1], ids[18]) == (7, 8, 33)  # road, sidewalk, bicycle (Cityscapes ids).
