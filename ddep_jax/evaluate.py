r"""Evaluation: segmentation mIoU, denoising loss / PSNR, classification top-1.

Used by the train loop (periodic and final evaluations) and as a command line tool that restores
a checkpoint and evaluates it, writing `results/<eval_name>.json`:

  python -m ddep_jax.evaluate \
      --config=configs/cityscapes.py:init=ddep,init_ckpt=/path/to/ddep_run \
      --workdir=/path/to/run [--checkpoint=/path/to/run/checkpoints/90000]

Every evaluator runs one jitted step per global batch on the device mesh; sums (confusion
matrices, losses, counts) are reduced by XLA over the global batch, so each host reads the same
totals and a multi-host evaluation equals a single-host one. Segmentation infers each image on
its own (`ddep_jax.inference`): one program per unit (padded window shape, window grid and
canvas) in the batch, shared across scales and batches, chosen from every host's image sizes, so
all hosts run the same programs (counts per split in `inference`'s docstring). In a program each
device runs the unit's members among its own images, one at a time (`jax.shard_map`), so its
memory and compute follow the members, not the batch. Examples that only pad the last batch
(`valid == False`) and pixels labelled 255 never count.
"""

import functools
import json
from typing import Any, Mapping

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections
from ml_collections import config_dict
from ml_collections import config_flags
import numpy as np

from ddep_jax import checkpoints
from ddep_jax import config_fields
from ddep_jax import fileio
from ddep_jax import inference
from ddep_jax import inference_plan
from ddep_jax import initialization
from ddep_jax import metrics
from ddep_jax import objectives
from ddep_jax import sharding
from ddep_jax.data import datasets
from ddep_jax.data import input_pipeline

# A fixed key for the evaluation noise, so denoising evaluations of different checkpoints see
# exactly the same noisy images.
_EVAL_NOISE_SEED = 1234
_NUM_SUMMARY_IMAGES = 4


def _replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def _palette() -> np.ndarray:
  """Fixed colours per class for segmentation summaries; ignore (255) is black."""
  colours = np.random.default_rng(0).integers(40, 256, size=(256, 3)).astype(np.uint8)
  colours[255] = 0
  return colours


def _to_unit_range(images) -> np.ndarray:
  return np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def default_eval_config() -> ml_collections.ConfigDict:
  """One entry of `config.evals`, locked: its eval input and how it is evaluated.

  The input fields are `input_pipeline.default_eval_config()`'s. The inference protocol
  (`ddep_jax.inference`): `mode` ('whole' | 'sliding'), `scales`, `flip`, `crop_size` and
  `stride` (of the sliding window); `every_steps` between evaluations during training (None:
  only the final one).
  """
  c = input_pipeline.default_eval_config()
  c.mode = 'whole'
  c.scales = (1.0,)
  c.flip = False
  c.crop_size = config_dict.placeholder(tuple)
  c.stride = config_dict.placeholder(tuple)
  c.every_steps = config_dict.placeholder(int)
  c.lock()
  return c


def eval_config_of(entry, name: str) -> ml_collections.ConfigDict:
  """`config.evals.<name>` with every field: the protocol fields it omits from
  `default_eval_config()`; the input fields it must hold (as the eval input requires)."""
  where, owner = f'config.evals.{name}', 'ddep_jax.evaluate.default_eval_config()'
  config_fields.check_fields(entry, input_pipeline.default_eval_config(), where, owner,
                             exact=False)
  return ml_collections.ConfigDict(config_fields.fill(entry, default_eval_config(), where, owner))


def eval_configs(config) -> dict[str, ml_collections.ConfigDict]:
  """Every entry of `config.evals` by name, each through `eval_config_of`."""
  return {name: eval_config_of(entry, name) for name, entry in sorted(config.evals.items())}


