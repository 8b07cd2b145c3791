"""Multi-host correctness on one machine: two JAX processes with real cross-process collectives.

A Cloud TPU pod runs one JAX process per host. Here two processes with 2 CPU devices each join
through `jax.distributed` on a free 127.0.0.1 port and run the trainer as users do
(`python -m ddep_jax.main ... --config.distributed.*`) or a small worker (`worker.py`) for the
lower-level checks; every result is compared with the same computation in this (single) test
process. Parameters are split over the devices of *both* processes (FSDP over all 4 devices), so
no process ever holds a whole decoder kernel.
"""

import os
import re
import signal
import sys

import jax
import ml_collections
import numpy as np
import pytest

from ddep_jax import checkpoints
from ddep_jax import evaluate
from ddep_jax import fileio
from ddep_jax import initialization
from ddep_jax import optimizer as optimizer_lib
from ddep_jax import sharding
from ddep_jax import train_step as train_step_lib
from ddep_jax.data import input_pipeline

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # harness and worker; tiny_config.
import gcs_emulator  # pylint: disable=g-import-not-at-top,wrong-import-position
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position
import worker  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG_FILE = os.path.join(harness.REPO, 'tests', 'tiny_config.py')
WORKER = os.path.join(HERE, 'worker.py')
GCS_TRAINER = os.path.join(HERE, 'gcs_trainer.py')
NUM_PROCESSES = 2
SEGMENTATION_RESULTS = ('mIoU', 'mAcc', 'aAcc', 'num_pixels', 'per_class_iou', 'per_class_acc',
                        'num_invalid_label_pixels')  # The last is summed over processes.
TIMEOUT_S = 420  # Per job; processes import TF + JAX (~10 s) and compile the tiny model.


def _worker_job(check, data_dir, out):
  return lambda i, port: [harness.PYTHON, WORKER, f'--check={check}', f'--data_dir={data_dir}',
                          f'--out={out}', f'--process_id={i}',
                          f'--num_processes={NUM_PROCESSES}', f'--port={port}']


def _trainer_overrides(**extra):
  """`--config.<name>` overrides of a trainer job: FSDP across the processes, plus `extra`."""
  return {**worker.FSDP_ACROSS_PROCESSES, **extra}


def _trainer_job(config_arg, workdir, overrides, trainer=('-m', 'ddep_jax.main')):
  flags = [f'--config.{name}={value if isinstance(value, str) else repr(value)}'
           for name, value in overrides.items()]
  return lambda i, port: [
      harness.PYTHON, *trainer, f'--config={CONFIG_FILE}:{config_arg}',
      f'--workdir={workdir}', *flags, *harness.distributed_flags(i, port, NUM_PROCESSES)]


def _trainer_config(config_arg, overrides):
  """The config a trainer job's flags make, for the reference run in this process."""
  config = tiny_config.get_config(config_arg)
  for name, value in overrides.items():
    *parents, field = name.split('.')
    section = config
    for parent in parents:
      section = section[parent]
    section[field] = value
  return config


def _all_devices_mesh():
  """This process's 8 devices on one data axis: not the jobs' mesh (FSDP over 2 x 2 devices)."""
  return sharding.make_mesh(ml_collections.ConfigDict(dict(mesh=(('data', -1),))))


def _load_json(path):
  return fileio.read_json(str(path))


def _load_npz(path):
  with np.load(path) as f:
    return dict(f)


def _assert_trees_equal(actual, expected, what):
  assert sorted(actual) == sorted(expected), what
  for k in expected:
    np.testing.assert_array_equal(actual[k], expected[k], err_msg=f'{what}: {k}')


def _assert_results_equal(actual, expected, keys, rel=1e-5):
  """Evaluation results (numbers, or dicts of per-class numbers; NaN equals NaN) agree."""
  for key in keys:
    a, e = actual[key], expected[key]
    if isinstance(e, dict):
      assert sorted(a) == sorted(e), key
      a, e = [a[k] for k in sorted(e)], [e[k] for k in sorted(e)]
    assert a == pytest.approx(e, rel=rel, nan_ok=True), key


def _assert_same_updates(actual, reference, start, what):
  """`actual` parameters moved from `start` as `reference` did: to 0.1 % plus 1e-6.

  The two runs sum gradients in different orders, so they agree to rounding, not bitwise; Adam
  divides by sqrt(v), which turns rounding in a near-zero gradient into an update difference of
  up to ~1e-7 (seen once in CI), hence the absolute term, 1,000x below the typical update.
  """
  moved = total = 0
  for k, begin in start.items():
    got, want = actual[f'params/{k}'] - begin, reference[f'params/{k}'] - begin
    tolerance = 1e-3 * np.abs(want) + 1e-6
    wrong = np.abs(got - want) > tolerance
    assert not wrong.any(), (f'{what}: {k}: {wrong.sum()} of {wrong.size} elements differ, by up '
                             f'to {np.max(np.abs(got - want)):.3g}')
    moved += int(np.sum(np.abs(want) > tolerance))
    total += want.size
  # Enough parameters move by more than the tolerance for a difference to show.
  assert moved > 0.05 * total, (what, moved, total)


