r"""Expands a config's sweep into concrete runs and runs them one after another.

  python -m experiments.sweep \
      --config=configs/cityscapes.py:sweep=fig6,pretrain_root=/tmp/pretrain \
      --workdir_root=/tmp/sweeps/cityscapes [--dry_run] [--only='decoder_width=1-init=ddep-*']

`get_sweep(hyper, arg)` of the config file (see `experiments.hyper`) lists the runs. Each run gets
the work directory `<workdir_root>/<name>`, where the name is made of the run's tags sorted by
tag name (`init=ddep-label_count=100-lr=0.0001-subset_seed=3-wd=1e-05`): the same run always gets
the same name, whatever the order of the sweep, so a sweep can be stopped and started again.
Runs whose work directory holds final results are skipped; runs that were interrupted are started
again with the same command and the trainer resumes from its latest checkpoint. Before a run
starts, `run.json` records its name, config file and argument, overrides and tags.

Each run is

  <python> -m ddep_jax.main --config=<config file>:<arg> --workdir=<workdir_root>/<name> \
      --config.<key>=<value> ... [--set overrides]

`--dry_run` prints these commands (a shell script: `# ...` lines say which runs are done or
resumed) without writing anything. `--set=config.distributed.initialize=True` adds an override
to every run without changing names or tags: the TPU launcher (`experiments/tpu/launch.py`) uses
it to run the same sweep on every worker of a pod slice, with `gs://` work directories.
"""

import dataclasses
import fnmatch
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags

from ddep_jax import fileio
from experiments import hyper

TRAINER_MODULE = 'ddep_jax.main'
# Set by the TPU launcher on every worker of a pod slice to its worker number.
PROCESS_INDEX_ENV = 'DDEP_PROCESS_INDEX'


@dataclasses.dataclass(frozen=True)
class Run:
  """One concrete run of a sweep."""
  name: str
  workdir: str
  config_file: str
  config_arg: str | None  # The base argument with the run's `arg.*` entries folded in.
  overrides: dict[str, Any]  # `config.<key>` -> value.
  tags: dict[str, Any]  # Tag name -> value: the run's sweep coordinates.

  @property
  def config_spec(self) -> str:
    return self.config_file if self.config_arg is None else f'{self.config_file}:{self.config_arg}'

  def command(self, python: str = sys.executable, extra: Sequence[str] = (),
              module: str = TRAINER_MODULE) -> list[str]:
    """The trainer command line (argv); `extra` are further `config.<key>=<value>` overrides."""
    return train_command(self.config_spec, self.workdir, self.overrides, extra=extra,
                         python=python, module=module)

  def run_json(self) -> dict[str, Any]:
    """The content of `<workdir>/run.json` (the contract read by `collect_results`)."""
    return {'name': self.name, 'config_file': self.config_file, 'config_arg': self.config_arg,
            'overrides': self.overrides, 'tags': self.tags}


# -- values, names, commands ---------------------------------------------------------------------

def tag_names(keys: Sequence[str]) -> dict[str, str]:
  """Maps each key to its shortest dotted suffix not shared with another key of `keys`."""
  names = {}
  for key in keys:
    parts = key.split('.')
    for n in range(1, len(parts) + 1):
      suffix = '.'.join(parts[-n:])
      if not any(o != key and (o == suffix or o.endswith('.' + suffix)) for o in keys):
        break
    names[key] = suffix
  return names


def fold_arg(base_arg: str | None, entries: Mapping[str, Any]) -> str | None:
  """Sets `name=value` entries in a comma-separated config argument (new names sorted, appended).

  Raises:
    ValueError: a value contains ',' (the argument separator).
  """
  if not entries:
    return base_arg
  items = [s for s in (base_arg or '').split(',') if s]
  keys = [s.split('=', 1)[0] for s in items]
  for name in sorted(entries):
    text = hyper.compact_value(entries[name])
    if ',' in text:
      raise ValueError(f'arg.{name}={text!r}: values folded into the config argument cannot '
                       f'contain ","; use a config.<key> override instead.')
    if name in keys:
      items[keys.index(name)] = f'{name}={text}'
    else:
      items.append(f'{name}={text}')
      keys.append(name)
  return ','.join(items)


