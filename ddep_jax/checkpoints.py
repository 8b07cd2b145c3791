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

Damage (a truncated, deleted or garbled file of a finished checkpoint): every array of a
checkpoint is read back synchronously (`verify_checkpoint`) before Orbax restores it, so a
damaged one is found with one clear error instead of a failure inside Orbax's concurrent restore
(whose in-flight TensorStore reads then report "Event loop is closed" from a closed asyncio
loop). On resume a damaged step is moved aside to `<step>.corrupt` (never deleted) and the newest
intact one is restored; a save that fails stops the run with `CheckpointWriteError`.

Stage chaining (`init_from`): a new run takes chosen parameters (by path regex, e.g. encoder and
decoder of a DDeP run) from another run's checkpoint, read here (`load_params`) as host numpy
arrays whatever mesh wrote them, and merged into its freshly initialised parameters by
`parameters.merge_params`, with errors that name every offending path.
"""

import json
import os
import signal
import threading
from typing import Any, Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from ddep_jax import fileio

STATE = 'state'
META = 'meta'
_DAMAGED_SUFFIX = '.corrupt'
# TensorStore status codes of a storage that cannot be reached now, not of damaged files.
_NOT_DAMAGE = ('PERMISSION_DENIED', 'UNAUTHENTICATED', 'UNAVAILABLE', 'DEADLINE_EXCEEDED',
               'RESOURCE_EXHAUSTED', 'CANCELLED')


class DamagedCheckpointError(ValueError):
  """A checkpoint's files cannot be read back completely (truncated, missing or garbled)."""


class NoReadableCheckpointError(RuntimeError):
  """A workdir holds checkpoints but none of them can be restored."""


class CheckpointWriteError(RuntimeError):
  """Writing a checkpoint failed (e.g. no space left, permission denied)."""