def _events_files(workdir):
  return [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents.')]


def _assert_complete_checkpoints(workdir, steps):
  """Exactly `steps`, each with its state and meta, and no temporary (half-written) ones."""
  directory = checkpoints.checkpoint_dir(str(workdir))
  assert fileio.listdir(directory) == sorted(str(s) for s in steps)
  for step in steps:
    contents = set(fileio.listdir(fileio.join(directory, str(step))))
    assert {'state', 'meta'} <= contents, contents
    assert _load_json(fileio.join(directory, str(step), 'meta', 'metadata'))['step'] == step


def _single_process_evaluation(config, model, params, mesh):
  with worker.ConfusionSpy() as spy:
    results, _ = evaluate.make_evaluators(config, model, mesh)[0].run(params)
  return results, (spy.matrices[0] if spy.matrices else None)


# -- Input ----------------------------------------------------------------------------------------

def test_processes_read_disjoint_parts_that_make_up_every_split(digit_scenes_dir, tmp_path):
  out = tmp_path / 'out'
  harness.run(_worker_job('input', digit_scenes_dir, out), tmp_path / 'logs', timeout=TIMEOUT_S)
  seen = [_load_json(out / f'process_{i}' / 'input.json') for i in range(NUM_PROCESSES)]
  config = worker.make_config('segment', digit_scenes_dir)

  # Train: the first epoch of each process, as hashes of the augmented examples. Augmentation is
  # seeded per example, so the same example looks the same whichever process reads it.
  for name, input_config, total in (('train', config.input, 40),
                                    ('subset', worker.subset_config(config.input),
                                     worker.SUBSET_COUNT)):
    reference = worker.train_epoch_hashes(input_config, process_index=0, process_count=1)
    assert len(reference) == len(set(reference)) == total
    parts = [s[name] for s in seen]
    assert [len(p) for p in parts] == [total // NUM_PROCESSES] * NUM_PROCESSES, name
    assert not set(parts[0]) & set(parts[1]), f'{name}: both processes read the same examples'
    assert sorted(parts[0] + parts[1]) == sorted(reference), name
  # The subset's ids are written once, by process 0.
  assert (out / 'process_0' / 'workdir' / input_pipeline.SUBSET_IDS_FILENAME).exists()
  assert not (out / 'process_1' / 'workdir').exists()

  # Eval: 13 examples read as 7 + 6, both padded to the same number of batches.
  reference = worker.eval_summary(config.evals.val, process_index=0, process_count=1)
  assert len(reference['valid']) == 13
  parts = [s['eval'] for s in seen]
  assert [p['num_batches'] for p in parts] == [p['batches_read'] for p in parts] == [4, 4]
  assert [len(p['valid']) for p in parts] == [7, 6]
  assert [p['num_padding'] for p in parts] == [1, 2]
  assert not set(parts[0]['valid']) & set(parts[1]['valid'])
  assert sorted(parts[0]['valid'] + parts[1]['valid']) == sorted(reference['valid'])


# -- Checkpoints, host copies, evaluation ---------------------------------------------------------

def test_sharded_state_checkpoint_and_evaluation_match_one_process(digit_scenes_dir, tmp_path):
  out = tmp_path / 'out'
  harness.run(_worker_job('state', digit_scenes_dir, out), tmp_path / 'logs', timeout=TIMEOUT_S)
  config = worker.make_config('segment', digit_scenes_dir)
  model = initialization.build_model_for(config)
  abstract = worker.abstract_state(config, model)
  values = worker.random_values(abstract, worker.STATE_SEED)
  expected = worker.flat(values)
  seen = [_load_json(out / f'process_{i}' / 'state.json') for i in range(NUM_PROCESSES)]

  # The decoder was split across the processes, so the checks below gather across hosts.
  assert all(s['params_held_in_part'] > 0 for s in seen)
  params = {k[len('params/'):]: v for k, v in expected.items() if k.startswith('params/')}
  for i in range(NUM_PROCESSES):
    # Saved and restored by both processes; `_host_copy` gives every process everything.
    _assert_trees_equal(_load_npz(out / f'process_{i}' / 'restored.npz'), expected,
                        f'process {i} restored state')
    _assert_trees_equal(_load_npz(out / f'process_{i}' / 'loaded_params.npz'), params,
                        f'process {i} load_params')
  _assert_complete_checkpoints(out / 'run', [worker.STATE_STEP])

  # Restored by one process onto another mesh (8 devices, everything replicated).
  mesh8 = _all_devices_mesh()
  replicated = jax.tree.map(lambda _: sharding.replicated(mesh8), abstract)
  ckpt = checkpoints.Checkpointer(str(out / 'run'))
  try:
    restored = ckpt.restore(worker.STATE_STEP, worker.with_shardings(abstract, replicated))
  finally:
    ckpt.close()
  _assert_trees_equal(worker.flat(restored), expected, 'restored by one process')

  # Evaluation aggregated over both processes equals one process (4 devices, same mesh axes):
  # the confusion matrix count for count, and the denoising losses.
  mesh4 = sharding.make_mesh(config, devices=jax.devices()[:4])
  params = worker.place(values['params'],
                        sharding.param_shardings(abstract['params'], mesh4, config))
  segment, confusion = _single_process_evaluation(config, model, params, mesh4)
  assert confusion.sum() == 13 * 32 * 32  # Every pixel of the 13 images, padding excluded.
  for s in seen:
    np.testing.assert_array_equal(np.array(s['confusion']), confusion)
    _assert_results_equal(s['segment'], segment, SEGMENTATION_RESULTS)
  denoise_config = worker.make_config('denoise', digit_scenes_dir)
  denoise_model = initialization.build_model_for(denoise_config)
  denoise, _ = _single_process_evaluation(
      denoise_config, denoise_model,
      worker.denoise_params(denoise_config, denoise_model, mesh4), mesh4)
  assert denoise['num_examples'] == 13
  for s in seen:
    _assert_results_equal(s['denoise'], denoise, ('loss', 'psnr', 'psnr_input', 'num_examples'))

  # config.json and results are written by process 0 only (each process got its own directory).
  assert _load_json(out / 'process_0' / 'workdir' / 'results' / 'val.json')['mIoU'] == (
      pytest.approx(segment['mIoU']))
  assert (out / 'process_0' / 'workdir' / 'config.json').exists()
  assert not (out / 'process_1' / 'workdir').exists()


# -- The trainer ----------------------------------------------------------------------------------

@pytest.fixture
def gcs_root(tmp_path):
  """A gs:// directory on a GCS emulator on 127.0.0.1, seen by this process and the workers.

  Summaries go to tmp_path/summaries (see gcs_trainer.py: TensorFlow's GCS client cannot be
  pointed at an emulator).
  """
  with gcs_emulator.running() as environment, gcs_emulator.patched_environ(
      dict(environment, DDEP_TEST_SUMMARIES_DIR=str(tmp_path / 'summaries'))):
    yield f'gs://{gcs_emulator.BUCKET}/multihost'


def test_two_process_training_equals_one_process(digit_scenes_dir, tmp_path, gcs_root):
  # Work directory and init checkpoint on gs:// (the GCS emulator), as on a pod. The run starts
  # from known parameters, another run's checkpoint (init_from), which both processes read.
  # Adam divides by sqrt(v) + eps: with the default eps=1e-8 a parameter whose gradient is
  # mathematically zero (the attention key bias: softmax ignores it) moves by rounding noise
  # amplified to ~lr, different for any other summation order; eps=1e-3 keeps that noise out while
  # real gradients still move parameters by up to ~lr.
  arg = f'task=segment,steps=4,checkpoint_every=2,data_dir={digit_scenes_dir}'
  overrides = _trainer_overrides(**{'init_from.checkpoint': f'{gcs_root}/init',
                                    'init_from.params': ('.*',), 'optimizer.eps': 1e-3})
  config = _trainer_config(arg, overrides)
  model = initialization.build_model_for(config)
  image_shape = initialization.image_shape(config)  # pylint: disable=protected-access
  abstract_params = train_step_lib.abstract_params(config, model, image_shape)
  init_params = worker.random_values(abstract_params, worker.STATE_SEED)
  ckpt = checkpoints.Checkpointer(f'{gcs_root}/init')
  try:
    ckpt.save(0, {'params': init_params}, {'step': 0}, force=True)
  finally:
    ckpt.close()

  workdir = f'{gcs_root}/run'
  with harness.Launch(_trainer_job(arg, workdir, overrides, trainer=(GCS_TRAINER,)),
                      str(tmp_path / 'logs')) as launch:
    launch.wait(timeout=TIMEOUT_S)
    pids = launch.pids

  # The reference: the same global batches (process 0's slice, then process 1's) on one process
  # with 4 devices and the same mesh axes.
  mesh = sharding.make_mesh(config, devices=jax.devices()[:4])
  opt = optimizer_lib.make_optimizer(config, abstract_params, config.total_steps)
  state, state_shardings = train_step_lib.create_train_state(config, model, opt, mesh,
                                                             image_shape, params=init_params)
  step_fn = train_step_lib.make_train_step(config, model, opt, mesh, state_shardings)
  streams = [input_pipeline.get_train_dataset(config.input, 'segment', seed=config.seed,
                                              process_index=p, process_count=NUM_PROCESSES)
             for p in range(NUM_PROCESSES)]
  reference = {}
  for step in range(1, config.total_steps + 1):
    local = [next(s) for s in streams]
    batch = {k: np.concatenate([b[k] for b in local])
             for k in train_step_lib.BATCH_KEYS['segment']}
    state, _ = step_fn(state, sharding.global_batch(batch, mesh))
    reference[step] = worker.flat(jax.device_get(state))

  # Checkpoints: complete, one per step (Orbax also saves the first step), equal to the reference.
  _assert_complete_checkpoints(workdir, [1, 2, 4])
  start = worker.flat(init_params)
  for step in (1, 2, 4):
    params = {f'params/{k}': v
              for k, v in worker.flat(checkpoints.load_params(str(workdir), step)[0]).items()}
    _assert_same_updates(params, reference[step], start, f'step {step}')

  # The whole state restores on one process onto another mesh (8 devices, replicated).
  mesh8 = _all_devices_mesh()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=sharding.replicated(mesh8)),
                          state)
  ckpt = checkpoints.Checkpointer(str(workdir))
  try:
    restored = worker.flat(ckpt.restore(4, abstract))
  finally:
    ckpt.close()
  assert restored['step'] == 4
  _assert_trees_equal({k: v for k, v in restored.items() if k.startswith('params/')}, params,
                      'restored params')  # `params`: as load_params read step 4.
  for k, v in reference[4].items():
    if k.startswith('opt_state/'):
      # Adam's moments, to rounding (see above): 1 % of each element, or 1e-3 of the array's
      # largest magnitude for elements near zero (a CI run saw 3e-8 on a 7.9e-7 element).
      scale = float(np.max(np.abs(v))) if np.size(v) else 0.0
      np.testing.assert_allclose(restored[k], v, rtol=1e-2, atol=1e-3 * scale + 1e-12,
                                 err_msg=k)

  # The final evaluation over both processes equals one process's evaluation of the same params.
  written = _load_json(f'{workdir}/results/val.json')
  params = initialization.place_params(checkpoints.load_params(str(workdir), 4)[0], model, config,
                                       mesh)
  single, _ = _single_process_evaluation(config, model, params, mesh)
  assert written['final'] is True and written['step'] == 4
  _assert_results_equal(written, single, SEGMENTATION_RESULTS)

  # Summaries and the config are written by process 0 alone.
  events = _events_files(tmp_path / 'summaries' / gcs_emulator.BUCKET / 'multihost' / 'run')
  assert len(events) == 1 and f'.{pids[0]}.' in events[0], events
  assert _load_json(f'{workdir}/config.json')['distributed']['num_processes'] == NUM_PROCESSES


