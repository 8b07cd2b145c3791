r"""One process of a multi-host test job; writes what it saw for the test to compare.

  python tests/multihost/worker.py --check=input --data_dir=DIR --out=OUT \
      --process_id=I --num_processes=2 --port=PORT

Checks:
  * `input`: the train stream (whole split and a labelled subset) and the eval batches this
    process reads, as hashes of the examples, and where `subset_ids.txt` was written.
  * `state`: a train state with known random values, sharded across the processes, saved by
    `checkpoints.Checkpointer` and restored; its host copy (`initialization.host_copy`); the parameters
    as `checkpoints.load_params` reads them; segmentation (with its confusion matrix) and
    denoising evaluations; the files `train._save_config` / `evaluate.write_results` write.

Outputs go to OUT/process_<i>/. The functions here also compute the single-process references
in the test process, so both sides build exactly the same configs, data and states.
"""

import hashlib
import json
import os
import sys
from typing import Any, Iterable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from ddep_jax import checkpoints
from ddep_jax import evaluate
from ddep_jax import initialization
from ddep_jax import metrics
from ddep_jax import optimizer as optimizer_lib
from ddep_jax import sharding
from ddep_jax import train
from ddep_jax import train_step as train_step_lib
from ddep_jax.data import datasets
from ddep_jax.data import input_pipeline

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position

# Decoder parameters split over all 4 devices of the 2 processes, so that no process holds a
# whole decoder kernel: checkpoints, restores and host copies must really gather across hosts.
FSDP_ACROSS_PROCESSES = dict(mesh=(('data', 1), ('fsdp', -1)),
                             sharding_rules=(('decoder/.*', 'fsdp'), ('.*', 'replicate')))
TRAIN_SPLIT = 'train[:40]'  # 20 examples per process and epoch.
SUBSET_COUNT = 12  # A labelled subset of TRAIN_SPLIT: 6 examples per process and epoch.
# An odd number of eval examples: the processes read 7 and 6, padded to the same 4 batches of 2.
EVAL_SPLIT = 'validation[:13]'
EVAL_BATCH_SIZE = 4
STATE_SEED = 7
STATE_STEP = 3

_CHECKS = ('input', 'state')
FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Only when run as a script: test_multihost imports this module next to others with flags.
  flags.DEFINE_enum('check', None, _CHECKS, 'What to run.')
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir with the digit scenes prepared.')
  flags.DEFINE_string('out', None, 'Output directory shared by the processes.')
  flags.DEFINE_integer('process_id', None, 'This process.')
  flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
  flags.DEFINE_integer('port', None, "The coordinator's port on 127.0.0.1.")


# -- Configs and data, shared with the test process -----------------------------------------------

def make_config(task: str, data_dir: str):
  """The tiny config of `task` with FSDP across processes and a small, oddly sized eval split."""
  config = tiny_config.get_config(f'task={task},data_dir={data_dir}')
  config.mesh = FSDP_ACROSS_PROCESSES['mesh']
  config.sharding_rules = FSDP_ACROSS_PROCESSES['sharding_rules']
  config.input.split = TRAIN_SPLIT
  config.evals.val.split = EVAL_SPLIT
  config.evals.val.batch_size = EVAL_BATCH_SIZE
  return config


def example_hashes(batches: Iterable[dict], keys: tuple[str, ...], count: int | None = None,
                   where: str | None = None) -> list[str]:
  """sha1 of the `keys` arrays of each example, in stream order (the first `count` of them).

  `where` names a bool field: only examples where it is True are kept (eval padding is not).
  """
  out = []
  for batch in batches:
    for i in range(len(batch[keys[0]])):
      if where is not None and not batch[where][i]:
        continue
      digest = hashlib.sha1()
      for key in keys:
        digest.update(np.ascontiguousarray(batch[key][i]).tobytes())
      out.append(digest.hexdigest())
      if count is not None and len(out) == count:
        return out
  return out


