"""The train loop of every stage: supervised encoder pretraining, (D)DeP, and fine-tuning.

`train_and_evaluate(config, workdir)` is the library entry point (`ddep_jax.main` is its command
line). One loop, one jitted step; `config.task` picks the objective, head, data and evaluators
('classify', 'denoise', 'segment') and `config.schedule` picks which parameters train (DDeP
freezes `encoder/.*`).

Order of initialisation (resume, `init_from.checkpoint`, `init_from.npz`, random): see
`ddep_jax.initialization`.
"""

import math
import time
from typing import Mapping

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import jax
import ml_collections
import numpy as np

from ddep_jax import checkpoints
from ddep_jax import constants
from ddep_jax import evaluate
from ddep_jax import fileio
from ddep_jax import initialization
from ddep_jax import objectives
from ddep_jax import optimizer as optimizer_lib
from ddep_jax import performance
from ddep_jax import sharding
from ddep_jax import train_step as train_step_lib
from ddep_jax import workdir_lock
from ddep_jax.data import input_pipeline


def default_config() -> ml_collections.ConfigDict:
  """Fields owned by the loop: the head's classes, the evaluations, the run's length and cadence."""
  return ml_collections.ConfigDict(dict(
      num_classes=0,  # Classes of the segmentation / classification head (0: not used).
      evals=ml_collections.ConfigDict(),  # name -> entry (evaluate.default_eval_config()).
      total_steps=0,  # Set exactly one of total_steps / total_epochs.
      total_epochs=0.0,
      log_every_steps=100,
      checkpoint_every_steps=1000,
      keep_checkpoints=3,
  ))


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN / inf loss; the last good checkpoint is left untouched."""


def check_config(config) -> None:
  """Fails early, with what to change, on configs that cannot run."""
  if config.task not in constants.TASKS:
    raise ValueError(f'config.task={config.task!r}: expected one of {constants.TASKS}.')
  if config.task in ('segment', 'classify') and not config.num_classes:
    raise ValueError(f'config.num_classes must be set for task={config.task!r}.')
  if config.task in ('segment', 'classify'):
    info = input_pipeline.dataset_info(config.input.dataset, config.input.data_dir)
    if info.num_classes is not None and info.num_classes != config.num_classes:
      raise ValueError(f'config.num_classes={config.num_classes} but dataset '
                       f'{config.input.dataset!r} has {info.num_classes} classes.')
  if config.class_weights is not None:
    if config.task != 'segment':
      raise ValueError(f'config.class_weights weigh the segmentation loss; task={config.task!r} '
                       'has none: set config.class_weights=None.')
    objectives.check_class_weights(config.class_weights, config.num_classes)
  if not config.total_steps and not config.total_epochs:
    raise ValueError('Set config.total_steps or config.total_epochs.')
  if config.total_steps and config.total_epochs:
    raise ValueError('Set only one of config.total_steps and config.total_epochs.')
  initialization.check_init_from(config.init_from)
  evaluate.eval_configs(config)  # A misspelt eval field fails now, not after training.


def total_train_steps(config) -> int:
  if config.total_steps:
    return int(config.total_steps)
  info = input_pipeline.dataset_info(config.input.dataset, config.input.data_dir)
  num_examples = info.train_size(config.input)
  return int(math.ceil(config.total_epochs * num_examples / config.input.batch_size))


def _save_config(config, workdir):
  if jax.process_index() != 0:
    return
  fileio.write_text(fileio.join(workdir, 'config.json'),
                    config.to_json_best_effort(indent=2, sort_keys=True))


def _meta(config, step):
  return {'step': int(step), 'task': config.task, 'model_name': config.model.name}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final evaluation results by name.

  Raises workdir_lock.WorkdirInUseError when another live run uses `workdir`.
  """
  sharding.initialize_distributed(config)
  check_config(config)
  with workdir_lock.locked(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  # -- Mesh --------------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config)
  sharding.check_batch_sizes(config, jax.device_count(), jax.process_count())
  is_main = jax.process_index() == 0
  _save_config(config, workdir)
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  logging.info('Mesh %s over %d devices (%d processes).', dict(mesh.shape), jax.device_count(),
               jax.process_count())

  # -- Model and optimizer -----------------------------------------------------------------------
  total_steps = total_train_steps(config)
  model = initialization.build_model_for(config)
  abstract_params = train_step_lib.abstract_params(config, model,
                                                   initialization.image_shape(config))
  opt = optimizer_lib.make_optimizer(config, abstract_params, total_steps)

  # -- State: resume, init_from, or fresh --------------------------------------------------------
  ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints,
                                  save_every_steps=config.checkpoint_every_steps)
  try:
    state, state_shardings, start_step, description = initialization.restore_or_initialize(
        config, model, opt, mesh, ckpt)
  except BaseException:
    ckpt.close()
    raise
  logging.info('%s', description)
  if is_main:
    parameter_overview.log_parameter_overview(state['params'], include_stats=False,
                                              msg='Parameters')

  # -- Data ---------------------------------------------------------------------------------------
  train_ds = input_pipeline.get_train_dataset(
      config.input, config.task, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count(), workdir=workdir)
  train_iter = iter(train_ds)

  # -- Update step and evaluators ----------------------------------------------------------------
  step_fn = train_step_lib.make_train_step(config, model, opt, mesh, state_shardings)
  evaluators = evaluate.make_evaluators(config, model, mesh)

  def run_evals(step, final):
    results_by_name = {}
    train_counts = None
    for evaluator in evaluators:
      every = evaluator.eval_config.every_steps
      if not final and not (every and step % every == 0):
        continue
      with report_progress.timed(f'eval_{evaluator.name}'):
        results, images = evaluator.run(state['params'])
      if train_counts is None:  # Summed over processes once per evaluation round.
        train_counts = input_counts.summed()
      results.update(train_counts)
      evaluate.write_results(workdir, evaluator.name, results, step=step, final=final)
      evaluate.write_per_class_table(workdir, evaluator.name, results, step=step)
      writer.write_scalars(step, evaluate.summary_scalars(evaluator.name, results))
      if images and is_main:
        writer.write_images(step, {f'{evaluator.name}/{k}': v for k, v in images.items()})
      logging.info('Eval %s at step %d: %s', evaluator.name, step,
                   evaluate.summary_scalars(evaluator.name, results))
      results_by_name[evaluator.name] = results
    return results_by_name

  # -- Loop ---------------------------------------------------------------------------------------
  report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  meter = performance.meter_for(config, mesh, jax.devices()[0].device_kind)
  pending_metrics = []
  input_counts = _InputCounts(train_iter)
  final_results = {}
  step = start_step
  try:
    while step < total_steps:
      step += 1
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        with meter.waiting_for_input():
          local_batch = next(train_iter)
        input_counts.add(local_batch)
        batch = sharding.global_batch(_train_fields(local_batch, config.task), mesh)
        if step == start_step + 1:
          _analyse_step(step_fn, state, batch, meter)
        state, step_metrics = step_fn(state, batch)
      meter.step_done()
      pending_metrics.append(step_metrics)
      report_progress(step)

      preempted = ckpt.reached_preemption(step)
      save_now = preempted or ckpt.should_save(step) or step == total_steps
      if step % config.log_every_steps == 0 or save_now:
        # Fetching the metrics syncs with the devices; a non-finite loss stops the run before
        # anything is saved, so the last checkpoint stays a good one.
        _write_train_metrics(writer, step, pending_metrics)
        pending_metrics = []
        input_counts.log()
        writer.write_scalars(step, {f'train/{k}': v for k, v in meter.metrics().items()})
      if save_now:
        ckpt.save(step, state, _meta(config, step), force=preempted or step == total_steps)
      if preempted:
        logging.warning('Preempted: checkpoint saved at step %d; exiting.', step)
        ckpt.wait()
        return {}
      evaluated = step < total_steps and bool(run_evals(step, final=False))
      if evaluated or save_now:
        meter.restart()  # Evaluations and checkpoints are not train steps.
    ckpt.wait()  # Final results only once the final checkpoint is complete (or its error raised).
    final_results = run_evals(step, final=True)
  finally:
    ckpt.close()
    writer.flush()
  return final_results