def train_command(config_spec: str, workdir: str, overrides: Mapping[str, Any] = (),
                  *, extra: Sequence[str] = (), python: str = sys.executable,
                  module: str = TRAINER_MODULE) -> list[str]:
  """`<python> -m <module> --config=<spec> --workdir=<dir> --config.<key>=<value> ...`.

  `overrides` maps `config.<key>` to values (sorted by key); `extra` are `config.<key>=<value>`
  strings appended as given (launch settings such as `config.distributed.initialize=True`).
  """
  argv = [python, '-m', module, f'--config={config_spec}', f'--workdir={workdir}']
  argv += [f'--{key}={hyper.format_value(overrides[key])}' for key in sorted(dict(overrides))]
  for setting in extra:
    key = setting.split('=', 1)[0]
    if '=' not in setting or not key.startswith('config.'):
      raise ValueError(f'--set={setting!r}: expected config.<dotted.key>=<value>, e.g. '
                       f'config.distributed.initialize=True.')
    hyper.check_key(key)
    argv.append(f'--{setting}')
  return argv


# -- loading and expanding a sweep ----------------------------------------------------------------

def parse_config_spec(spec: str) -> tuple[str, str | None]:
  """`'configs/x.py:a=1'` -> `('configs/x.py', 'a=1')`; `'configs/x.py'` -> `(..., None)`."""
  config_file, sep, arg = spec.partition(':')
  return config_file, (arg if sep else None)


def load_config_module(config_file: str):
  """Imports a config file by path, as ml_collections' config_flags does.

  A file of the `configs` package (`configs/x.py` from the repository root) is imported as
  `configs.x`, the name its fellow config modules know it by, so it is never loaded twice; other
  files (a copy elsewhere, `tests/tiny_config.py`) are loaded from their path.
  """
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f'Config file {config_file!r} not found (relative paths are taken '
                            f'from the current directory {os.getcwd()!r}).')
  module_name = _package_module_name(config_file)
  if module_name is not None:
    return importlib.import_module(module_name)
  name = '_sweep_config_' + re.sub(r'\W', '_', os.path.splitext(config_file)[0])
  spec = importlib.util.spec_from_file_location(name, config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _package_module_name(config_file: str) -> str | None:
  """`configs.<name>` when that module is this very file, else None."""
  directory, filename = os.path.split(os.path.abspath(config_file))
  stem, ext = os.path.splitext(filename)
  if ext != '.py' or not stem.isidentifier() or not os.path.isfile(
      os.path.join(directory, '__init__.py')):
    return None
  module_name = f'{os.path.basename(directory)}.{stem}'
  try:
    spec = importlib.util.find_spec(module_name)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.origin or not os.path.samefile(spec.origin, config_file):
    return None
  return module_name


def expand(config_file: str, config_arg: str | None, runs: Sequence[Mapping[str, Any]],
           workdir_root: str) -> list[Run]:
  """Turns the sweep's run dicts into `Run`s with stable names, in sweep order.

  Raises:
    ValueError: an invalid key, or two runs with the same name (same tags).
  """
  expanded, by_name = [], {}
  for index, raw in enumerate(runs):
    if not isinstance(raw, Mapping):
      raise ValueError(f'{config_file}: get_sweep returned {type(raw).__name__} at index {index};'
                       f' expected a dict of overrides (build runs with experiments.hyper).')
    values, tagged = {}, []
    for key, value in raw.items():
      hyper.check_key(key)
      if isinstance(value, hyper.Untagged):
        value = value.value
      else:
        tagged.append(key)
      values[key] = value
    names = tag_names(tagged)
    tags = {names[k]: values[k] for k in sorted(tagged)}
    name = hyper.run_name(tags)
    run = Run(
        name=name, workdir=fileio.join(workdir_root, name), config_file=config_file,
        config_arg=fold_arg(config_arg, {k[len('arg.'):]: v for k, v in values.items()
                                         if k.startswith('arg.')}),
        overrides={k: v for k, v in sorted(values.items()) if k.startswith('config.')},
        tags=tags)
    if name in by_name:
      other = by_name[name]
      raise ValueError(
          f'{config_file}: runs {other[0]} and {index} of get_sweep both get the work directory '
          f'name {name!r} (runs: {other[1]} and {dict(raw)}). Runs must differ in their tags: '
          f'make the distinguishing key a hyper.sweep (tagged) key, or drop the duplicate.')
    by_name[name] = (index, dict(raw))
    expanded.append(run)
  return expanded


def load_sweep(config_spec: str, workdir_root: str) -> list[Run]:
  """Calls `get_sweep(hyper, arg)` of the config file and expands its runs."""
  config_file, config_arg = parse_config_spec(config_spec)
  module = load_config_module(config_file)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'{config_file} defines no get_sweep(hyper, arg=None); add one (see '
                     f'experiments/hyper.py), or start a single run with '
                     f'`python -m {TRAINER_MODULE} --config={config_spec} --workdir=...`.')
  runs = module.get_sweep(hyper, config_arg)
  if not runs:
    raise ValueError(f'{config_file}: get_sweep({config_arg!r}) returned no runs.')
  return expand(config_file, config_arg, list(runs), workdir_root)


