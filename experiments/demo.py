r"""`make demo`: a miniature DDeP reproduction, end to end, on a laptop CPU.

  python -m experiments.demo --workdir=workdirs/demo [--smoke]   # from the repository root
  python -m experiments.demo --workdir=workdirs/demo --subset_seeds=0,1,2  # other subsets

1. Prepares the embedded dataset `ddep_digit_scenes` (MNIST digits on photographs, built from
   files inside installed wheels: no download) into `<workdir>/tfds` with TFDS.
2. Pretrains, with the project's trainer and `configs/demo.py`: a supervised encoder
   (`pretrain/supervised`), then DDeP, its decoder denoising with that encoder frozen
   (`pretrain/ddep`), and DeP, the whole model denoising from scratch (`pretrain/dep`).
3. Fine-tunes for segmentation from each initialisation (No pretraining, Supervised, DeP, DDeP)
   at several label fractions, over several labelled subsets, all with one recipe: the sweep of
   `configs/demo.py` (`get_sweep`), each run in `finetune/<run name>` with its `run.json`.
   `--subset_seeds` picks the labelled subsets (default: the config's, 100, 101, 102):
   fine-tuning runs are named by their subset seed, so other seeds add runs to the same work
   directory (reusing its pretraining) and the table is of the runs with these seeds only.
4. Tabulates mIoU mean ± std per initialisation x label fraction with
   `experiments.collect_results` (the paper's Table 2 / Fig. 6 shape) into `results.md` and
   `results.csv`, and plots mIoU versus label fraction (Fig. 1, right) into
   `label_efficiency.png` (with other than the default subset seeds, e.g. `results.md` becomes
   `results-subset_seeds=0_1_2.md`).
5. Draws the first validation scenes, their ground truth and each method's prediction at each
   label fraction (the runs of the first subset seed) into `predictions.png`
   (`experiments.demo_figures`).

Each finished run prints a line with its metric, its time, the time so far and an estimate of
the time its process still needs (ETA: the process's remaining runs at its pace so far, weighed
by examples trained).

`--config_arg=k=v,...` adds entries to the argument of `configs/demo.py` for every run, e.g.
`--config_arg=stride=4` for the stride-4 hybrid (8x8 tokens); use a fresh `--workdir` for it.

Every run is a `ddep_jax.train.train_and_evaluate` call, in this process or, with `--jobs=2` (the
default), in one worker process that takes the runs that do not depend on the supervised
encoder (`demo_runs.execute_all`), so that both cores of a laptop are busy. JAX's persistent
compilation cache (`<workdir>/jax_cache`) lets runs that compile the same programs (every
fine-tuning run does) load them instead of compiling again. Running the demo again in the same
work directory skips the runs whose results are final and resumes interrupted ones from their
checkpoints; a run directory left by a different config (e.g. `--smoke` into the same work
directory) is an error rather than silently reused.

This is experiment tooling: it runs from the repository root (`configs/demo.py` and
`experiments/` are read from there), as `make demo` does.
"""

import dataclasses
import logging as std_logging
import os
import time
from typing import Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import flax
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddep_jax import checkpoints
from ddep_jax import fileio
from ddep_jax.data import datasets
from ddep_jax.data.builders import digit_scenes
from experiments import collect_results
from experiments import demo_figures
from experiments import demo_runs
from experiments import results_table
from experiments import sweep
# pylint: enable=g-import-not-at-top,wrong-import-position

# Table rows in the paper's order (Table 2): No pretraining, Supervised, DeP, DDeP.
ROW_ORDER = ('none', 'supervised', 'dep', 'ddep')
# Log records at INFO that reach the console: the trainer's own lines (mesh, initialisation,
# evaluations), its train metrics and its steps/s reports. Anything at WARNING or above always.
_INFO_SOURCES = (os.sep + 'ddep_jax' + os.sep, os.path.join('metric_writers', 'logging_writer'),
                 'periodic_actions')


# ------------------------------------------------------------------------------------------------
# Set-up: logging, compilation cache, data.
# ------------------------------------------------------------------------------------------------


class _ModestFilter(std_logging.Filter):
  """Passes warnings and the trainer's own INFO lines; drops library chatter (Orbax, TFDS, ...)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      # TensorFlow and TFDS repeat notices about their own deprecated APIs for every run.
      return 'deprecated' not in record.getMessage()
    return record.levelno >= std_logging.INFO and any(s in record.pathname
                                                      for s in _INFO_SOURCES)


def configure_logging() -> None:
  """INFO from the trainer (a line per eval, train metrics every `log_every_steps`), quiet else."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _ModestFilter) for f in handler.filters):
    handler.addFilter(_ModestFilter())