def _analyse_step(step_fn, state, batch, meter: performance.ThroughputMeter) -> None:
  """Compiles the step once (the jit reuses it) and gives its FLOPs per device to `meter`."""
  start = time.perf_counter()
  meter.step_flops = performance.step_flops_per_device(step_fn.lower(state, batch).compile())
  peak = 'unknown: no MFU' if meter.peak_flops is None else f'{meter.peak_flops / 1e12:g} TFLOP/s'
  flops = 'unknown' if meter.step_flops is None else f'{meter.step_flops / 1e9:.4g} GFLOP'
  logging.info('Train step compiled in %.1f s: %s per device per step; device peak %s.',
               time.perf_counter() - start, flops, peak)
  meter.restart()  # Compilation is not a train step.


def _train_fields(local_batch: Mapping[str, np.ndarray], task: str) -> dict:
  keys = train_step_lib.BATCH_KEYS[task]
  missing = [k for k in keys if k not in local_batch]
  if missing:
    raise KeyError(f'Train batches for task {task!r} need {keys}; missing {missing}.')
  return {k: local_batch[k] for k in keys}


class _InputCounts:
  """Train input that never reaches the loss as labelled, since this process started.

  Label pixels whose stored value was outside the dataset's classes (trained as ignore) and
  corrupt examples skipped (`input.skip_corrupt`, counted by the iterator).
  """

  def __init__(self, train_iter):
    self.train_iter = train_iter
    self.invalid_label_pixels = 0
    self._logged = (0, 0)

  def add(self, local_batch: Mapping[str, np.ndarray]) -> None:
    self.invalid_label_pixels += evaluate.invalid_label_pixels(local_batch)

  def log(self) -> None:
    """Warns (every process, for its own input) when the counts have grown."""
    seen = (self.invalid_label_pixels, self.train_iter.num_skipped_corrupt)
    if seen != self._logged:
      logging.warning('Train input of this process so far: %d label pixels held values outside '
                      'the dataset\'s classes (trained as ignore); %d corrupt examples skipped.',
                      *seen)
      self._logged = seen

  def summed(self) -> dict:
    """The counts summed over processes (every process must call this), for results JSON."""
    return {
        'train_num_invalid_label_pixels': evaluate.sum_over_processes(self.invalid_label_pixels),
        'train_num_skipped_corrupt': evaluate.sum_over_processes(
            self.train_iter.num_skipped_corrupt),
    }


def _write_train_metrics(writer, step: int, pending: list) -> None:
  fetched = jax.device_get(pending)
  averaged = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
  for k, v in averaged.items():
    if not np.isfinite(v) and k in ('loss', 'grad_norm'):
      bad_steps = [step - len(fetched) + 1 + i for i, m in enumerate(fetched)
                   if not np.isfinite(m[k])]
      raise NonFiniteLossError(
          f'Non-finite {k} ({v}) at step(s) {bad_steps[:5]}: training stopped and nothing was '
          'saved after the last good checkpoint. Lower config.lr, set config.grad_clip_norm, '
          'or check the input data, then restart (the run resumes from its last checkpoint).')
  writer.write_scalars(step, {f'train/{k}': v for k, v in averaged.items()})