class Evaluator:
  """One named evaluation (`config.evals.<name>`): dataset, protocol and metrics."""

  def __init__(self, name: str, config, eval_config, model, mesh):
    self.name = name
    self.config = config
    self.eval_config = eval_config = eval_config_of(eval_config, name)
    self.model = model
    self.mesh = mesh
    self.task = config.task
    self._step_fn = jax.jit(self._batch_statistics, out_shardings=_replicated(mesh))
    if self.task == 'segment':
      self._geometry = dict(
          mode=eval_config.mode,
          crop_size=tuple(eval_config.crop_size) if eval_config.crop_size else None,
          stride=tuple(eval_config.stride) if eval_config.stride else None)
      self._plan_args = dict(self._geometry, size_divisor=sharding_size_divisor(config),
                             window_step=eval_config.window_step,
                             scales=tuple(eval_config.scales))
      self._protocol = dict(self._geometry, flip=eval_config.flip)
      self._scales = tuple(eval_config.scales)
      batch_sharding = sharding.batch_sharding(mesh)
      self._replicated = _replicated(mesh)
      self._zeros_fn = jax.jit(jnp.zeros, static_argnums=(0,), out_shardings=batch_sharding)
      # One program per inference unit (window shape, grid and canvas; `inference_plan.plan`),
      # reused across batches and scales; the probability sums are donated, so a batch holds one
      # copy.
      self._unit_fn = jax.jit(self._unit_probabilities, static_argnames=('unit',),
                              donate_argnums=(4,), out_shardings=batch_sharding)

  # -- per task, a pure function of (params, global batch, batch index) -> sums ----------------

  def _predict(self, params, images):
    out, _ = self.model.apply({'params': params}, images, train=False)
    return out

  def _unit_probabilities(self, params, images, sizes, scaled_sizes, probability_sums, *, unit):
    """Adds the unit's probabilities to the sums; each device runs its own members, one image
    at a time (`inference.unit_probabilities`), with the whole model (params gathered if
    FSDP-sharded), so a unit's memory and compute follow its members, not the batch."""
    def local(params, images, sizes, scaled_sizes, probability_sums):
      return inference.unit_probabilities(
          functools.partial(self._predict, params), images, sizes, scaled_sizes, unit,
          probability_sums=probability_sums, **self._protocol)

    batch = sharding.batch_sharding(self.mesh).spec
    # check_vma=False: `inference` is written for one device (its loop carries start as plain
    # zeros); every output is split along the batch, which out_specs states.
    return jax.shard_map(local, mesh=self.mesh, in_specs=(PartitionSpec(), batch, batch, batch,
                                                          batch), out_specs=batch,
                         check_vma=False)(params, images, sizes, scaled_sizes, probability_sums)

  def _segment_statistics(self, params, batch, global_sizes):
    """Per-image inference (`inference`), one program per unit present in the batch."""
    image = batch['image']
    sums = self._zeros_fn((*image.shape[:3], self.config.num_classes))
    for unit, scaled_sizes in inference_plan.plan(global_sizes, **self._plan_args):
      # Computed from the gathered sizes, so the same on every host: replicated.
      scaled_sizes = jax.make_array_from_process_local_data(self._replicated, scaled_sizes)
      sums = self._unit_fn(params, image, batch['orig_size'], scaled_sizes, sums, unit=unit)
    return self._step_fn(params, dict(batch, probability_sums=sums))

  def _batch_statistics(self, params, batch):
    valid = batch['valid']
    if self.task == 'segment':
      probabilities = batch['probability_sums'] / inference.num_predictions(
          self._scales, self.eval_config.flip)
      predictions = jnp.argmax(probabilities, axis=-1).astype(jnp.int32)
      confusion = metrics.confusion_matrix(batch['label'], predictions, self.config.num_classes,
                                           valid=valid)
      return {'confusion': confusion, 'predictions': predictions[:_NUM_SUMMARY_IMAGES]}
    if self.task == 'denoise':
      images = batch['image']
      # The noise of an example is keyed by its id, not by its place in the global batch (which
      # changes with the batch size and the number of processes).
      keys = jax.vmap(lambda h: jax.random.fold_in(jax.random.key(_EVAL_NOISE_SEED), h))(
          batch['id_hash'])
      noisy, target, gamma = objectives.denoising_inputs(images, keys, self.config.denoising)
      out, _ = self.model.apply({'params': params}, noisy, train=False, noise_level=gamma)
      per_example_loss = objectives.per_example_squared_l2(out, target)  # Eq. 6, per example.
      reconstruction = objectives.implied_clean_image(noisy, out, gamma, self.config.denoising)
      # What the noisy input alone implies (predicting no noise): the PSNR to beat.
      identity = objectives.remove_noise(noisy, jnp.zeros_like(out), gamma,
                                         self.config.denoising['noise_type'])
      weights = valid.astype(jnp.float32)
      return {
          'loss_sum': jnp.sum(per_example_loss * weights),
          'psnr_sum': jnp.sum(metrics.psnr(images, reconstruction) * weights),
          'psnr_input_sum': jnp.sum(metrics.psnr(images, identity) * weights),
          'count': jnp.sum(weights),
          'summary': {'clean': images[:_NUM_SUMMARY_IMAGES], 'noisy': noisy[:_NUM_SUMMARY_IMAGES],
                      'prediction': out[:_NUM_SUMMARY_IMAGES],
                      'reconstruction': reconstruction[:_NUM_SUMMARY_IMAGES]},
      }
    if self.task == 'classify':
      logits = self._predict(params, batch['image'])
      weights = valid.astype(jnp.float32)
      losses = objectives.classification_losses(logits, batch['label'],
                                                self.config.classification_loss)
      return {'correct_sum': jnp.sum(metrics.top1_correct(logits, batch['label']) * weights),
              'loss_sum': jnp.sum(losses * weights), 'count': jnp.sum(weights)}
    raise ValueError(f'Unknown task {self.task!r}.')

  # -- the host loop ---------------------------------------------------------------------------

  def run(self, params) -> tuple[dict, dict]:
    """Evaluates `params` on the whole split; returns (results, summary images)."""
    dataset, num_batches = input_pipeline.get_eval_dataset(
        self.eval_config, self.task, process_index=jax.process_index(),
        process_count=jax.process_count())
    confusion = metrics.ConfusionMatrix(self.config.num_classes) if self.task == 'segment' else None
    sums: dict[str, float] = {}
    images = {}
    invalid_pixels = 0
    for batch_index, local_batch in enumerate(dataset):
      if batch_index >= num_batches:
        break
      invalid_pixels += invalid_label_pixels(local_batch)
      batch = sharding.global_batch(
          {k: local_batch[k] for k in ('image', 'label', 'valid', 'id_hash', 'orig_size')
           if k in local_batch}, self.mesh)
      if self.task == 'segment':
        stats = self._segment_statistics(params, batch, _global_sizes(local_batch))
      else:
        stats = self._step_fn(params, batch)
      if confusion is not None:
        confusion.update(stats['confusion'])
      for k, v in stats.items():
        if k.endswith('_sum') or k == 'count':
          sums[k] = sums.get(k, 0.0) + float(v)
      if batch_index == 0:
        images = self._summary_images(local_batch, jax.device_get(stats))
    results: dict[str, Any] = {'dataset': self.eval_config.dataset,
                               'split': self.eval_config.split}
    if self.task == 'segment':
      info = input_pipeline.dataset_info(self.eval_config.dataset, self.eval_config.data_dir)
      class_names = info.get('class_names') if isinstance(info, Mapping) else getattr(
          info, 'class_names', None)
      if class_names is not None and len(class_names) != self.config.num_classes:
        class_names = None
      results.update(confusion.compute(class_names))
      # Stored mask values outside the dataset's classes, evaluated as ignore (255).
      results['num_invalid_label_pixels'] = sum_over_processes(invalid_pixels)
      if results['num_invalid_label_pixels']:
        logging.warning('Eval %s: %d label pixels held values outside the dataset\'s classes and '
                        'were ignored; check the masks of %s.', self.name,
                        results['num_invalid_label_pixels'], self.eval_config.dataset)
    else:
      count = max(sums.get('count', 0.0), 1.0)
      results['num_examples'] = int(sums.get('count', 0.0))
      results['loss'] = sums['loss_sum'] / count
      if self.task == 'denoise':
        results['psnr'] = sums['psnr_sum'] / count
        results['psnr_input'] = sums['psnr_input_sum'] / count
      else:
        results['top1'] = sums['correct_sum'] / count
    return results, images

  def _summary_images(self, local_batch, stats) -> dict:
    if self.task == 'segment':
      palette = _palette()
      n = min(_NUM_SUMMARY_IMAGES, stats['predictions'].shape[0])
      labels = np.asarray(local_batch['label'][:n]).astype(np.int64)
      return {'input': _to_unit_range(local_batch['image'][:n]),
              'prediction': palette[np.asarray(stats['predictions'][:n]) % 256] / 255.0,
              'ground_truth': palette[np.clip(labels, 0, 255)] / 255.0}
    if self.task == 'denoise':
      s = stats['summary']
      prediction = np.asarray(s['prediction'])
      if self.config.denoising['predict_target'] == 'noise':
        # Noise is ~N(0, 1): show +-2 std as [0, 1].
        prediction = np.clip(prediction / 4.0 + 0.5, 0.0, 1.0)
      else:
        prediction = _to_unit_range(prediction)
      return {'clean': _to_unit_range(s['clean']), 'noisy': _to_unit_range(s['noisy']),
              'predicted_' + self.config.denoising['predict_target']: prediction,
              'reconstruction': _to_unit_range(s['reconstruction'])}
    return {}