def enable_compilation_cache(cache_dir: str) -> None:
  """Stores every compiled program under `cache_dir` and loads it back when compiled again.

  Each `train_and_evaluate` builds new jitted functions, so JAX's in-memory caches never hit
  across runs; the persistent cache is keyed by the program itself, so the fine-tuning runs
  (same shapes, same constants) compile once and later runs (and re-runs of the demo) load it.
  """
  fileio.makedirs(cache_dir)
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def check_frozen_encoder(workdir: str) -> tuple[int, int]:
  """(#encoder arrays bitwise equal, #encoder arrays) between the DDeP and supervised runs."""
  supervised, _ = checkpoints.load_params(fileio.join(workdir, 'pretrain', 'supervised'))
  ddep, _ = checkpoints.load_params(fileio.join(workdir, 'pretrain', 'ddep'))
  flat_supervised = flax.traverse_util.flatten_dict(supervised['encoder'])
  flat_ddep = flax.traverse_util.flatten_dict(ddep['encoder'])
  equal = sum(1 for k, v in flat_ddep.items()
              if k in flat_supervised and np.array_equal(v, flat_supervised[k]))
  return equal, len(flat_ddep)


# ------------------------------------------------------------------------------------------------
# Results.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outputs:
  """What the demo wrote: the table (as a `results_table.Table`) and the file paths."""
  table: results_table.Table
  markdown: str
  markdown_path: str
  csv_path: str
  plot_path: str
  predictions_path: str | None = None  # Drawn by run_demo from the checkpoints, not the table.


def output_suffix(subset_seeds: Sequence[int] | None) -> str:
  """'' for the default subsets, else e.g. '-subset_seeds=100_101_102' (the outputs' names)."""
  if subset_seeds is None:
    return ''
  return '-subset_seeds=' + '_'.join(str(int(s)) for s in subset_seeds)


def write_outputs(workdir: str, runs: Sequence[demo_runs.DemoRun],
                  subset_seeds: Sequence[int] | None = None) -> Outputs:
  """Aggregates the fine-tuning `runs` into `results.md`, `results.csv`, `label_efficiency.png`.

  Only the runs of this demo's plan count: runs of other subset seeds in the same work directory
  do not enter the table. Other than the default seeds name the files (`output_suffix`).
  """
  records = results_table.load_records([r.workdir for r in runs if r.sweep_run is not None])
  seeds = demo_runs.planned_seeds(runs)
  # One shared recipe: there are no hyper-parameters to choose per cell.
  table = results_table.aggregate(records, row_key='init', col_key='label_fraction',
                                  seed_key='subset_seed', hparam_keys=(), metric='mIoU',
                                  select_eval=demo_runs.EVAL_NAME, row_order=ROW_ORDER)
  markdown = (f'{collect_results.caption(table)} Labelled subsets (`subset_seed`): '
              f'{", ".join(str(s) for s in seeds)}.\n\n{collect_results.to_markdown(table)}\n')
  suffix = output_suffix(subset_seeds)
  paths = {'md': fileio.join(workdir, f'results{suffix}.md'),
           'csv': fileio.join(workdir, f'results{suffix}.csv'),
           'png': fileio.join(workdir, f'label_efficiency{suffix}.png')}
  fileio.write_text(paths['md'], markdown)
  fileio.write_text(paths['csv'], collect_results.to_csv(table))
  collect_results.plot_label_efficiency(
      table, paths['png'], title='Digit scenes: mIoU vs labelled fraction (demo)')
  return Outputs(table=table, markdown=markdown, markdown_path=paths['md'],
                 csv_path=paths['csv'], plot_path=paths['png'])


def demo_dirs(workdir: str, data_dir: str | None) -> tuple[str, str]:
  """The work and data directories, local ones made absolute (workers start in the repository
  root, `demo_runs.REPO_ROOT`)."""
  workdir = fileio.abspath(workdir)
  return workdir, fileio.abspath(data_dir) if data_dir else fileio.join(workdir, 'tfds')


def parse_subset_seeds(values: Sequence[str] | None, smoke: bool) -> tuple[int, ...] | None:
  """The `--subset_seeds` flag as ints; None when not given or equal to the config's default."""
  if not values:
    return None
  try:
    seeds = tuple(int(v) for v in values)
  except ValueError:
    raise ValueError(f'--subset_seeds={",".join(values)}: expected integers separated by ",", '
                     'e.g. --subset_seeds=100,101,102.') from None
  config_module = sweep.load_config_module(demo_runs.CONFIG_FILE)
  default = config_module.SMOKE_SUBSET_SEEDS if smoke else config_module.SUBSET_SEEDS
  return None if seeds == tuple(default) else seeds


