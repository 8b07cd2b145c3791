"""The train loop end to end on the embedded digit scenes, with the tiny model.

Covers SIGTERM (preemption), non-finite losses, re-evaluating a checkpoint from the command line
and the throughput metrics every run logs. The three-stage chain with the weights each stage
carries: test_configs.py (with every path on gs://); kills at any moment: test_train_resilience.py.
"""

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import types

import flax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from ddep_jax import checkpoints
from ddep_jax import initialization
from ddep_jax import optimizer as optimizer_lib
from ddep_jax import performance
from ddep_jax import sharding
from ddep_jax import train
from ddep_jax import train_step as train_step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO, 'tests', 'tiny_config.py')
sys.path.insert(0, os.path.join(REPO, 'tests'))
import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position
import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position


def _config(data_dir, **arg):
  arg = ','.join(f'{k}={v}' for k, v in dict(data_dir=data_dir, **arg).items())
  return tiny_config.get_config(arg)


def _flat(params):
  return {'/'.join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


def _subprocess_env():
  # The session's compilation cache (tests/conftest.py) is inherited through os.environ.
  return dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2',
              XLA_FLAGS=xla_flags.flags())


def _main_command(config_arg, workdir):
  return [sys.executable, '-m', 'ddep_jax.main', f'--config={CONFIG_FILE}:{config_arg}',
          f'--workdir={workdir}']


def _fresh_state(config):
  """The state a run of `config` starts from (same seed, same init) before any init_from."""
  model = initialization.build_model_for(config)
  image_shape = initialization.image_shape(config)  # pylint: disable=protected-access
  abstract = train_step_lib.abstract_params(config, model, image_shape)
  opt = optimizer_lib.make_optimizer(config, abstract, config.total_steps)
  mesh = sharding.make_mesh(config)
  state, _ = train_step_lib.create_train_state(config, model, opt, mesh, image_shape)
  return state


def test_init_from_errors_name_paths_and_shapes(digit_scenes_dir, tmp_path):
  config = _config(digit_scenes_dir, task='segment', steps=1)
  with config.unlocked():
    config.init_from.checkpoint = str(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='No Orbax checkpoint found'):
    initialization.initial_params(config, _fresh_state(config))  # pylint: disable=protected-access


def test_a_misspelt_or_missing_init_from_field_fails_loudly():
  # A misspelt init_from.checkpoint would otherwise train from a random initialisation.
  config = tiny_config.get_config('task=denoise')
  init_from = config.init_from.to_dict()
  init_from['chekpoint'] = init_from.pop('checkpoint')
  with config.unlocked():
    config.init_from = ml_collections.ConfigDict(init_from)
  message = re.escape("config.init_from has unknown field(s) ['chekpoint']; misspelt? Its fields "
                      "are those of ddep_jax.initialization.default_config(): ['checkpoint', "
                      "'npz', 'npz_drop_head', 'params', 'step'].")
  with pytest.raises(ValueError, match=message):
    train.check_config(config)
  with pytest.raises(ValueError, match=message):
    initialization.initial_params(config, state=None)  # Before the state is touched.
  config = tiny_config.get_config('task=denoise')
  init_from = config.init_from.to_dict()
  del init_from['step']
  with config.unlocked():
    config.init_from = ml_collections.ConfigDict(init_from)
  with pytest.raises(ValueError, match=re.escape("config.init_from has no field(s) ['step']")):
    train.check_config(config)


