"""The runs of `make demo` (`experiments.demo`): what runs, with which config, and running them.

`plan_runs` lists every run in order (the three pretraining stages of `configs/demo.py`, then its
fine-tuning sweep); `execute` runs or skips each (a run whose final results exist is skipped,
one left by another config is refused); `execute_all` shares them between this process and a
worker process (`python -m experiments.demo --runs=...`), one independent chain each.
"""

import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence

import flax

from ddep_jax import fileio
from ddep_jax import train
from experiments import hyper
from experiments import sweep

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO_ROOT, 'configs', 'demo.py')
EVAL_NAME = 'val'
_DESCRIPTIONS = {
    'supervised': 'supervised encoder (classify digits)',
    'ddep': 'DDeP: decoder denoising, encoder frozen',
    'dep': 'DeP: whole model denoising from scratch',
}


@dataclasses.dataclass(frozen=True)
class DemoRun:
  """One trainer run of the demo: its name, config argument, work directory and tags."""
  name: str
  config_arg: str
  workdir: str
  task: str
  tags: dict[str, Any] = dataclasses.field(default_factory=dict)
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  sweep_run: sweep.Run | None = None  # Fine-tuning runs: the sweep entry (for run.json).


def _check_path(kind: str, path: str) -> str:
  for character in ',+=':
    if character in path:
      raise ValueError(f'{kind} {path!r} contains {character!r}, which the config argument '
                       f'({CONFIG_FILE}:k=v,...) cannot hold; choose a path without ",", "+" '
                       'and "=".')
  return path


# Keys of the config argument that the demo sets itself (flags, the stages and the sweep).
_DEMO_ARG_KEYS = ('stage', 'init', 'label_fraction', 'subset_seed', 'subset_seeds', 'root',
                  'data_dir', 'runlocal')


def base_arg(workdir: str, data_dir: str, smoke: bool,
             subset_seeds: Sequence[int] | None = None, config_arg: str = '') -> str:
  """The config argument shared by every run of one demo.

  `subset_seeds` (None: the config's default) and `config_arg` (more `k=v` entries, e.g.
  `stride=4`) are left out when not given, so that the default demo's runs keep their
  arguments.
  """
  arg = (f'root={_check_path("--workdir", workdir)},'
         f'data_dir={_check_path("--data_dir", data_dir)},runlocal={smoke}')
  if subset_seeds is not None:
    arg += f',subset_seeds={hyper.compact_value(tuple(int(s) for s in subset_seeds))}'
  for item in (i for i in config_arg.split(',') if i):
    key = item.split('=', 1)[0]
    if key in _DEMO_ARG_KEYS:
      raise ValueError(f'--config_arg sets {key!r}, which the demo sets itself (flags '
                       '--workdir, --data_dir, --smoke, --subset_seeds; stages and sweep).')
    arg += f',{item}'
  return arg


def plan_runs(workdir: str, data_dir: str, smoke: bool,
              subset_seeds: Sequence[int] | None = None, config_arg: str = '') -> list[DemoRun]:
  """Every run of the demo, in the order they must run: pretraining, then the sweep."""
  config_module = sweep.load_config_module(CONFIG_FILE)
  arg = base_arg(workdir, data_dir, smoke, subset_seeds, config_arg)
  runs = []
  for stage in config_module.PRETRAIN_STAGES:
    stage_arg = f'stage={stage},{arg}'
    runs.append(DemoRun(name=f'pretrain/{stage}', config_arg=stage_arg,
                        workdir=fileio.join(workdir, 'pretrain', stage),
                        task=config_module.get_config(stage_arg).task))
  sweep_runs = sweep.expand(CONFIG_FILE, f'stage=finetune,{arg}',
                            config_module.get_sweep(hyper, f'stage=finetune,{arg}'),
                            fileio.join(workdir, 'finetune'))
  for run in sweep_runs:
    runs.append(DemoRun(name=f'finetune/{run.name}', config_arg=run.config_arg,
                        workdir=run.workdir, task='segment', tags=run.tags,
                        overrides=run.overrides, sweep_run=run))
  return runs


def planned_seeds(runs: Sequence[DemoRun]) -> list[int]:
  """The subset seeds of the fine-tuning runs in `runs`, sorted."""
  return sorted({r.tags['subset_seed'] for r in runs if r.sweep_run is not None})


def run_config(run: DemoRun):
  """The locked config of `run`: `get_config(config_arg)` plus the sweep's overrides."""
  config = sweep.load_config_module(CONFIG_FILE).get_config(run.config_arg)
  if run.overrides:
    with config.unlocked():
      config.update_from_flattened_dict(dict(run.overrides), strip_prefix='config.')
  return config