def _global_sizes(local_batch) -> np.ndarray:
  """Own (height, width) of every valid image of the global batch (0 for padding), on every
  host: each host derives the same inference plan from it, so all run the same programs."""
  sizes = np.where(np.asarray(local_batch['valid'])[:, None],
                   np.asarray(local_batch['orig_size'], np.int32), 0)
  if jax.process_count() == 1:
    return sizes
  return np.asarray(multihost_utils.process_allgather(sizes, tiled=True))


def sharding_size_divisor(config) -> int:
  """Input granularity of the model: the R50 U-Net bottleneck is at 1/32, the TransUNet at 1/16."""
  return 32 if config.model.name == 'r50_unet' else 16


def make_evaluators(config, model, mesh) -> list[Evaluator]:
  return [Evaluator(name, config, eval_config, model, mesh)
          for name, eval_config in eval_configs(config).items()]


def write_results(workdir: str, name: str, results: Mapping, *, step: int, final: bool) -> str:
  """Writes `<workdir>/results/<name>.json` (process 0 only); returns its path."""
  path = fileio.join(workdir, 'results', f'{name}.json')
  if jax.process_index() == 0:
    payload = dict(results, step=int(step), final=bool(final), eval_name=name)
    # fileio: tmp + rename locally, one direct (atomic) upload on gs://.
    fileio.write_text(path, json.dumps(payload, indent=2, sort_keys=True, allow_nan=True))
  return path