def _resolve(config, key: str, run: Run):
  """The parent node and field name of a `config.<dotted.key>`, checked to be overridable."""
  node, parts = config, key.split('.')[1:]
  for depth, part in enumerate(parts):
    fields = sorted(node.keys()) if hasattr(node, 'keys') else []
    if part not in fields:
      where = '.'.join(['config'] + parts[:depth])
      raise ValueError(
          f'Unknown sweep key {key!r} in run {run.name!r} ({run.config_spec}): {where} has no '
          f'field {part!r}; its fields are {fields}. Fix the key in get_sweep or --set.')
    if depth < len(parts) - 1:
      node = node[part]
  get_type = getattr(node, 'get_type', None)
  if get_type is not None and get_type(parts[-1]) is type(None):
    # config_flags refuses `--config.<key>=...` on a field whose default is a plain None.
    raise ValueError(
        f'{key} is None in get_config({run.config_arg!r}) of {run.config_file}, and a None field '
        f'cannot be overridden from the command line. Declare it with a type, e.g. '
        f'ml_collections.config_dict.placeholder(int), or sweep it as an arg.<name> entry.')
  return node, parts[-1]


def validate(runs: Sequence[Run], extra: Sequence[str] = ()) -> None:
  """Checks every run against `get_config(arg)` of its config argument.

  `get_config` must accept the argument (with the run's `arg.*` entries), and every `config.*`
  override must name an existing field that the command line can set, with a value of its type.
  This catches a typo before hundreds of runs are queued; the trainer would fail on it too, but
  only once the run starts.

  Raises:
    ValueError: naming the run and the key, and listing the fields that do exist there.
  """
  modules, configs = {}, {}
  for run in runs:
    if run.config_file not in modules:
      modules[run.config_file] = load_config_module(run.config_file)
    if (run.config_file, run.config_arg) not in configs:
      try:
        configs[run.config_file, run.config_arg] = modules[run.config_file].get_config(
            run.config_arg)
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f'get_config({run.config_arg!r}) of {run.config_file} fails for run '
                         f'{run.name!r}: {type(e).__name__}: {e}') from e
    config = configs[run.config_file, run.config_arg]
    for key, value in run.overrides.items():
      parent, field = _resolve(config, key, run)
      try:
        parent[field] = value  # ConfigDict checks the value's type against the field's.
      except (TypeError, ValueError) as e:
        raise ValueError(f'Sweep value {key}={value!r} of run {run.name!r} does not fit the '
                         f'config field: {e}') from e
    for setting in extra:
      _resolve(config, setting.split('=', 1)[0], run)


# -- running --------------------------------------------------------------------------------------

def status(workdir: str) -> str:
  """'finished' (every `results/*.json` has `"final": true`), 'started' or 'new'."""
  if not fileio.exists(workdir):
    return 'new'
  results = fileio.glob(fileio.join(workdir, 'results', '*.json'))
  if results and all(fileio.read_json(p).get('final') is True for p in results):
    return 'finished'
  return 'started'


def select(runs: Sequence[Run], patterns: Sequence[str]) -> list[Run]:
  """Runs whose name matches any of the glob patterns (all runs if there are none)."""
  if not patterns:
    return list(runs)
  chosen = [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]
  if not chosen:
    raise ValueError(f'--only={",".join(patterns)} matches none of the {len(runs)} run names, '
                     f'which look like {runs[0].name!r}.')
  return chosen


def _check_run_json(run: Run) -> None:
  """Refuses to reuse a work directory that belongs to a different run."""
  path = fileio.join(run.workdir, 'run.json')
  if not fileio.exists(path):
    return
  old, new = fileio.read_json(path), run.run_json()
  new['config_file'] = os.path.basename(run.config_file)
  old['config_file'] = os.path.basename(str(old.get('config_file')))
  # Compare through JSON so that tuples and lists, ints and floats compare as stored.
  new = json.loads(json.dumps(new))
  differ = [k for k in ('config_file', 'config_arg', 'overrides', 'tags') if old.get(k) != new[k]]
  if differ:
    details = '; '.join(f'{k}: {old.get(k)!r} there, {new[k]!r} now' for k in differ)
    raise ValueError(f'{run.workdir} already holds run.json of a different run ({details}). Use '
                     f'another --workdir_root, or delete that work directory to start afresh.')