def config_json(config) -> dict:
  """The config as its `config.json` reads back (tuples as lists)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def check_same_config(run: DemoRun, config) -> None:
  """Refuses to reuse a run directory whose `config.json` differs from this demo's config."""
  path = fileio.join(run.workdir, 'config.json')
  if not fileio.exists(path):
    return
  stored = fileio.read_json(path)
  wanted = config_json(config)
  if stored != wanted:
    stored, wanted = flat_config(stored), flat_config(wanted)
    differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    raise ValueError(f'{run.workdir} holds a run of a different config (differs in '
                     f'{differ[:8]}), e.g. a --smoke run or an edited configs/demo.py. Use '
                     'another --workdir, or delete that directory to run it again.')


def flat_config(tree: dict) -> dict[str, Any]:
  """A JSON config as {'dotted.key': value}."""
  return flax.traverse_util.flatten_dict(tree, sep='.')


def final_results(workdir: str) -> dict | None:
  """The run's final `results/val.json`, or None when it has not finished."""
  if sweep.status(workdir) != 'finished':
    return None
  return fileio.read_json(fileio.join(workdir, 'results', f'{EVAL_NAME}.json'))


def summarize(task: str, results: dict) -> str:
  """The one number (or two) that says how a run did."""
  if task == 'segment':
    return f'mIoU {100 * results["mIoU"]:.2f}'
  if task == 'classify':
    return f'top-1 {100 * results["top1"]:.1f} %'
  return (f'denoising loss {results["loss"]:.4f}, PSNR {results["psnr"]:.2f} dB '
          f'(noisy input {results["psnr_input"]:.2f} dB)')


def describe(run: DemoRun) -> str:
  if run.sweep_run is None:
    return _DESCRIPTIONS[run.name.split('/', 1)[1]]
  tags = dict(run.tags)
  fraction = tags.pop('label_fraction')
  return (f'fine-tune init={tags.pop("init")}, {100 * fraction:g} % labels, '
          f'subset {tags.pop("subset_seed")}')


def clock(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(round(seconds))))


def work(config) -> int:
  """A run's amount of work, for the ETA: the training examples it processes."""
  return int(config.total_steps) * int(config.input.batch_size)


def eta_seconds(done: Sequence[tuple[float, float | None]], left: Sequence[float]) -> float:
  """Seconds the runs of work `left` should take at the pace of the lane's runs `done`.

  Args:
    done: `(work, seconds)` of each run so far, at least one of them trained; `seconds` None
      for a skipped (finished) run, which took no time and so does not count.
    left: the work of each run still to train.
  """
  timed = [(w, s) for w, s in done if s is not None]
  if not left:
    return 0.0
  return sum(s for _, s in timed) * sum(left) / sum(w for w, _ in timed)


def execute(indexed_runs: Sequence[tuple[int, DemoRun]], *, total: int,
            start_time: float) -> None:
  """Runs (or skips, when finished) each `(index, run)` in order, printing one line per run.

  A trained run's line ends with the ETA of this process's remaining runs (`eta_seconds`).
  """
  width = len(str(total))
  configs = [run_config(run) for _, run in indexed_runs]
  earlier = [final_results(run.workdir) for _, run in indexed_runs]
  done = []  # (work, seconds or None) of each run so far.
  for position, ((index, run), config, results) in enumerate(zip(indexed_runs, configs, earlier)):
    check_same_config(run, config)
    prefix = f'[{index:>{width}}/{total}] {describe(run)}'
    if results is not None:
      print(f'{prefix}: finished earlier, {summarize(run.task, results)}', flush=True)
      done.append((work(config), None))
      continue
    if run.sweep_run is not None:
      fileio.write_json(fileio.join(run.workdir, 'run.json'), run.sweep_run.run_json())
    print(f'{prefix} ...', flush=True)
    started = time.time()
    all_results = train.train_and_evaluate(config, run.workdir)
    if EVAL_NAME not in all_results:
      raise RuntimeError(f'{run.workdir} stopped before its final evaluation (preempted?); run '
                         'the demo again to resume it.')
    seconds = time.time() - started
    done.append((work(config), seconds))
    left = [work(c) for c, r in zip(configs[position + 1:], earlier[position + 1:]) if r is None]
    print(f'{prefix}: {summarize(run.task, all_results[EVAL_NAME])} '
          f'({seconds:.0f} s; {clock(time.time() - start_time)} so far, '
          f'ETA {clock(eta_seconds(done, left))})', flush=True)


# ------------------------------------------------------------------------------------------------
# Workers: other processes that run some of the runs, so that two CPU cores are both busy.
# ------------------------------------------------------------------------------------------------