def invalid_label_pixels(local_batch: Mapping) -> int:
  """Pixels of this process's batch whose stored label was outside the dataset's classes.

  They were mapped to ignore (255); padding examples (`valid == False`) never count.
  """
  if 'num_invalid_label_pixels' not in local_batch:
    return 0
  counts = np.asarray(local_batch['num_invalid_label_pixels'], np.int64)
  if 'valid' in local_batch:
    counts = np.where(np.asarray(local_batch['valid']), counts, 0)
  return int(counts.sum())


def sum_over_processes(value: int) -> int:
  """An integer count summed over all processes (every process must call this)."""
  if jax.process_count() == 1:
    return int(value)
  # Two 30-bit halves: exact for counts beyond int32 without enabling 64-bit JAX.
  halves = np.array([int(value) >> 30, int(value) & (2**30 - 1)], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(halves)).astype(np.int64)
  return int(gathered[:, 0].sum() << 30) + int(gathered[:, 1].sum())


def per_class_table(name: str, results: Mapping, *, step: int) -> str | None:
  """The MMSegmentation-style per-class table of segmentation results, or None."""
  if 'per_class_iou' not in results:
    return None
  header = (f'{name} ({results.get("dataset")}, {results.get("split")}) at step {step}: '
            f'{results.get("num_invalid_label_pixels", 0)} invalid label pixels ignored.')
  return header + '\n\n' + metrics.format_per_class_table(results) + '\n'


def write_per_class_table(workdir: str, name: str, results: Mapping, *, step: int) -> str | None:
  """Writes `<workdir>/results/<name>_per_class.md` (process 0 only); returns its path."""
  table = per_class_table(name, results, step=step)
  if table is None:
    return None
  path = fileio.join(workdir, 'results', f'{name}_per_class.md')
  if jax.process_index() == 0:
    fileio.write_text(path, table)
  return path


def summary_scalars(name: str, results: Mapping) -> dict:
  keys = ('mIoU', 'mAcc', 'aAcc', 'loss', 'psnr', 'psnr_input', 'top1')
  return {f'{name}/{k}': results[k] for k in keys if k in results}


# -- command line -------------------------------------------------------------------------------

def evaluate_checkpoint(config, workdir: str, checkpoint: str | None = None) -> dict:
  """Restores parameters and runs every evaluator of `config`; returns {name: results}."""
  sharding.initialize_distributed(config)
  mesh = sharding.make_mesh(config)
  sharding.check_batch_sizes(config, jax.device_count(), jax.process_count(), include_train=False)
  model = initialization.build_model_for(config)
  loaded, step = checkpoints.load_params(checkpoint or workdir)
  params = initialization.place_params(loaded, model, config, mesh)
  all_results = {}
  for evaluator in make_evaluators(config, model, mesh):
    results, _ = evaluator.run(params)
    results['checkpoint_step'] = step
    write_results(workdir, evaluator.name, results, step=step, final=True)
    write_per_class_table(workdir, evaluator.name, results, step=step)
    logging.info('%s at step %d: %s', evaluator.name, step,
                 summary_scalars(evaluator.name, results))
    table = per_class_table(evaluator.name, results, step=step)
    if table is not None and jax.process_index() == 0:
      print(table, flush=True)
    all_results[evaluator.name] = results
  return all_results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  datasets.confine_tensorflow()
  evaluate_checkpoint(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.checkpoint)


if __name__ == '__main__':
  # Flags are defined only when run as a program, so that importing this module from the trainer
  # (which defines its own --config / --workdir) does not clash.
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory: its latest checkpoint is evaluated and '
                      'results/<eval>.json written there.')
  flags.DEFINE_string('checkpoint', None, 'Evaluate this checkpoint instead (a workdir, its '
                      'checkpoints/ dir or a checkpoints/<step> dir).')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
