"""Training objectives: the denoising noise model (paper §3–4.4) and the supervised losses.

Denoising pretraining corrupts an image `x` (float, roughly unit scale, in [-1, 1]) with Gaussian
noise `eps ~ N(0, I)` and trains the model to predict `eps` (or `x`) with a squared-L2 loss:

  * simple additive noise, Eq. 1:   x_noisy = x + sigma * eps
  * scaled additive noise, Eq. 5:   x_noisy = sqrt(gamma) * x + sqrt(1 - gamma) * eps,
                                    gamma = 1 / (1 + sigma**2)
  * target `noise` (Eq. 3, 4, 6; the paper's choice, Table 1) or `image` (Eq. 2).

The noise level is configured by exactly one of `noise_std` (sigma), `gamma`, or `gamma_range`
(a, b) for gamma ~ U(a, b) drawn per example (Table 4). Internally every example carries its
`gamma`; for simple noise sigma = sqrt((1 - gamma) / gamma), the inverse of Eq. 5's relation.
The train step and the evaluator share all of it: `denoising_inputs` (noise, Eq. 1/5, targets),
`remove_noise` / `implied_clean_image` (Eq. 1/5 solved for x) and the losses, per batch and
per example.

Fine-tuning uses pixel-wise softmax cross-entropy that ignores label 255, optionally with
per-class weights (`class_weights`, MMSegmentation's `class_weight`); supervised encoder
pretraining uses softmax or sigmoid (ImageNet-21k, multi-label) classification losses.

All functions are pure and jittable; configuration checks run at trace time in Python.
"""

import math
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import optax

from ddep_jax import config_fields
from ddep_jax import constants

NOISE_TYPES = ('scaled', 'simple')
PREDICT_TARGETS = ('noise', 'image')
CLASSIFICATION_LOSSES = ('softmax', 'sigmoid')


def default_config() -> ml_collections.ConfigDict:
  """Fields owned by this module: `denoising`, `classification_loss` and `class_weights`.

  Defaults are the paper's DDeP choice: scaled additive noise (Eq. 5/6) with sigma = 0.22
  (§4.1, Figure 5), predicting the noise (Table 1). To configure by `gamma` or `gamma_range`
  instead, set `noise_std=None`.
  """
  return ml_collections.ConfigDict(dict(
      denoising=dict(
          noise_type='scaled',
          noise_std=0.22,
          # Typed placeholders (None unless set), so `--config.denoising.gamma=0.95` works.
          gamma=config_dict.placeholder(float),
          gamma_range=config_dict.placeholder(tuple),
          predict_target='noise',
      ),
      classification_loss='softmax',
      # Per-class weights of the fine-tuning pixel cross-entropy, one per class (None: all 1).
      # The paper uses none; the demo down-weights its dominant background class.
      class_weights=config_dict.placeholder(tuple),
  ))


def check_class_weights(class_weights, num_classes: int) -> None:
  """Fails, saying what to change, unless `class_weights` is None or K >= 0 finite floats."""
  if class_weights is None:
    return
  weights = tuple(class_weights)
  if len(weights) != num_classes:
    raise ValueError(f'config.class_weights has {len(weights)} entries but config.num_classes='
                     f'{num_classes}: give one weight per class (or None for all 1).')
  if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights):
    raise ValueError(f'config.class_weights={weights}: every weight must be a finite number >= 0.')
  if not any(w > 0 for w in weights):
    raise ValueError('config.class_weights are all 0: no pixel would carry any loss.')


def gamma_from_noise_std(noise_std):
  """gamma = 1 / (1 + sigma**2), the relation of Eq. 5."""
  return 1.0 / (1.0 + noise_std**2)


def noise_std_from_gamma(gamma):
  """sigma = sqrt((1 - gamma) / gamma), the inverse of `gamma_from_noise_std`."""
  return jnp.sqrt((1.0 - gamma) / gamma)