class _Workers:
  """Worker processes (`python -m experiments.demo --runs=...`), each running its runs in order.

  A worker shares the work directory, the data and the compilation cache, and prints its
  progress lines to this process's stdout / stderr. Used as a context manager: leaving the
  block waits for every worker; an error in this process first stops them (SIGTERM: the trainer
  saves a checkpoint and exits, so a later run of the demo resumes).
  """

  def __init__(self, workdir: str, data_dir: str, smoke: bool, start_time: float,
               subset_seeds: Sequence[int] | None = None, config_arg: str = ''):
    self._common = [sys.executable, '-m', 'experiments.demo', f'--workdir={workdir}',
                    f'--data_dir={data_dir}', '--smoke' if smoke else '--nosmoke',
                    f'--started_at={start_time!r}', f'--config_arg={config_arg}']
    if subset_seeds is not None:
      self._common.append('--subset_seeds=' + ','.join(str(s) for s in subset_seeds))
    self._processes = []

  def start(self, runs: Sequence[DemoRun]) -> None:
    if not runs:
      return
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
    command = self._common + ['--runs=' + ','.join(run.name for run in runs)]
    self._processes.append((subprocess.Popen(command, cwd=REPO_ROOT, env=env),
                            [run.name for run in runs]))

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      for process, _ in self._processes:
        if process.poll() is None:
          process.terminate()
    failed = [(process.wait(), names) for process, names in self._processes]
    failed = [(code, names) for code, names in failed if code != 0]
    if failed and exc_type is None:
      details = '; '.join(f'exit status {code} while running {names}' for code, names in failed)
      raise RuntimeError(f'{len(failed)} demo worker(s) failed ({details}); their errors are '
                         'above. Run the demo again to resume.')
    return False


# The runs form two chains that share nothing, so two processes can run them side by side:
# supervised -> DDeP -> fine-tuning from either, and DeP -> fine-tuning from DeP or from scratch.
_LANE_OF_STAGE = {'supervised': 0, 'ddep': 0, 'dep': 1}
_LANE_OF_INIT = {'supervised': 0, 'ddep': 0, 'none': 1, 'dep': 1}


def lanes(runs: Sequence[DemoRun]) -> list[list[tuple[int, DemoRun]]]:
  """The two independent chains of runs (see `_LANE_OF_STAGE`), as (index, run) in order."""
  split = [[], []]
  for index, run in enumerate(runs, 1):
    lane = (_LANE_OF_INIT[run.tags['init']] if run.sweep_run is not None
            else _LANE_OF_STAGE[run.name.split('/', 1)[1]])
    split[lane].append((index, run))
  return split


def execute_all(runs: Sequence[DemoRun], *, jobs: int, workdir: str, data_dir: str, smoke: bool,
                start_time: float, subset_seeds: Sequence[int] | None = None,
                config_arg: str = '') -> None:
  """Runs every run: in this process (`jobs=1`), or in two (`jobs=2`), one chain each.

  With two, a worker process takes the DeP chain (DeP, then fine-tuning from scratch and from
  DeP) while this process runs supervised -> DDeP and the fine-tuning from those. The first to
  reach fine-tuning compiles its programs; the other loads them from the cache if they are there
  by then (else it compiles them too).
  """
  if jobs not in (1, 2):
    raise ValueError(f'jobs={jobs}: the demo runs in 1 or 2 processes (its runs form two '
                     'independent chains).')
  total = len(runs)
  if jobs == 1:
    execute(list(enumerate(runs, 1)), total=total, start_time=start_time)
    return
  own, other = lanes(runs)
  with _Workers(workdir, data_dir, smoke, start_time, subset_seeds, config_arg) as workers:
    if all(final_results(r.workdir) is not None for _, r in other):
      execute(other, total=total, start_time=start_time)  # Only prints their lines.
    else:
      workers.start([r for _, r in other])
    execute(own, total=total, start_time=start_time)


def execute_named(names: Sequence[str], *, workdir: str, data_dir: str, smoke: bool,
                  start_time: float, subset_seeds: Sequence[int] | None = None,
                  config_arg: str = '') -> None:
  """A worker's job: the runs called `names` (numbered as in the whole demo)."""
  runs = plan_runs(workdir, data_dir, smoke, subset_seeds, config_arg)
  by_name = {run.name: (i, run) for i, run in enumerate(runs, 1)}
  unknown = [n for n in names if n not in by_name]
  if unknown:
    raise ValueError(f'--runs names unknown runs {unknown}; the demo has {sorted(by_name)}.')
  execute([by_name[n] for n in names], total=len(runs), start_time=start_time)