def test_sigterm_saves_and_exits_then_resumes(digit_scenes_dir, tmp_path):
  arg = f'task=denoise,steps=400,checkpoint_every=1000,data_dir={digit_scenes_dir}'
  env = _subprocess_env()
  process = subprocess.Popen(_main_command(arg, tmp_path / 'run'), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  seen_training = threading.Event()
  log_lines = []

  def read_log():
    for line in process.stderr:
      log_lines.append(line)
      if 'train/loss' in line:
        seen_training.set()

  reader = threading.Thread(target=read_log, daemon=True)
  reader.start()
  assert seen_training.wait(600), ''.join(log_lines[-30:])
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=300) == 0, ''.join(log_lines[-30:])
  reader.join(timeout=10)
  assert any('Preempted: checkpoint saved at step' in line for line in log_lines)
  ckpt = checkpoints.Checkpointer(str(tmp_path / 'run'))
  saved = ckpt.latest_step()
  ckpt.close()
  # Saved at the step where the signal arrived: not a periodic save, and not the end.
  assert saved is not None and 0 < saved < 400
  assert not (tmp_path / 'run' / 'results' / 'val.json').exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(digit_scenes_dir, tmp_path):
  # An absurd learning rate blows the parameters up within a few steps.
  config = _config(digit_scenes_dir, task='segment', steps=6, checkpoint_every=1, lr='1e38')
  with config.unlocked():
    config.log_every_steps = 1
  with pytest.raises(train.NonFiniteLossError, match='Non-finite'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  params, step = checkpoints.load_params(str(tmp_path / 'run'))
  assert step < 6
  assert all(np.all(np.isfinite(v)) for v in _flat(params).values())


def test_evaluate_command_reproduces_final_results(digit_scenes_dir, tmp_path):
  arg = f'task=segment,steps=8,checkpoint_every=2,data_dir={digit_scenes_dir}'
  config = _config(digit_scenes_dir, task='segment', steps=8, checkpoint_every=2)
  config.peak_tflops_per_device = 1e-3  # A fake device of 1 GFLOP/s, for train/mfu.
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  _assert_logs_cost_analysis_flops_and_mfu(config, str(tmp_path / 'run'))
  env = _subprocess_env()
  printed = subprocess.run(
      [sys.executable, '-m', 'ddep_jax.evaluate', f'--config={CONFIG_FILE}:{arg}',
       f'--workdir={tmp_path / "eval"}', f'--checkpoint={tmp_path / "run"}'],
      env=env, check=True, capture_output=True, timeout=600, text=True).stdout
  with open(tmp_path / 'eval' / 'results' / 'val.json') as f:
    evaluated = json.load(f)
  assert evaluated['checkpoint_step'] == 8
  # The per-class table is printed and written next to the JSON, as the trainer writes it.
  with open(tmp_path / 'eval' / 'results' / 'val_per_class.md') as f:
    table = f.read()
  assert table.strip() in printed
  assert f"| {100 * evaluated['aAcc']:.2f} | {100 * evaluated['mIoU']:.2f} |" in table
  for name, iou in evaluated['per_class_iou'].items():
    assert f'| {name} ' in table and f'{100 * iou:.2f}' in table, name
  assert (tmp_path / 'run' / 'results' / 'val_per_class.md').exists()
  # Counts of the input that reached the loss / metric as ignore (none in these scenes).
  assert evaluated['num_invalid_label_pixels'] == 0
  assert (results['val']['train_num_invalid_label_pixels'],
          results['val']['train_num_skipped_corrupt']) == (0, 0)
  assert evaluated['mIoU'] == pytest.approx(results['val']['mIoU'], abs=1e-7)
  assert evaluated['per_class_iou'].keys() == results['val']['per_class_iou'].keys()
  for name, iou in results['val']['per_class_iou'].items():
    assert evaluated['per_class_iou'][name] == pytest.approx(iou, abs=1e-7, nan_ok=True)


def test_train_input_counts_reach_the_log_and_the_results(caplog):
  iterator = types.SimpleNamespace(num_skipped_corrupt=0)
  counts = train._InputCounts(iterator)  # pylint: disable=protected-access
  counts.add({'label': np.zeros((2, 4, 4)), 'num_invalid_label_pixels': np.array([4, 0])})
  counts.add({'label': np.zeros((2, 4, 4)), 'num_invalid_label_pixels': np.array([0, 3])})
  iterator.num_skipped_corrupt = 2
  with caplog.at_level(logging.WARNING):
    counts.log()
  assert '7 label pixels held values outside' in caplog.text
  assert '2 corrupt examples skipped' in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    counts.log()  # Nothing new: no second warning.
  assert not caplog.text
  assert counts.summed() == {'train_num_invalid_label_pixels': 7, 'train_num_skipped_corrupt': 2}


def test_config_errors_are_clear(digit_scenes_dir):
  config = _config(digit_scenes_dir, task='segment')
  with config.unlocked():
    config.num_classes = 5
  with pytest.raises(ValueError, match='num_classes=5 but dataset'):
    train.check_config(config)
  config = _config(digit_scenes_dir, task='segment')
  with config.unlocked():
    config.total_steps = 0
  with pytest.raises(ValueError, match='total_steps or config.total_epochs'):
    train.check_config(config)
  config = _config(digit_scenes_dir, task='segment')
  config.class_weights = (1.0,) * (config.num_classes - 1)
  with pytest.raises(ValueError, match='one weight per class'):
    train.check_config(config)
  config = _config(digit_scenes_dir, task='denoise')
  config.class_weights = (1.0,) * 11
  with pytest.raises(ValueError, match='has none'):
    train.check_config(config)
  with pytest.raises(ValueError, match='Unknown config argument'):
    tiny_config.get_config('tsk=segment')


def _logged_scalars(workdir):
  scalars = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag.startswith('train/'):
          scalars.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
  return scalars


def _assert_logs_cost_analysis_flops_and_mfu(config, workdir):
  """The run logged its step's FLOPs (XLA cost analysis) and MFU against the configured peak."""
  logged = _logged_scalars(workdir)
  # The same step compiled again here (a hit in the session's compilation cache).
  model = initialization.build_model_for(config)
  image_shape = initialization.image_shape(config)  # pylint: disable=protected-access
  abstract = train_step_lib.abstract_params(config, model, image_shape)
  opt = optimizer_lib.make_optimizer(config, abstract, config.total_steps)
  mesh = sharding.make_mesh(config)
  state, shardings = train_step_lib.create_train_state(config, model, opt, mesh, image_shape)
  size = (config.input.batch_size, *image_shape[1:])
  batch = {'image': np.zeros(size, np.float32), 'label': np.zeros(size[:-1], np.int32)}
  batch = sharding.global_batch(
      {k: batch[k] for k in train_step_lib.BATCH_KEYS[config.task]}, mesh)
  step = train_step_lib.make_train_step(config, model, opt, mesh, shardings)
  flops = performance.step_flops_per_device(step.lower(state, batch).compile())
  assert flops > 1e6 and len(logged['train/step_flops_per_device']) >= 1
  np.testing.assert_allclose(logged['train/step_flops_per_device'], flops, rtol=1e-6)
  np.testing.assert_allclose(logged['train/mfu'],
                             np.asarray(logged['train/tflops_per_device']) / 1e-3, rtol=1e-5)
  np.testing.assert_allclose(logged['train/images_per_sec'],
                             8 * np.asarray(logged['train/images_per_sec_per_device']), rtol=1e-5)
  assert min(logged['train/images_per_sec']) > 0
  assert all(0 <= v <= 1 for v in logged['train/input_wait_fraction'])
