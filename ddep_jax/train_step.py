"""The one jitted update step for every regime: DDeP, DeP, fine-tuning and classification.

The objective is chosen by `config.task` and the trainable partition by `config.schedule`
(see `optimizer.py`):

| regime      | task       | schedule                                   | loss                  |
|-------------|------------|--------------------------------------------|-----------------------|
| DDeP (§4)   | 'denoise'  | `[('encoder/.*', None), ('.*', {...})]`    | Eq. 6, squared L2     |
| DeP (§3)    | 'denoise'  | `{...}` (everything)                       | Eq. 6, squared L2     |
| fine-tune   | 'segment'  | `{...}`                                    | pixel cross-entropy   |
| encoder     | 'classify' | `{...}`                                    | softmax / sigmoid     |

Gradients are taken only with respect to the trainable parameters: frozen ones enter the loss as
constants, so in DDeP the encoder's backward pass is never built (the DDeP step costs about 0.7x
the FLOPs of the DeP step, see `experiments/benchmarks/train_step_benchmark.py`), and an encoder
with no trainable parameter runs deterministically (`encoder_train=False`: no dropout).

Randomness is reproducible and independent of the sharding: from `config.seed` come three
streams (init, noise, dropout); the noise of example `i` at step `t` uses
`fold_in(fold_in(noise_key, t), i)` with `i` its index in the global batch, and dropout uses
`fold_in(dropout_key, t)` for the whole global batch, whose bits do not depend on the sharding
with JAX's partitionable threefry (`jax_threefry_partitionable`, the default).

    mesh = sharding.make_mesh(config)
    model = models.build_model(config.model, task=config.task, num_classes=config.num_classes)
    opt = optimizer.make_optimizer(config, abstract_params(config, model, image_shape))
    state, state_shardings = create_train_state(config, model, opt, mesh, image_shape)
    train_step = make_train_step(config, model, opt, mesh, state_shardings)
    state, metrics = train_step(state, sharding.global_batch(local_batch, mesh))
"""

from typing import Any, Callable, Mapping, Sequence

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddep_jax import constants
from ddep_jax import objectives
from ddep_jax import optimizer as optimizer_lib
from ddep_jax import parameters
from ddep_jax import sharding as sharding_lib

BATCH_KEYS = {'denoise': ('image',), 'segment': ('image', 'label'), 'classify': ('image', 'label')}


def default_config() -> ml_collections.ConfigDict:
  """Fields read by the step that no other section owns: `task` and `seed`."""
  return ml_collections.ConfigDict(dict(task='denoise', seed=0))


def _check_task(config) -> str:
  task = config.task
  if task not in constants.TASKS:
    raise ValueError(f'config.task={task!r}: expected one of {constants.TASKS}.')
  return task


def rng_streams(seed: int) -> dict:
  """Independent PRNG keys for parameter init, denoising noise and dropout."""
  init, noise, dropout = jax.random.split(jax.random.key(seed), 3)
  return {'init': init, 'noise': noise, 'dropout': dropout}


def example_keys(key: jax.Array, step: jax.Array, batch_size: int) -> jax.Array:
  """[B] keys `fold_in(fold_in(key, step), i)` for the examples i of the global batch."""
  step_key = jax.random.fold_in(key, step)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, jnp.arange(batch_size))


# ------------------------------------------------------------------------------------------------
# Train state.
# ------------------------------------------------------------------------------------------------


def _init_params(model, task: str, image_shape: Sequence[int], rng: jax.Array):
  images = jnp.zeros((1,) + tuple(image_shape[1:]), jnp.float32)
  # A noise-conditioned decoder creates its conditioning parameters only when it sees gamma.
  kwargs = {'noise_level': jnp.ones((1,), jnp.float32)} if task == 'denoise' else {}
  variables = model.init({'params': rng, 'dropout': rng}, images, train=False, **kwargs)
  extra = sorted(set(variables) - {'params'})
  if extra:
    raise ValueError(f'The model has variable collections {extra} besides "params"; the train '
                     'step keeps no mutable state (use GroupNorm, not BatchNorm).')
  return variables['params']


def abstract_params(config: ml_collections.ConfigDict, model, image_shape: Sequence[int]):
  """Shapes and dtypes of the parameters (`jax.ShapeDtypeStruct`s), computed without FLOPs."""
  task = _check_task(config)
  return jax.eval_shape(lambda k: _init_params(model, task, image_shape, k),
                        jax.random.key(0))