def train_epoch_hashes(input_config, *, process_index: int, process_count: int,
                       workdir: str | None = None) -> list[str]:
  """Hashes of the first epoch of this process's train stream (segmentation examples)."""
  stream = input_pipeline.get_train_dataset(
      input_config, 'segment', seed=0, process_index=process_index,
      process_count=process_count, workdir=workdir)
  # Each process's part holds num_examples / process_count examples (even sizes here).
  return example_hashes(stream, ('image', 'label'), stream.num_examples // process_count)


def eval_summary(eval_config, *, process_index: int, process_count: int) -> dict:
  batches, num_batches = input_pipeline.get_eval_dataset(
      eval_config, 'segment', process_index=process_index, process_count=process_count)
  batches = list(batches)
  return {'num_batches': num_batches, 'batches_read': len(batches),
          'num_padding': int(sum(np.sum(~b['valid']) for b in batches)),
          'valid': example_hashes(batches, ('image', 'label', 'orig_size'), where='valid')}


def subset_config(input_config):
  """`input_config` reading a labelled subset of SUBSET_COUNT examples."""
  config = input_config.copy_and_resolve_references()
  config.label_count = SUBSET_COUNT
  return config


# -- Train states with known values, shared with the test process ---------------------------------

def abstract_state(config, model):
  """The train state `{'step', 'params', 'opt_state'}` of `config` as ShapeDtypeStructs."""
  image_shape = initialization.image_shape(config)  # pylint: disable=protected-access
  params = train_step_lib.abstract_params(config, model, image_shape)
  opt = optimizer_lib.make_optimizer(config, params, int(config.total_steps))
  return jax.eval_shape(lambda p: {'step': jnp.zeros((), jnp.int32), 'params': p,
                                   'opt_state': opt.tx.init(p)}, params)


def random_values(abstract: Any, seed: int) -> Any:
  """Host numpy leaves with the shapes / dtypes of `abstract`, reproducibly random."""
  rng = np.random.default_rng(seed)

  def value(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      return rng.normal(0.0, 0.3, leaf.shape).astype(leaf.dtype)
    return rng.integers(1, 100, leaf.shape).astype(leaf.dtype)

  return jax.tree.map(value, abstract)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                      shardings)


def place(values: Any, shardings: Any) -> Any:
  """Host values -> global arrays; every process passes the same full values."""
  return jax.tree.map(
      lambda v, s: jax.make_array_from_callback(v.shape, s, lambda index: v[index]), values,
      shardings)


def flat(tree: Any) -> dict[str, np.ndarray]:
  """'a/b/c' -> numpy array, for npz files and comparisons."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {optimizer_lib.path_name(path): np.asarray(leaf) for path, leaf in leaves}


class ConfusionSpy:
  """Records every confusion matrix `metrics.ConfusionMatrix.compute` turns into results."""

  def __init__(self):
    self.matrices = []
    self._compute = metrics.ConfusionMatrix.compute

  def __enter__(self):
    spy = self

    def compute(matrix, *args, **kwargs):
      spy.matrices.append(matrix.matrix.copy())
      return spy._compute(matrix, *args, **kwargs)  # pylint: disable=protected-access

    metrics.ConfusionMatrix.compute = compute
    return self

  def __exit__(self, *exc_info):
    metrics.ConfusionMatrix.compute = self._compute


def denoise_params(config, model, mesh):
  """Known random parameters of the denoising model, placed on `mesh`."""
  abstract = abstract_state(config, model)['params']
  return initialization.place_params(random_values(abstract, STATE_SEED + 1), model, config, mesh)


# -- The checks -----------------------------------------------------------------------------------

def check_input(config, out: str) -> None:
  index, count = jax.process_index(), jax.process_count()
  workdir = os.path.join(out, 'workdir')
  result = {
      'train': train_epoch_hashes(config.input, process_index=index, process_count=count),
      'subset': train_epoch_hashes(subset_config(config.input), process_index=index,
                                   process_count=count, workdir=workdir),
      'eval': eval_summary(config.evals.val, process_index=index, process_count=count),
  }
  _write_json(os.path.join(out, 'input.json'), result)


def check_state(config, out: str, shared: str) -> None:
  mesh = sharding.make_mesh(config)
  model = initialization.build_model_for(config)
  abstract = abstract_state(config, model)
  shardings = sharding.state_shardings(abstract, mesh, config)
  state = place(random_values(abstract, STATE_SEED), shardings)
  run_dir = os.path.join(shared, 'run')

  ckpt = checkpoints.Checkpointer(run_dir)
  ckpt.save(STATE_STEP, state, {'step': STATE_STEP, 'task': config.task,
                                'model_name': config.model.name}, force=True)
  ckpt.close()
  ckpt = checkpoints.Checkpointer(run_dir)
  restored = ckpt.restore(ckpt.latest_step(), with_shardings(abstract, shardings))
  ckpt.close()
  host_copy = initialization.host_copy(restored)  # pylint: disable=protected-access
  np.savez(os.path.join(out, 'restored.npz'), **flat(host_copy))
  loaded, _ = checkpoints.load_params(run_dir)
  np.savez(os.path.join(out, 'loaded_params.npz'), **flat(loaded))

  with ConfusionSpy() as spy:
    segment, _ = evaluate.make_evaluators(config, model, mesh)[0].run(restored['params'])
  denoise_config = make_config('denoise', config.input.data_dir)
  denoise_model = initialization.build_model_for(denoise_config)
  denoise, _ = evaluate.make_evaluators(denoise_config, denoise_model, mesh)[0].run(
      denoise_params(denoise_config, denoise_model, mesh))

  # Written by process 0 only, each process into its own directory here, so that a second
  # writer would show up.
  workdir = os.path.join(out, 'workdir')
  train._save_config(config, workdir)  # pylint: disable=protected-access
  evaluate.write_results(workdir, 'val', segment, step=STATE_STEP, final=True)
  held_in_part = sum(holds_part(leaf) for leaf in jax.tree.leaves(restored['params']))
  _write_json(os.path.join(out, 'state.json'), {
      'segment': segment, 'confusion': spy.matrices[0].tolist(), 'denoise': denoise,
      'params_held_in_part': held_in_part})


def holds_part(array: jax.Array) -> bool:
  """Whether this process holds only some of the shards of `array` (the others hold the rest)."""
  local = {str(s.index) for s in array.addressable_shards}
  every = {str(i) for i in array.sharding.devices_indices_map(array.shape).values()}
  return local != every


def _write_json(path: str, value: Any) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=1, sort_keys=True, allow_nan=True)


def main(argv):
  del argv
  datasets.disable_tfds_gcs()
  config = make_config('segment', FLAGS.data_dir)
  config.distributed.initialize = True
  config.distributed.coordinator_address = f'127.0.0.1:{FLAGS.port}'
  config.distributed.num_processes = FLAGS.num_processes
  config.distributed.process_id = FLAGS.process_id
  assert sharding.initialize_distributed(config)
  out = os.path.join(FLAGS.out, f'process_{jax.process_index()}')
  os.makedirs(out, exist_ok=True)
  if FLAGS.check == 'input':
    check_input(config, out)
  else:
    check_state(config, out, FLAGS.out)


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['check', 'data_dir', 'out', 'process_id', 'num_processes', 'port'])
  app.run(main)