def run_demo(workdir: str, *, smoke: bool = False, data_dir: str | None = None,
             jobs: int = 2, subset_seeds: Sequence[int] | None = None,
             config_arg: str = '') -> Outputs:
  """Runs the whole demo in `workdir` (see the module docstring); returns what it wrote.

  Progress goes to stdout, one line per run; `jobs` (1 or 2) processes share the runs (see
  `demo_runs.execute_all`). `subset_seeds` (None: the config's) are the fine-tuning sweep's
  labelled subsets; `config_arg` adds `k=v` entries to every run's config argument (e.g.
  `stride=4`).
  """
  start_time = time.time()
  workdir, data_dir = demo_dirs(workdir, data_dir)
  fileio.makedirs(workdir)
  enable_compilation_cache(fileio.join(workdir, 'jax_cache'))
  runs = demo_runs.plan_runs(workdir, data_dir, smoke, subset_seeds, config_arg)
  num_finetune = sum(r.sweep_run is not None for r in runs)
  seeds = demo_runs.planned_seeds(runs)
  print(f'DDeP demo{" (smoke)" if smoke else ""} in {workdir}: {len(runs) - num_finetune} '
        f'pretraining + {num_finetune} fine-tuning runs (subset seeds '
        f'{", ".join(str(s) for s in seeds)}{"; " + config_arg if config_arg else ""}) in '
        f'{jobs} process(es), each on {jax.device_count()} '
        f'{jax.devices()[0].platform.upper()} device(s).', flush=True)

  prepared = time.time()
  digit_scenes.prepare(data_dir)
  print(f'Dataset ddep_digit_scenes ready in {data_dir} ({time.time() - prepared:.0f} s).',
        flush=True)

  demo_runs.execute_all(runs, jobs=jobs, workdir=workdir, data_dir=data_dir, smoke=smoke,
                        start_time=start_time, subset_seeds=subset_seeds, config_arg=config_arg)
  equal, total = check_frozen_encoder(workdir)
  print(f'DDeP encoder vs supervised encoder: {equal} of {total} arrays bitwise equal '
        f'({"frozen" if equal == total else "NOT frozen"}).', flush=True)

  outputs = write_outputs(workdir, runs, subset_seeds)
  predictions = demo_figures.write_predictions(
      fileio.join(workdir, f'predictions{output_suffix(subset_seeds)}.png'), runs, data_dir,
      inits=ROW_ORDER,
      num_scenes=demo_figures.SMOKE_NUM_SCENES if smoke else demo_figures.NUM_SCENES)
  outputs = dataclasses.replace(outputs, predictions_path=predictions)
  elapsed = time.time() - start_time
  print(f'\n{outputs.markdown}')
  print(f'Wrote {outputs.markdown_path}, {outputs.csv_path}, {outputs.plot_path} and '
        f'{outputs.predictions_path}.')
  load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  print(f'Total {demo_runs.clock(elapsed)} (load average over 1, 5, 15 min: {load}).', flush=True)
  return outputs


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  datasets.confine_tensorflow()
  tfds.disable_progress_bar()
  tf.get_logger().setLevel('ERROR')  # TensorFlow's Python warnings (deprecations) bypass absl.
  configure_logging()
  subset_seeds = parse_subset_seeds(FLAGS.subset_seeds, FLAGS.smoke)
  if FLAGS.runs:  # A worker started by another demo process.
    workdir, data_dir = demo_dirs(FLAGS.workdir, FLAGS.data_dir)
    enable_compilation_cache(fileio.join(workdir, 'jax_cache'))
    demo_runs.execute_named(FLAGS.runs, workdir=workdir, data_dir=data_dir,
                            smoke=FLAGS.smoke, start_time=FLAGS.started_at,
                            subset_seeds=subset_seeds, config_arg=FLAGS.config_arg)
    return
  run_demo(FLAGS.workdir, smoke=FLAGS.smoke, data_dir=FLAGS.data_dir, jobs=int(FLAGS.jobs),
           subset_seeds=subset_seeds, config_arg=FLAGS.config_arg)


def _define_flags() -> None:
  """Defines the flags; only when run as a program, so the module imports as a library."""
  flags.DEFINE_string('workdir', None, 'Directory of the demo: data, runs, results.')
  flags.DEFINE_bool('smoke', False, 'A seconds-long version (configs/demo.py runlocal): a few '
                    'steps per stage, fewer label fractions and subsets.')
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir of ddep_digit_scenes (default '
                      '<workdir>/tfds); prepared there when missing.')
  flags.DEFINE_list('subset_seeds', None, 'Labelled subsets (their seeds) of the fine-tuning '
                    'sweep, e.g. 0,1,2 (default: configs/demo.py SUBSET_SEEDS, 100,101,102; smoke '
                    '0,1). Runs are named by seed; the table holds these seeds\' runs only.')
  flags.DEFINE_string('config_arg', '', 'More k=v entries of the configs/demo.py argument for '
                      'every run, comma-separated, e.g. stride=4 (use a fresh --workdir).')
  flags.DEFINE_enum('jobs', '2', ['1', '2'], 'Processes that share the runs: 2 runs the two '
                    'independent chains of runs side by side (both cores of a laptop busy).')
  # Set by the demo for its worker processes.
  flags.DEFINE_list('runs', [], 'Worker mode: run only these runs (names as pretrain/dep, '
                    'finetune/init=...) and exit.')
  flags.DEFINE_float('started_at', None, 'Worker mode: start time of the demo (for progress).')
  flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  _define_flags()
  app.run(main)