def check_denoising_config(denoising: Mapping) -> None:
  """Raises ValueError with an actionable message if `config.denoising` is inconsistent.

  Its fields are exactly those of `default_config().denoising`: a misspelt one is an error.
  """
  where = 'config.denoising'
  config_fields.check_fields(denoising, default_config().denoising, where,
                             'ddep_jax.objectives.default_config()', exact=True)
  if denoising['noise_type'] not in NOISE_TYPES:
    raise ValueError(f'{where}.noise_type={denoising["noise_type"]!r}: expected one of '
                     f'{NOISE_TYPES} (scaled = Eq. 5/6, simple = Eq. 1).')
  if denoising['predict_target'] not in PREDICT_TARGETS:
    raise ValueError(f'{where}.predict_target={denoising["predict_target"]!r}: expected one '
                     f'of {PREDICT_TARGETS} (noise = Eq. 3/6, image = Eq. 2).')
  given = [k for k in ('noise_std', 'gamma', 'gamma_range') if denoising[k] is not None]
  if len(given) != 1:
    raise ValueError(
        f'{where}: set exactly one of noise_std, gamma, gamma_range (got {given or "none"}). '
        'For example noise_std=0.22, or noise_std=None and gamma=0.95, or noise_std=None and '
        'gamma_range=(0.9, 0.95).')
  if denoising['noise_std'] is not None and not denoising['noise_std'] >= 0:
    raise ValueError(f'{where}.noise_std={denoising["noise_std"]} must be >= 0.')
  if denoising['gamma'] is not None and not 0 < denoising['gamma'] <= 1:
    raise ValueError(f'{where}.gamma={denoising["gamma"]} must lie in (0, 1] '
                     '(1 = no noise; Eq. 5: gamma = 1 / (1 + sigma**2)).')
  if denoising['gamma_range'] is not None:
    gamma_range = tuple(denoising['gamma_range'])
    if len(gamma_range) != 2 or not 0 < gamma_range[0] <= gamma_range[1] <= 1:
      raise ValueError(f'{where}.gamma_range={gamma_range} must be (a, b) with 0 < a <= b <= 1, '
                       'e.g. (0.9, 0.95) as in Table 4.')


def sample_gamma(key: jax.Array, denoising: Mapping) -> jax.Array:
  """The noise level gamma of one example: fixed, or drawn from U(a, b) (Table 4)."""
  if denoising['gamma_range'] is not None:
    low, high = denoising['gamma_range']
    return jax.random.uniform(key, (), jnp.float32, low, high)
  if denoising['gamma'] is not None:
    return jnp.asarray(denoising['gamma'], jnp.float32)
  return jnp.asarray(gamma_from_noise_std(denoising['noise_std']), jnp.float32)


def add_noise(images: jax.Array, noise: jax.Array, gamma: jax.Array,
              noise_type: str = 'scaled') -> jax.Array:
  """Corrupts `images` [B, ...] with `noise` (same shape) at per-example levels `gamma` [B]."""
  gamma = jnp.reshape(gamma, gamma.shape + (1,) * (images.ndim - gamma.ndim))
  if noise_type == 'scaled':
    return jnp.sqrt(gamma) * images + jnp.sqrt(1.0 - gamma) * noise  # Eq. 5
  if noise_type == 'simple':
    return images + noise_std_from_gamma(gamma) * noise  # Eq. 1
  raise ValueError(f'noise_type={noise_type!r}: expected one of {NOISE_TYPES}.')


def remove_noise(noisy: jax.Array, noise: jax.Array, gamma: jax.Array,
                 noise_type: str = 'scaled') -> jax.Array:
  """The inverse of `add_noise`: the image that `noise` at levels `gamma` [B] made `noisy`."""
  gamma = jnp.reshape(gamma, gamma.shape + (1,) * (noisy.ndim - gamma.ndim))
  if noise_type == 'scaled':
    return (noisy - jnp.sqrt(1.0 - gamma) * noise) / jnp.sqrt(gamma)  # Eq. 5 solved for x.
  if noise_type == 'simple':
    return noisy - noise_std_from_gamma(gamma) * noise  # Eq. 1 solved for x.
  raise ValueError(f'noise_type={noise_type!r}: expected one of {NOISE_TYPES}.')


def denoising_target(images: jax.Array, noise: jax.Array, predict_target: str) -> jax.Array:
  """What the model regresses: the noise (Eq. 3/4/6) or the clean image (Eq. 2)."""
  if predict_target == 'noise':
    return noise
  if predict_target == 'image':
    return images
  raise ValueError(f'predict_target={predict_target!r}: expected one of {PREDICT_TARGETS}.')


def denoising_inputs(images: jax.Array, example_keys: jax.Array, denoising: Mapping):
  """Noisy inputs, regression targets and per-example gamma for a batch of clean images.

  Args:
    images: float [B, H, W, C] clean images.
    example_keys: [B] PRNG keys, one per example, so an example's noise does not depend on
      which device holds it or on the batch size.
    denoising: `config.denoising`.
  Returns:
    (noisy_images [B, H, W, C], target [B, H, W, C], gamma float32 [B]).
  """
  check_denoising_config(denoising)
  if example_keys.shape != images.shape[:1]:
    raise ValueError(f'example_keys has shape {example_keys.shape}; expected one key per example '
                     f'({images.shape[:1]}) for images of shape {images.shape}.')

  def one_example(key):
    noise_key, gamma_key = jax.random.split(key)
    return (jax.random.normal(noise_key, images.shape[1:], images.dtype),
            sample_gamma(gamma_key, denoising))

  noise, gamma = jax.vmap(one_example)(example_keys)
  noisy = add_noise(images, noise, gamma, denoising['noise_type'])
  return noisy, denoising_target(images, noise, denoising['predict_target']), gamma


