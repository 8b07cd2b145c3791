"""Where a run's parameters come from: the model of a config, and its initial train state.

`restore_or_initialize` is the first thing the train loop does with its state (first that
applies):
  1. resume: the workdir has a checkpoint -> restore state and continue at its step, with the
     same data order (the input pipeline is a deterministic function of the step);
  2. `init_from.checkpoint`: parameters matching `init_from.params` from a previous stage's
     Orbax checkpoint (e.g. encoder + decoder of a DDeP run), the rest freshly initialised;
  3. `init_from.npz`: ImageNet-21k encoder weights, a vision_transformer `.npz`, a timm
     `.safetensors` / `.pth` / `.bin` or `hf-hub:timm/<name>` (`pretrained.load_pretrained`), for
     the encoder (and, when the head matches, the classifier);
  4. random initialisation.

`build_model_for(config)` and `place_params(loaded, model, config, mesh)` are what the trainer,
the evaluator (`evaluate.evaluate_checkpoint`) and tools share to build a config's model and put
a checkpoint's parameters on a mesh.
"""

from typing import Any, Mapping, NamedTuple

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from ddep_jax import checkpoints
from ddep_jax import config_fields
from ddep_jax import models
from ddep_jax import parameters
from ddep_jax import sharding
from ddep_jax import train_step as train_step_lib
from ddep_jax.data import input_pipeline
from ddep_jax.models import pretrained


def default_config() -> ml_collections.ConfigDict:
  """Fields owned by this module: `init_from`, where a fresh run's parameters come from."""
  return ml_collections.ConfigDict(dict(init_from=dict(
      checkpoint='',        # A previous run's workdir / checkpoints dir / checkpoints/<step>.
      step=-1,              # -1: its latest checkpoint.
      params=('encoder/.*', 'decoder/.*'),  # Path regexes of the parameters taken from it.
      # The encoder's pretrained weights: a vision_transformer .npz, a timm .safetensors / .pth /
      # .bin, or hf-hub:timm/<name> (README, "Pretrained encoders").
      npz='',
      npz_drop_head=True,   # Keep the randomly initialised head (different classes).
  )))


def check_init_from(init_from) -> None:
  """Fails, naming the field, unless `config.init_from` has exactly the fields of the default,
  and sets at most one of `checkpoint` and `npz`."""
  config_fields.check_fields(init_from, default_config().init_from, 'config.init_from',
                             'ddep_jax.initialization.default_config()', exact=True)
  if init_from.checkpoint and init_from.npz:
    raise ValueError('config.init_from: set checkpoint or npz, not both.')


def build_model_for(config):
  """The model of `config.model` with the head of `config.task`."""
  return models.build_model(config.model, task=config.task, num_classes=num_outputs(config))


def num_outputs(config) -> int:
  # The denoising head predicts 3 channels whatever num_classes says.
  return 3 if config.task == 'denoise' else int(config.num_classes)


def image_shape(config) -> tuple[int, int, int, int]:
  """The shape of one train image batch row, `(1, height, width, 3)`: the model's init shape."""
  height, width = input_pipeline.train_crop_size(config.input, config.task)
  return (1, height, width, 3)


def place_params(loaded: Mapping, model, config, mesh):
  """Puts a full set of host numpy parameters (`checkpoints.load_params`) on the mesh.

  Every model parameter must be in `loaded` with its shape (errors name the paths); the result is
  sharded by `config.sharding_rules`.
  """
  abstract = train_step_lib.abstract_params(config, model, image_shape(config))
  shardings = sharding.param_shardings(abstract, mesh, config)
  return put(parameters.merge_params(abstract, loaded), shardings)


def host_copy(tree):
  """Global (possibly multi-host sharded) arrays -> full numpy arrays on every host."""
  return multihost_utils.process_allgather(tree, tiled=True)


def put(tree, shardings):
  """Host numpy leaves -> global arrays with the given shardings; device arrays pass through."""
  def put_leaf(value, sh):
    if isinstance(value, jax.Array):
      return value
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sh, lambda index: value[index])
  return jax.tree.map(put_leaf, tree, shardings)


def initial_params(config, state) -> tuple[Any, str]:
  """Applies init_from to freshly initialised state params; returns (params, description)."""
  init_from = config.init_from
  check_init_from(init_from)
  params = state['params']
  shardings = jax.tree.map(lambda x: x.sharding, params)
  if init_from.checkpoint:
    step = init_from.step
    loaded, step = checkpoints.load_params(init_from.checkpoint, step if step >= 0 else None)
    if config.model.name == 'transunet':
      # Stages run at different resolutions (DDeP at 224, fine-tuning on 512 or 1024 crops).
      loaded = pretrained.resample_position_embedding(
          loaded, params, pretrained.token_grid(config.model, image_shape(config)[1:3]))
    merged = parameters.merge_params(
        params, loaded, tuple(init_from.params),
        hint=f'Loading {init_from.checkpoint}: check init_from.params (path regexes) and that '
        'both runs use the same model config (encoder / decoder sizes).')
    carried = parameters.matching_paths(params, tuple(init_from.params))
    return put(merged, shardings), (f'{len(carried)} parameters from {init_from.checkpoint} '
                                    f'(step {step}) matching {list(init_from.params)}')
  if init_from.npz:
    merged = pretrained.load_pretrained(host_copy(params), init_from.npz, config.model,
                                        drop_head=init_from.npz_drop_head,
                                        image_size=image_shape(config)[1:3])
    return put(merged, shardings), f'encoder from {init_from.npz}'
  return params, 'random initialisation'


class InitialState(NamedTuple):
  """What `restore_or_initialize` returns: the state to train from and where it came from."""
  state: dict
  shardings: Any  # The state's shardings (the train step's in / out shardings).
  start_step: int  # The step the state has taken (0 unless resumed).
  description: str  # A log line: 'resumed from ...' or 'initialised from ...'.


def restore_or_initialize(config, model, opt, mesh,
                          ckpt: checkpoints.Checkpointer) -> InitialState:
  """The train state of a run: resumed from `ckpt`, or fresh with `init_from` applied.

  A resumed run takes the newest checkpoint that reads back completely; damaged ones are moved
  aside (`Checkpointer.restore_latest`).
  """
  state, state_shardings = train_step_lib.create_train_state(config, model, opt, mesh,
                                                              image_shape(config))
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
  resumed = ckpt.restore_latest(abstract_state)
  if resumed is not None:
    state, start_step = resumed
    return InitialState(state, state_shardings, start_step,
                        f'Resumed from {ckpt.directory} at step {start_step}.')
  # The optimizer state does not depend on parameter values (Adam moments start at zero), so
  # swapping the parameters of the freshly initialised state is enough.
  params, description = initial_params(config, state)
  return InitialState(dict(state, params=params), state_shardings, 0,
                      f'Initialised from {description}.')
