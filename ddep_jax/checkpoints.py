"""Orbax checkpoints: the train state of a run, and parameters carried between stages.

Format (a contract; see docs/design.md): `<workdir>/checkpoints/<step>/` written by an Orbax
`CheckpointManager` with two items,
  * `state`: the train state pytree `{'step', 'params', 'opt_state'}` (sharded arrays; restored
    onto whatever mesh the restoring run uses), and
  * `meta`: JSON `{'step', 'task', 'model_name'}`, for humans and for sanity checks.
Orbax writes a step into a temporary directory and renames it when complete, so a run killed at
any moment (also mid-save) leaves only complete checkpoints behind; `latest_step()` never sees a
partial one. The data pipeline is a deterministic function of the step (see
`ddep_jax.data.input_pipeline`), so the step *is* the data-iterator position.

Stage chaining (`init_from`): a new run takes chosen parameters (by path regex, e.g. encoder and
decoder of a DDeP run) from another run's checkpoint, read as host numpy arrays whatever mesh
wrote them, and merged into its freshly initialised parameters with errors that name every
offending path.
"""

import re
import signal
import threading
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from ddep_jax import fileio

STATE = 'state'
META = 'meta'


def checkpoint_dir(workdir: str) -> str:
  return fileio.join(workdir, 'checkpoints')


class Checkpointer:
  """Periodic, asynchronous, keep-N checkpoints of one run, preemption aware.

  Preemption: on a multi-host job JAX's preemption service turns SIGTERM on any host into a
  sync point that every host reaches at the same step (`reached_preemption`), so all save the same
  step. A single-process run (no `jax.distributed`) has no such service; there a SIGTERM handler
  sets a flag that the loop reads at the next step boundary.
  """

  def __init__(self, workdir: str, *, keep: int = 3, save_every_steps: int | None = None,
               asynchronous: bool = True):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=save_every_steps or 1,
        enable_async_checkpointing=asynchronous,
        create=True,
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, META))
    self._sigterm = threading.Event()
    self._previous_handler = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at the next step and stopping.')
    self._sigterm.set()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def reached_preemption(self, step: int) -> bool:
    """True when this run was asked to stop (SIGTERM / TPU preemption) and should save now."""
    return self._sigterm.is_set() or self._manager.reached_preemption(step)

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
    """Starts an (asynchronous) save of `state` at `step`; returns whether one was started."""
    if step in self._manager.all_steps():
      return False
    saved = self._manager.save(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                          META: ocp.args.JsonSave(dict(meta))}), force=force)
    if saved:
      logging.info('Saving checkpoint at step %d to %s.', step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores the state at `step` onto the shardings given by `abstract_state`.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings (the current mesh's),
    so a checkpoint written on another mesh or host count is resharded on the way in.
    """
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)}))
    except (ValueError, KeyError) as e:
      raise ValueError(
          f'The checkpoint at {self.directory}/{step} does not match this run\'s model or '
          f'optimizer ({e}). Use a new --workdir for a different configuration, or delete the '
          'old checkpoints.') from e
    return restored[STATE]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


def _resolve_checkpoint(path: str, step: int | None) -> tuple[str, int]:
  """Accepts a workdir, its `checkpoints/` directory, or a `checkpoints/<step>` directory."""
  # fileio, not os.path: `gs://` checkpoints of an earlier stage are the rule on TPU pods.
  path = str(path).rstrip('/')
  base = path.rsplit('/', 1)[-1]
  if base.isdigit() and fileio.isdir(path):
    return fileio.dirname(path), int(base)
  for directory in (checkpoint_dir(path), path):
    if fileio.isdir(directory):
      steps = sorted(int(d) for d in fileio.listdir(directory) if d.isdigit() and
                     fileio.exists(fileio.join(directory, d, META)))
      if steps:
        if step is None:
          return directory, steps[-1]
        if step not in steps:
          raise FileNotFoundError(f'No checkpoint for step {step} in {directory}; '
                                  f'available steps: {steps}.')
        return directory, step
  raise FileNotFoundError(
      f'No Orbax checkpoint found at {path!r}: expected a run\'s workdir, its checkpoints/ '
      'directory, or a checkpoints/<step> directory. Check the path (init_from.checkpoint or '
      '--checkpoint) and that the earlier run saved at least one checkpoint.')


def load_params(path: str, step: int | None = None) -> tuple[dict, int]:
  """Reads the parameters of a saved run as host numpy arrays (any mesh, any host count)."""
  directory, step = _resolve_checkpoint(path, step)
  manager = ocp.CheckpointManager(
      directory, item_handlers={STATE: ocp.PyTreeCheckpointHandler(),
                                META: ocp.JsonCheckpointHandler()})
  try:
    params_metadata = manager.item_metadata(step)[STATE]['params']
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                params_metadata)
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item={'params': params_metadata}, restore_args={'params': restore_args},
        partial_restore=True)}))
  finally:
    manager.close()
  return _to_plain_dict(restored[STATE]['params']), step


def _to_plain_dict(tree):
  if isinstance(tree, Mapping):
    return {k: _to_plain_dict(v) for k, v in tree.items()}
  return tree


def _flatten(tree: Mapping) -> dict[str, Any]:
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(dict(tree)).items()}


def merge_params(init_params: Mapping, loaded_params: Mapping, patterns: Sequence[str], *,
                 source: str = 'checkpoint') -> dict:
  """Returns `init_params` with every path matching `patterns` taken from `loaded_params`.

  Paths that match are required in both trees with equal shapes; everything else keeps its fresh
  initialisation (e.g. a new segmentation head). All problems are reported at once.
  """
  regexes = [re.compile(p) for p in patterns]
  init_flat = _flatten(init_params)
  loaded_flat = _flatten(loaded_params)
  wanted = [k for k in init_flat if any(r.fullmatch(k) for r in regexes)]
  offered = [k for k in loaded_flat if any(r.fullmatch(k) for r in regexes)]
  errors = []
  missing = [k for k in wanted if k not in loaded_flat]
  if missing:
    errors.append(f'in model but not in {source}: ' + ', '.join(missing))
  unexpected = [k for k in offered if k not in init_flat]
  if unexpected:
    errors.append(f'in {source} but not in model: ' + ', '.join(unexpected))
  for k in wanted:
    if k in loaded_flat and tuple(np.shape(loaded_flat[k])) != tuple(np.shape(init_flat[k])):
      errors.append(f'shape mismatch at {k}: {source} {tuple(np.shape(loaded_flat[k]))} vs '
                    f'model {tuple(np.shape(init_flat[k]))}')
  if not wanted:
    errors.append(f'the patterns {list(patterns)} match no model parameter')
  if errors:
    raise ValueError(f'Cannot initialise from {source}:\n  ' + '\n  '.join(errors) +
                     '\nCheck init_from.params (path regexes) and that both runs use the same '
                     'model config (encoder / decoder sizes).')
  merged = dict(init_flat)
  for k in wanted:
    # Loaded leaves are host numpy arrays in the model's dtype; the caller places them on the
    # mesh (fresh leaves stay as they are, possibly sharded device arrays).
    merged[k] = np.asarray(loaded_flat[k]).astype(init_flat[k].dtype)
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in merged.items()})


def matching_paths(params: Mapping, patterns: Iterable[str]) -> list[str]:
  regexes = [re.compile(p) for p in patterns]
  return [k for k in _flatten(params) if any(r.fullmatch(k) for r in regexes)]