def _one_line(error: BaseException) -> str:
  """The first line of an error, prefixed by its type, cut to a readable length."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ''
  text = f'{type(error).__name__}: {text.split(" [tensorstore_spec")[0]}'  # Drop its specs.
  return text if len(text) <= 600 else text[:597] + '...'


def _kvstore_url(directory: str) -> str:
  directory = os.fspath(directory).rstrip('/') + '/'
  return directory if '://' in directory else 'file://' + os.path.abspath(directory) + '/'


def _read_json_file(path: str) -> Any:
  return json.loads(fileio.read_text(path))


def verify_checkpoint(step_dir: str, *, arrays_prefix: str = '') -> None:
  """Reads every file of a checkpoint back, one array at a time; raises DamagedCheckpointError.

  Checks the JSON metadata of both items and decodes every array of the `state` item whose
  name starts with `arrays_prefix` (e.g. 'params.'), synchronously: no asyncio, so a damaged file
  gives one error and no "Event loop is closed" noise from TensorStore callbacks.
  """
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  step_dir = os.fspath(step_dir).rstrip('/')
  state_dir = f'{step_dir}/{STATE}'
  try:
    _read_json_file(f'{step_dir}/{META}/metadata')
    tree = _read_json_file(f'{state_dir}/_METADATA')['tree_metadata']
    names = []
    for entry in tree.values():
      value = entry['value_metadata']
      if 'rray' in value['value_type'] and not value.get('skip_deserialize'):
        names.append('.'.join(str(k['key']) for k in entry['key_metadata']))
    if not names:
      raise ValueError('the state metadata lists no arrays')
    kvstore = {'driver': 'ocdbt', 'base': _kvstore_url(state_dir)}
    context = ts.Context()  # One cache for all arrays: the OCDBT manifest is read once.
    for name in sorted(names):
      if name.startswith(arrays_prefix):
        array = ts.open({'driver': 'zarr', 'kvstore': dict(kvstore, path=name + '/')},
                        open=True, read=True, context=context).result()
        array.read().result()
  except Exception as e:  # pylint: disable=broad-exception-caught
    if isinstance(e, PermissionError) or str(e).startswith(_NOT_DAMAGE):
      raise  # The storage, not the checkpoint: moving it aside would not help.
    # Any other failure to read a committed checkpoint is damage: only complete ones are renamed.
    raise DamagedCheckpointError(_one_line(e)) from e


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
    self._pending_step = None
    self._failed = False
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
    """Starts an (asynchronous) save of `state` at `step`; returns whether one was started.

    Raises CheckpointWriteError when this save, or the previous asynchronous one, failed.
    """
    if step in self._manager.all_steps():
      return False
    # Orbax waits for the previous save anyway; waiting here attributes its error to its step.
    self.wait()
    try:
      saved = self._manager.save(
          step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                            META: ocp.args.JsonSave(dict(meta))}), force=force)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._write_error(step, e) from e
    if saved:
      self._pending_step = step
      logging.info('Saving checkpoint at step %d to %s.', step, self.directory)
    return saved

  def _check_previous_save(self) -> None:
    """Raises the error of the last asynchronous save, if it failed (Orbax reports it once)."""
    try:
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._write_error(self._pending_step, e) from e

  def _write_error(self, step: int | None, error: BaseException) -> CheckpointWriteError:
    self._failed = True
    try:
      self._manager.reload()
      previous = self._manager.latest_step()
    except Exception:  # pylint: disable=broad-exception-caught
      previous = None
    kept = (f'the checkpoint of step {previous} is complete and the run will resume from it'
            if previous is not None else 'no earlier checkpoint exists')
    return CheckpointWriteError(
        f'Writing the checkpoint of step {step} to {self.directory} failed ({_one_line(error)}); '
        f'the run stopped and {kept}. Nothing of the failed save is taken for a checkpoint (its '
        'temporary directory is removed at the next start). Free disk space or fix the '
        'permissions of the directory, then start the run again.')

  def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | None:
    """Restores the newest checkpoint that reads back completely; None when there is none.

    Damaged checkpoints are logged, one line each, and moved aside to `<step>.corrupt`. Raises
    NoReadableCheckpointError when the directory holds checkpoints but none is intact: starting
    from scratch over them would be silent data loss.
    """
    step = -1
    if jax.process_index() == 0:
      step = self._newest_intact_step()
    if jax.process_count() > 1:
      # Process 0 decides (and moves damaged steps aside); the others restore the same step.
      step = int(multihost_utils.broadcast_one_to_all(np.int32(step)))
      self._manager.reload()
    if step >= 0:
      return self.restore(step, abstract_state), step
    damaged = self.damaged_checkpoints()
    if damaged:
      raise NoReadableCheckpointError(
          f'No checkpoint in {self.directory} can be read: {", ".join(damaged)} are damaged '
          '(moved aside, not deleted; the log says what is wrong with each). Nothing was '
          'started, so that the run does not silently begin again from scratch. Restore the '
          'checkpoints from a copy and rename them back to <step>, or, to start over, delete '
          'the .corrupt directories (or use a new --workdir).')
    return None

  def _newest_intact_step(self) -> int:
    for step in sorted(self._manager.all_steps(), reverse=True):
      path = f'{self.directory}/{step}'
      try:
        verify_checkpoint(path)
        return step
      except DamagedCheckpointError as e:
        moved = self._move_aside(step)
        logging.error('Checkpoint of step %d at %s is damaged (%s); moved it to %s and trying '
                      'the previous one.', step, path, e, moved)
    return -1

  def _move_aside(self, step: int) -> str:
    source = f'{self.directory}/{step}'
    target = f'{source}{_DAMAGED_SUFFIX}'
    n = 1
    while fileio.exists(target):
      n += 1
      target = f'{source}{_DAMAGED_SUFFIX}{n}'
    fileio.rename(source, target)
    self._manager.reload()
    return target

  def damaged_checkpoints(self) -> list[str]:
    """The checkpoint directories that an earlier resume moved aside as damaged."""
    return fileio.glob(f'{self.directory}/*{_DAMAGED_SUFFIX}*')

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
    """Waits for the pending asynchronous save; raises CheckpointWriteError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._write_error(self._pending_step, e) from e
    self._check_previous_save()

  def close(self) -> None:
    """Finishes the pending save and releases Orbax's threads; raises a failed save's error once."""
    try:
      if not self._failed:
        self.wait()
    finally:
      if self._previous_handler is not None:
        signal.signal(signal.SIGTERM, self._previous_handler)
        self._previous_handler = None
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-exception-caught
        if not self._failed:  # After a failed save its error was raised already.
          raise


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
  step_dir = f'{directory.rstrip("/")}/{step}'
  try:
    verify_checkpoint(step_dir, arrays_prefix='params.')
  except DamagedCheckpointError as e:
    raise DamagedCheckpointError(
        f'The checkpoint {step_dir} cannot be read: {e}. A file of it is truncated, missing or '
        'garbled. Pass another step (a checkpoints/<step> directory of the same run) or another '
        'run; resuming training in that workdir moves the damaged step aside by itself.') from None
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