def test_sigterm_on_one_process_makes_both_save_the_same_step(digit_scenes_dir, tmp_path):
  workdir = tmp_path / 'run'
  total = 5000  # Far beyond the step the signal arrives at, yet bounded if this test dies.
  arg = f'task=denoise,ddep=True,steps={total},checkpoint_every={total},data_dir={digit_scenes_dir}'
  with harness.Launch(_trainer_job(arg, workdir, _trainer_overrides()),
                      str(tmp_path / 'logs')) as launch:
    launch.wait_for_log(0, 'train/loss', timeout=TIMEOUT_S)
    # Only process 1 is told; JAX's preemption sync service tells process 0.
    launch.signal(1, signal.SIGTERM)
    logs = launch.wait(timeout=120)  # A sync point, a save, and exit: seconds.
    pids = launch.pids

  saved = []
  for i, log in enumerate(logs):
    found = re.findall(r'Preempted: checkpoint saved at step (\d+)', log)
    assert len(found) == 1, f'process {i}: {found}\n{log[-3000:]}'
    saved.append(int(found[0]))
  assert saved[0] == saved[1], saved
  step = saved[0]
  assert 2 <= step < total
  # The forced save at `step`, besides Orbax's save of the first step; no final evaluation.
  _assert_complete_checkpoints(workdir, sorted({1, step}))
  assert checkpoints.load_params(str(workdir))[1] == step  # Readable, and the latest.
  assert not (workdir / 'results').exists()
  events = _events_files(workdir)
  assert len(events) == 1 and f'.{pids[0]}.' in events[0], events