def implied_clean_image(noisy: jax.Array, prediction: jax.Array, gamma: jax.Array,
                        denoising: Mapping) -> jax.Array:
  """The clean image the model's prediction implies (for PSNR and reconstructions).

  Predicting the noise: `remove_noise` with the predicted noise (Eq. 5 or Eq. 1 inverted);
  predicting the image (Eq. 2): the prediction itself.
  """
  if denoising['predict_target'] == 'image':
    return prediction
  return remove_noise(noisy, prediction, gamma, denoising['noise_type'])


def squared_l2_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error: Eq. 2–6's ||g(f(x_noisy)) - target||^2 divided by the element count.

  The mean (rather than the sum over pixels and channels) only rescales the objective by a
  constant, and keeps the loss and the learning rate independent of the resolution.
  """
  if prediction.shape != target.shape:
    raise ValueError(f'prediction shape {prediction.shape} != target shape {target.shape}.')
  return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))


def per_example_squared_l2(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """[B] mean squared errors, one per example (the evaluator's sums; `squared_l2_loss` is the
  mean over the whole batch)."""
  if prediction.shape != target.shape:
    raise ValueError(f'prediction shape {prediction.shape} != target shape {target.shape}.')
  return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)),
                  axis=tuple(range(1, prediction.ndim)))


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array,
                        ignore_label: int = constants.IGNORE_LABEL,
                        class_weights: Optional[Sequence[float]] = None):
  """Softmax cross-entropy averaged over the pixels whose label is not `ignore_label`.

  With `class_weights` `w`, pixel `i` of class `y_i` counts `w[y_i]` times and the loss is
  `sum_i w[y_i] * ce_i / sum_i w[y_i]` (PyTorch's `cross_entropy(weight=w)`, which
  MMSegmentation's `class_weight` uses): down-weighting a dominant class rebalances the gradient
  without changing the loss of a batch made of one class.

  Args:
    logits: float [..., K] (e.g. [B, H, W, K]).
    labels: int [...] train ids in [0, K) or `ignore_label` (other values are not checked here:
      the data pipeline maps them).
    ignore_label: label of pixels that carry no loss (255, void / unlabelled).
    class_weights: None (every pixel weighs 1) or K non-negative weights.
  Returns:
    (loss, num_valid): the (weighted) mean over valid pixels (0 if there are none, or if all
    their weights are 0) and the number of valid pixels (int32).
  """
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f'logits {logits.shape} and labels {labels.shape} disagree: expected labels '
                     'of shape logits.shape[:-1].')
  valid = labels != ignore_label
  # Ignored pixels are given class 0 so that the gathers stay in range; `where` drops them.
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                              safe_labels)
  num_valid = jnp.sum(valid, dtype=jnp.int32)
  if class_weights is None:
    weights = valid.astype(jnp.float32)
  else:
    if len(class_weights) != logits.shape[-1]:
      raise ValueError(f'{len(class_weights)} class weights for {logits.shape[-1]} classes.')
    weights = jnp.where(valid, jnp.asarray(class_weights, jnp.float32)[safe_labels], 0.0)
  total = jnp.sum(weights)
  loss = jnp.sum(weights * per_pixel) / jnp.where(total > 0, total, 1.0)
  return loss, num_valid


def classification_loss(logits: jax.Array, labels: jax.Array,
                        loss_type: str = 'softmax') -> jax.Array:
  """Image classification loss, mean over the batch of `classification_losses`."""
  return jnp.mean(classification_losses(logits, labels, loss_type))


def classification_losses(logits: jax.Array, labels: jax.Array,
                          loss_type: str = 'softmax') -> jax.Array:
  """[B] image classification losses, one per example.

  Args:
    logits: float [B, K].
    labels: int [B] class ids, or float [B, K] (multi-)hot targets (ImageNet-21k is multi-label).
    loss_type: 'softmax' (cross-entropy) or 'sigmoid' (independent binary cross-entropies summed
      over classes, as vision_transformer / big_vision train on ImageNet-21k).
  """
  if loss_type not in CLASSIFICATION_LOSSES:
    raise ValueError(f'config.classification_loss={loss_type!r}: expected one of '
                     f'{CLASSIFICATION_LOSSES}.')
  logits = logits.astype(jnp.float32)
  if labels.shape == logits.shape[:-1]:
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  elif labels.shape == logits.shape:
    targets = labels.astype(jnp.float32)
  else:
    raise ValueError(f'labels of shape {labels.shape} do not fit logits {logits.shape}: expected '
                     'class ids [B] or (multi-)hot targets [B, K].')
  if loss_type == 'softmax':
    return optax.softmax_cross_entropy(logits, targets)
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)