def create_train_state(config: ml_collections.ConfigDict, model, opt: optimizer_lib.Optimizer,
                       mesh: jax.sharding.Mesh, image_shape: Sequence[int],
                       rng: jax.Array | None = None, params: Any = None):
  """Initialises `{'step', 'params', 'opt_state'}` directly in its sharded layout.

  Args:
    config: the experiment config (`task`, `seed`, `sharding_rules`).
    model: from `models.build_model`.
    opt: from `optimizer.make_optimizer`.
    mesh: from `sharding.make_mesh`.
    image_shape: shape of a batch of images, [B, H, W, 3] (only H, W, 3 matter).
    rng: init key; defaults to the `init` stream of `config.seed`.
    params: optional parameters to start from instead of a fresh init (host or device arrays
      with exactly the model's structure and shapes); the optimizer state is fresh.
  Returns:
    (state, state_shardings); pass `state_shardings` to `make_train_step`.
  """
  task = _check_task(config)
  rng = rng_streams(config.seed)['init'] if rng is None else rng

  def init(key):
    params = _init_params(model, task, image_shape, key)
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': opt.tx.init(params)}

  abstract = jax.eval_shape(init, rng)
  shardings = sharding_lib.state_shardings(abstract, mesh, config)
  if params is None:
    # jit with out_shardings: full-size parameters are born sharded, never gathered on one device.
    return jax.jit(init, out_shardings=shardings)(rng), shardings
  parameters.check_fits(abstract['params'], params, source='params')
  from_params = lambda p: {'step': jnp.zeros((), jnp.int32), 'params': p,
                           'opt_state': opt.tx.init(p)}
  return jax.jit(from_params, out_shardings=shardings)(params), shardings


# ------------------------------------------------------------------------------------------------
# The step.
# ------------------------------------------------------------------------------------------------


def partition_params(params, mask):
  """Flat `{path tuple: leaf}` dicts of the trainable and the frozen parameters."""
  flat, flat_mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
  trainable = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return trainable, frozen


def _merge(trainable, frozen):
  return traverse_util.unflatten_dict({**trainable, **frozen})


def encoder_trains(trainable_mask: Mapping) -> bool:
  """Whether any encoder parameter trains; if none does, the encoder runs without dropout."""
  return any(jax.tree.leaves(trainable_mask.get('encoder', {})))


def make_loss_fn(config: ml_collections.ConfigDict, model, trainable_mask,
                 mesh: jax.sharding.Mesh) -> Callable:
  """`loss_fn(trainable, frozen, batch, step) -> (loss, extra_metrics)` for `config.task`.

  `trainable` / `frozen` are the flat parameter dicts of `partition_params`; differentiating with
  respect to `trainable` alone is what keeps the frozen encoder's backward pass out of DDeP.
  """
  task = _check_task(config)
  if task == 'denoise':
    objectives.check_denoising_config(config.denoising)
  encoder_train = encoder_trains(trainable_mask)
  streams = rng_streams(config.seed)
  data_sharding = sharding_lib.batch_sharding(mesh)

  def loss_fn(trainable, frozen, batch, step):
    missing = [k for k in BATCH_KEYS[task] if k not in batch]
    if missing:
      raise ValueError(f'task={task!r} needs batch keys {BATCH_KEYS[task]}; missing {missing}.')
    params = _merge(trainable, frozen)
    images = batch['image']
    rngs = {'dropout': jax.random.fold_in(streams['dropout'], step)}
    apply = lambda x, **kw: model.apply({'params': params}, x, train=True,
                                        encoder_train=encoder_train, rngs=rngs, **kw)[0]
    if task == 'denoise':
      keys = example_keys(streams['noise'], step, images.shape[0])
      noisy, target, gamma = objectives.denoising_inputs(images, keys, config.denoising)
      # The noise is generated where its example lives, not on every device.
      noisy = jax.lax.with_sharding_constraint(noisy, data_sharding)
      return objectives.squared_l2_loss(apply(noisy, noise_level=gamma), target), {}  # Eq. 6
    if task == 'segment':
      loss, num_valid = objectives.pixel_cross_entropy(
          apply(images), batch['label'], class_weights=config.class_weights)
      return loss, {'num_valid_pixels': num_valid}
    logits = apply(images)
    return objectives.classification_loss(logits, batch['label'], config.classification_loss), {}

  return loss_fn


def make_train_step(config: ml_collections.ConfigDict, model, opt: optimizer_lib.Optimizer,
                    mesh: jax.sharding.Mesh, state_shardings: Any) -> Callable:
  """The jitted `train_step(state, batch) -> (state, metrics)`; `state` is donated.

  `batch` holds global `jax.Array`s (see `sharding.global_batch`) or host arrays of the global
  batch. `metrics` are replicated scalars: `loss`, `grad_norm` (of the trainable
  parameters, before clipping), `param_norm` (trainable parameters, before the update),
  `learning_rate` (first trained group, this step), and for 'segment' `num_valid_pixels`.
  """
  mask = opt.trainable_mask
  loss_fn = make_loss_fn(config, model, mask, mesh)
  flat_mask = traverse_util.flatten_dict(mask)

  def train_step(state, batch):
    step, params = state['step'], state['params']
    trainable, frozen = partition_params(params, mask)
    (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch,
                                                                     step)
    # The optimizer sees the whole tree; frozen entries are masked to zero updates inside it.
    full_grads = _merge(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = opt.tx.update(full_grads, state['opt_state'], params)
    new_flat = traverse_util.flatten_dict(optax.apply_updates(params, updates))
    # Frozen parameters are passed through untouched, so they stay bitwise identical.
    new_params = _merge({k: v for k, v in new_flat.items() if flat_mask[k]}, frozen)
    metrics = {
        'loss': loss,
        'grad_norm': optax.global_norm(grads),
        'param_norm': optax.global_norm(trainable),
        'learning_rate': opt.learning_rate_fn(step),
        **extra,
    }
    new_state = {'step': step + 1, 'params': new_params, 'opt_state': opt_state}
    return new_state, metrics

  return jax.jit(train_step,
                 in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,))