def run_sweep(runs: Sequence[Run], *, python: str = sys.executable, extra: Sequence[str] = (),
              module: str = TRAINER_MODULE, dry_run: bool = False, keep_going: bool = False,
              out=None, process_index: int = 0) -> list[str]:
  """Runs (or, with `dry_run`, prints) the runs in order; returns the names of failed runs.

  Finished runs are skipped. Others get `run.json` and the trainer command, which resumes a
  started run from its work directory. A run fails when the command exits non-zero or leaves no
  final results; the sweep stops there unless `keep_going`.

  On a pod slice every worker runs the same sweep (`process_index` is its worker number): only
  worker 0 writes `run.json` (one writer per shared object), and the others judge a run by their
  trainer's exit status alone, since worker 0 may still be writing the final results.
  """
  out = out or sys.stdout
  failed = []
  for i, run in enumerate(runs, 1):
    state = status(run.workdir)
    action = {'finished': 'finished, skipped', 'started': 'resume', 'new': 'new'}[state]
    print(f'# [{i}/{len(runs)}] {action}: {run.workdir}', file=out, flush=True)
    if state == 'finished':
      continue
    argv = run.command(python=python, extra=extra, module=module)
    print(shlex.join(argv), file=out, flush=True)
    if dry_run:
      continue
    if process_index == 0:
      _check_run_json(run)
      fileio.write_json(fileio.join(run.workdir, 'run.json'), run.run_json())
    returncode = subprocess.run(argv, check=False).returncode
    if returncode == 0 and (process_index != 0 or status(run.workdir) == 'finished'):
      continue
    why = (f'exited with status {returncode}' if returncode else
           'exited without final results (no results/*.json with "final": true)')
    print(f'# FAILED {run.name}: {why}', file=out, flush=True)
    failed.append(run.name)
    if not keep_going:
      break
  return failed


# -- command line ---------------------------------------------------------------------------------

def _define_flags() -> None:
  """Defines the flags; only when run as a program, so the module imports as a library."""
  flags.DEFINE_string('config', None, 'Config file and argument, e.g. '
                      'configs/cityscapes.py:sweep=fig6,pretrain_root=DIR; the file must '
                      'define get_sweep.')
  flags.DEFINE_string('workdir_root', None, 'Directory (local or gs://) under which each run '
                      'gets <workdir_root>/<run name>.')
  flags.DEFINE_bool('dry_run', False, 'Print the commands; write and run nothing.')
  flags.DEFINE_multi_string('only', [], 'Only runs whose name matches this glob (repeat the flag '
                            'for several), e.g. --only="init=ddep-*".')
  flags.DEFINE_multi_string('set', [], 'config.<key>=<value> added to every run without changing '
                            'names or tags, e.g. config.distributed.initialize=True.')
  flags.DEFINE_string('python', sys.executable, 'Python interpreter of the runs.')
  flags.DEFINE_string('module', TRAINER_MODULE, 'Module started with `python -m` for each run.')
  flags.DEFINE_bool('validate', True, 'Check every config.* key against get_config(arg) first.')
  flags.DEFINE_bool('keep_going', False, 'Go on with the next run when one fails.')
  flags.DEFINE_integer('process_index', int(os.environ.get(PROCESS_INDEX_ENV, '0')),
                       'Worker number on a pod slice (default: $DDEP_PROCESS_INDEX, else 0); '
                       'only worker 0 writes run.json.')


def main(argv: Sequence[str]) -> None:
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  runs = load_sweep(FLAGS.config, FLAGS.workdir_root)
  chosen = select(runs, FLAGS.only)
  if FLAGS.validate:
    validate(chosen, FLAGS.set)
  print(f'# {FLAGS.config}: {len(runs)} runs in the sweep, {len(chosen)} selected, under '
        f'{FLAGS.workdir_root}', flush=True)
  failed = run_sweep(chosen, python=FLAGS.python, extra=FLAGS.set, module=FLAGS.module,
                     dry_run=FLAGS.dry_run, keep_going=FLAGS.keep_going,
                     process_index=FLAGS.process_index)
  if failed:
    sys.exit(f'{len(failed)} run(s) failed: {", ".join(failed)}')


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['config', 'workdir_root'])
  app.run(main)
