r"""Evaluation: segmentation mIoU, denoising loss / PSNR, classification top-1.

Used by the train loop (periodic and final evaluations) and as a command line tool that restores
a checkpoint and evaluates it, writing `results/<eval_name>.json`:

  python -m ddep_jax.evaluate \
      --config=configs/cityscapes.py:init=ddep,init_ckpt=/path/to/ddep_run \
      --workdir=/path/to/run [--checkpoint=/path/to/run/checkpoints/90000]

Every evaluator runs one jitted step per global batch on the device mesh; sums (confusion
matrices, losses, counts) are reduced by XLA over the global batch, so each host reads the same
totals and a multi-host evaluation equals a single-host one. Examples that only pad the last
batch (`valid == False`) and pixels labelled 255 never count.
"""

import functools
import os
from typing import Any, Mapping

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from ddep_jax import fileio
from ddep_jax import inference
from ddep_jax import metrics
from ddep_jax import objectives
from ddep_jax import sharding
from ddep_jax.data import input_pipeline

# A fixed key for the evaluation noise, so denoising evaluations of different checkpoints see
# exactly the same noisy images.
_EVAL_NOISE_SEED = 1234
_NUM_SUMMARY_IMAGES = 4


def _replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def _palette(num_classes: int) -> np.ndarray:
  """Fixed colours per class for segmentation summaries; ignore (255) is black."""
  colours = np.random.default_rng(0).integers(40, 256, size=(256, 3)).astype(np.uint8)
  colours[255] = 0
  return colours


def _to_unit_range(images) -> np.ndarray:
  return np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def implied_clean_image(noisy, prediction, gamma, denoising: Mapping):
  """The clean image the model's prediction implies (for PSNR and reconstructions).

  Predicting the noise: invert Eq. 5 (scaled) or Eq. 1 (simple) with the predicted noise;
  predicting the image (Eq. 2): the prediction itself.
  """
  if denoising['predict_target'] == 'image':
    return prediction
  gamma = jnp.reshape(gamma, gamma.shape + (1,) * (noisy.ndim - gamma.ndim))
  if denoising['noise_type'] == 'scaled':
    return (noisy - jnp.sqrt(1.0 - gamma) * prediction) / jnp.sqrt(gamma)
  return noisy - objectives.noise_std_from_gamma(gamma) * prediction


class Evaluator:
  """One named evaluation (`config.evals.<name>`): dataset, protocol and metrics."""

  def __init__(self, name: str, config, eval_config, model, mesh):
    self.name = name
    self.config = config
    self.eval_config = eval_config
    self.model = model
    self.mesh = mesh
    self.task = config.task
    self._step_fn = jax.jit(self._batch_statistics, out_shardings=_replicated(mesh))

  # -- per task, a pure function of (params, global batch, batch index) -> sums ----------------

  def _predict(self, params, images):
    out, _ = self.model.apply({'params': params}, images, train=False)
    return out

  def _batch_statistics(self, params, batch):
    valid = batch['valid']
    if self.task == 'segment':
      ec = self.eval_config
      probabilities = inference.predict_probabilities(
          functools.partial(self._predict, params), batch['image'], mode=ec.mode,
          scales=tuple(ec.scales), flip=ec.flip,
          crop_size=tuple(ec.crop_size) if ec.crop_size else None,
          stride=tuple(ec.stride) if ec.stride else None,
          size_divisor=sharding_size_divisor(self.config))
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
      per_example_loss = jnp.mean(jnp.square(out - target), axis=(1, 2, 3))
      reconstruction = implied_clean_image(noisy, out, gamma, self.config.denoising)
      identity = implied_clean_image(noisy, jnp.zeros_like(out), gamma,
                                     dict(self.config.denoising, predict_target='noise'))
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
      losses = jax.vmap(lambda l, y: objectives.classification_loss(
          l[None], y[None], self.config.classification_loss))(logits, batch['label'])
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
    for batch_index, local_batch in enumerate(dataset):
      if batch_index >= num_batches:
        break
      batch = sharding.global_batch(
          {k: local_batch[k] for k in ('image', 'label', 'valid', 'id_hash') if k in local_batch},
          self.mesh)
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
      info = input_pipeline.dataset_info(self.eval_config.dataset, self.eval_config.get('data_dir'))
      class_names = info.get('class_names') if isinstance(info, Mapping) else getattr(
          info, 'class_names', None)
      if class_names is not None and len(class_names) != self.config.num_classes:
        class_names = None
      results.update(confusion.compute(class_names))
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
      palette = _palette(self.config.num_classes)
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


def sharding_size_divisor(config) -> int:
  """Input granularity of the model: the R50 U-Net bottleneck is at 1/32, the TransUNet at 1/16."""
  return 32 if config.model.name == 'r50_unet' else 16


def make_evaluators(config, model, mesh) -> list[Evaluator]:
  return [Evaluator(name, config, eval_config, model, mesh)
          for name, eval_config in sorted(config.evals.items())]


def write_results(workdir: str, name: str, results: Mapping, *, step: int, final: bool) -> str:
  """Writes `<workdir>/results/<name>.json` (process 0 only); returns its path."""
  path = os.path.join(workdir, 'results', f'{name}.json')
  if jax.process_index() == 0:
    # Atomic (temp file + rename): a kill never leaves a truncated results file behind.
    fileio.write_json(path, dict(results, step=int(step), final=bool(final), eval_name=name))
  return path


def summary_scalars(name: str, results: Mapping) -> dict:
  keys = ('mIoU', 'mAcc', 'aAcc', 'loss', 'psnr', 'psnr_input', 'top1')
  return {f'{name}/{k}': results[k] for k in keys if k in results}


# -- command line -------------------------------------------------------------------------------

def evaluate_checkpoint(config, workdir: str, checkpoint: str | None = None) -> dict:
  """Restores parameters and runs every evaluator of `config`; returns {name: results}."""
  from ddep_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from ddep_jax import train  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(config)
  mesh = sharding.make_mesh(config)
  model = train.build_model_for(config)
  loaded, step = checkpoints.load_params(checkpoint or workdir)
  params = train.place_params(loaded, model, config, mesh)
  all_results = {}
  for evaluator in make_evaluators(config, model, mesh):
    results, _ = evaluator.run(params)
    results['checkpoint_step'] = step
    write_results(workdir, evaluator.name, results, step=step, final=True)
    logging.info('%s at step %d: %s', evaluator.name, step,
                 summary_scalars(evaluator.name, results))
    all_results[evaluator.name] = results
  return all_results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  from tensorflow_datasets.core.utils import gcs_utils  # pylint: disable=g-import-not-at-top
  gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access
  tf.config.set_visible_devices([], 'GPU')
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
