r"""Runs a config, or a whole sweep, on a Cloud TPU VM pod slice with `gcloud`.

  python -m experiments.tpu.launch --tpu_name=ddep-v4-32 --zone=us-central2-b \
      --project=my-project --accelerator_type=v4-32 --spot \
      --config=configs/cityscapes.py:sweep=fig6,pretrain_root=gs://my-bucket/pretrain \
      --workdir_root=gs://my-bucket/cityscapes \
      --tfds_data_dir=gs://my-bucket/tensorflow_datasets [--dry_run]

`--action=launch` (the default):

1. reuses the TPU VM if `gcloud compute tpus tpu-vm describe` finds it (it must be READY), else
   creates it (`tpu-vm create`: accelerator type, runtime version, `--spot` / `--preemptible`);
2. installs the code on every worker: copies this working tree (a tarball, `tpu-vm scp
   --worker=all`) or clones `--source=<git URL>` at `--git_ref`, then `pip install -e '.[tpu]'`
   into `<remote_dir>/.venv` (Python 3.11 from apt when the venv is missing);
3. starts the same command on every worker (`tpu-vm ssh --worker=all`), detached with
   `setsid nohup`, logging to `~/ddep_logs/<job>.log` on each worker: with `--workdir_root`,
   `python -m experiments.sweep` over the config's sweep (finished runs are skipped, interrupted
   ones resume, so launching again after a preemption continues the sweep); with `--workdir`, one
   `python -m ddep_jax.main` run. Both pass `--config.distributed.initialize=True`, the trainer's
   multi-host initialisation. Work directories (and the TFDS data dir) must be on GCS, which every
   worker can reach.

`--action=logs` tails every worker's log, `--action=stop` ends the job on every worker,
`--action=delete` deletes the TPU VM.

`--dry_run` prints the exact commands as a shell script, without running anything; for a sweep it
also lists, as comments, the trainer command of each run that every worker will start in turn.
Without it the same commands run through `subprocess`.
"""

import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

from absl import app
from absl import flags

from experiments import sweep as sweep_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOG_DIR = 'ddep_logs'  # On every worker, under $HOME.
REMOTE_PYTHON = '.venv/bin/python'  # Relative to --remote_dir, where commands run.
# Never shipped to the workers: local environments, caches and outputs.
EXCLUDES = ('.git', '.venv', 'workdirs', '__pycache__', '*.egg-info')
INITIALIZE = 'config.distributed.initialize=True'
_SAFE_RE = re.compile(r'^[A-Za-z0-9._-]+$')
_SAFE_PATH_RE = re.compile(r'^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$')


@dataclasses.dataclass(frozen=True)
class Options:
  """What to run where; mirrors the command-line flags."""
  tpu_name: str
  zone: str
  project: str | None = None
  accelerator_type: str | None = None
  runtime_version: str = 'tpu-ubuntu2204-base'
  spot: bool = False
  preemptible: bool = False
  config: str | None = None
  workdir: str | None = None
  workdir_root: str | None = None
  only: tuple[str, ...] = ()
  overrides: tuple[str, ...] = ()
  tfds_data_dir: str | None = None
  source: str = 'copy'
  git_ref: str = 'main'
  local_dir: str = REPO_ROOT
  staging_dir: str = tempfile.gettempdir()
  remote_dir: str = 'ddep_jax'
  remote_python: str = 'python3.11'
  apt_install: bool = True
  install: bool = True
  job_name: str | None = None
  log_lines: int = 100
  validate: bool = True


@dataclasses.dataclass(frozen=True)
class Command:
  """A step: `argv`, or when `argv` fails (the TPU VM does not exist), `fallback`."""
  comment: str
  argv: tuple[str, ...]
  fallback: tuple[str, ...] | None = None

  def shell(self) -> str:
    line = shlex.join(self.argv)
    return line if self.fallback is None else f'{line} || {shlex.join(self.fallback)}'


# -- commands -------------------------------------------------------------------------------------

def job_name(opts: Options) -> str:
  """Names the job's log and pid files: --job_name, else the workdir's or config file's name."""
  if opts.job_name:
    name = opts.job_name
  elif opts.workdir:
    name = opts.workdir.rstrip('/').rsplit('/', 1)[-1]
  elif opts.config:
    name = os.path.splitext(os.path.basename(sweep_lib.parse_config_spec(opts.config)[0]))[0]
  else:
    raise ValueError('Pass --job_name (or --config / --workdir, from which it is derived).')
  if not _SAFE_RE.match(name):
    raise ValueError(f'Job name {name!r} may only use letters, digits, ".", "_" and "-"; pass '
                     f'--job_name.')
  return name


def _gcloud(verb: str, opts: Options) -> list[str]:
  argv = ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, opts.tpu_name, f'--zone={opts.zone}']
  return argv + ([f'--project={opts.project}'] if opts.project else [])


def _ssh(opts: Options, script: str) -> tuple[str, ...]:
  return tuple(_gcloud('ssh', opts) + ['--worker=all', f'--command={script}'])


def _home(*parts: str) -> str:
  # Double quotes keep $HOME expanding on the worker; the parts are checked to be shell-safe.
  return '"$HOME/' + '/'.join(parts) + '"'


def _check(opts: Options) -> None:
  if opts.spot and opts.preemptible:
    raise ValueError('Pass at most one of --spot and --preemptible.')
  if not _SAFE_RE.match(opts.tpu_name):
    raise ValueError(f'--tpu_name={opts.tpu_name!r}: letters, digits, "-" only.')
  if not _SAFE_PATH_RE.match(opts.remote_python.lstrip('/')):
    raise ValueError(f'--remote_python={opts.remote_python!r} must be a plain program name or '
                     f'path, e.g. python3.11.')
  if not _SAFE_PATH_RE.match(opts.remote_dir):
    raise ValueError(f'--remote_dir={opts.remote_dir!r} must be a plain path relative to the '
                     f'home directory on the workers, e.g. ddep_jax.')
  if opts.source == 'copy':
    staging, local = os.path.realpath(opts.staging_dir), os.path.realpath(opts.local_dir)
    if os.path.commonpath([staging, local]) == local:
      # tar fails ("file changed as we read it") when it writes into the tree it packs.
      raise ValueError(f'--staging_dir={opts.staging_dir!r} lies inside --local_dir='
                       f'{opts.local_dir!r}; pick a directory outside the working tree, e.g. /tmp.')


def install_commands(opts: Options) -> list[Command]:
  """Ships the code to every worker and installs it into `<remote_dir>/.venv`."""
  python = opts.remote_python
  create_venv = f'{python} -m venv .venv'
  if opts.apt_install:
    create_venv = (f'{{ sudo apt-get update -qq && sudo apt-get install -y -qq {python} '
                   f'{python}-venv && {create_venv}; }}')
  venv = f'test -x {REMOTE_PYTHON} || {create_venv}'
  setup = f'({venv}) && .venv/bin/pip install -q -e ".[tpu]"'
  if opts.source != 'copy':
    fetch = (f'(test -d {opts.remote_dir}/.git || git clone -q {shlex.quote(opts.source)} '
             f'{opts.remote_dir}) && cd {opts.remote_dir} && git fetch -q origin '
             f'{shlex.quote(opts.git_ref)} && git checkout -q --detach FETCH_HEAD')
    return [Command(f'Clone {opts.source} at {opts.git_ref} on every worker and install it.',
                    _ssh(opts, f'{fetch} && {setup}'))]
  tarball = f'{job_name(opts)}-src.tar.gz'
  local_tar = os.path.join(opts.staging_dir, tarball)
  unpack = (f'mkdir -p {opts.remote_dir} && tar -xzf {tarball} -C {opts.remote_dir} && '
            f'rm {tarball} && cd {opts.remote_dir}')
  return [
      Command(f'Pack the working tree {opts.local_dir}.',
              tuple(['tar', '-czf', local_tar] + [f'--exclude={e}' for e in EXCLUDES]
                    + ['-C', opts.local_dir, '.'])),
      Command('Copy it to every worker.',
              tuple(['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', local_tar, f'{opts.tpu_name}:',
                     '--worker=all', f'--zone={opts.zone}']
                    + ([f'--project={opts.project}'] if opts.project else []))),
      Command(f'Unpack it into ~/{opts.remote_dir} and install it on every worker.',
              _ssh(opts, f'{unpack} && {setup}')),
  ]


def remote_command(opts: Options) -> list[str]:
  """The command every worker runs, from `<remote_dir>`: the sweep runner or one trainer run."""
  if opts.workdir_root:
    argv = [REMOTE_PYTHON, '-m', 'experiments.sweep', f'--config={opts.config}',
            f'--workdir_root={opts.workdir_root}', f'--python={REMOTE_PYTHON}']
    argv += [f'--set={s}' for s in (INITIALIZE,) + tuple(opts.overrides)]
    return argv + [f'--only={p}' for p in opts.only]
  return sweep_lib.train_command(opts.config, opts.workdir, extra=(INITIALIZE,) + opts.overrides,
                                 python=REMOTE_PYTHON)


def start_script(opts: Options) -> str:
  """Starts `remote_command` detached (own process group), unless the job already runs."""
  job = job_name(opts)
  log, pid = _home(LOG_DIR, f'{job}.log'), _home(LOG_DIR, f'{job}.pid')
  env = f'TFDS_DATA_DIR={shlex.quote(opts.tfds_data_dir)} ' if opts.tfds_data_dir else ''
  return (f'mkdir -p {_home(LOG_DIR)} && cd {opts.remote_dir} && '
          f'if kill -0 "$(cat {pid} 2>/dev/null)" 2>/dev/null; then '
          f'echo "{job} is already running on $(hostname); stop it first (--action=stop)" >&2; '
          f'exit 1; fi && '
          f'{{ {env}setsid nohup {shlex.join(remote_command(opts))} > {log} 2>&1 < /dev/null & '
          f'echo $! > {pid}; }}')


def launch_commands(opts: Options) -> list[Command]:
  """Create-or-reuse, install, start."""
  _check(opts)
  if not opts.config:
    raise ValueError('--config is required to launch, e.g. --config=configs/cityscapes.py:arg.')
  if os.path.isabs(opts.config):
    raise ValueError(f'--config={opts.config!r} must be relative to the repository root: the '
                     f'workers read it from ~/{opts.remote_dir}.')
  if bool(opts.workdir) == bool(opts.workdir_root):
    raise ValueError('Pass exactly one of --workdir (one run) and --workdir_root (the config\'s '
                     'sweep).')
  for flag, path in (('workdir', opts.workdir), ('workdir_root', opts.workdir_root),
                     ('tfds_data_dir', opts.tfds_data_dir)):
    if path and not path.startswith('gs://'):
      raise ValueError(f'--{flag}={path!r} must be a gs:// path: every worker of the pod slice '
                       f'reads and writes it, and workers do not share local disks.')
  if not opts.accelerator_type:
    raise ValueError('--accelerator_type is needed to create the TPU VM when it does not exist '
                     '(e.g. v4-32, v5litepod-16); pass the type of the existing one otherwise.')
  create = _gcloud('create', opts) + [f'--accelerator-type={opts.accelerator_type}',
                                      f'--version={opts.runtime_version}']
  create += ['--spot'] if opts.spot else ['--preemptible'] if opts.preemptible else []
  commands = [Command(f'Reuse TPU VM {opts.tpu_name} if it exists, else create it.',
                      tuple(_gcloud('describe', opts) + ['--format=value(state)']),
                      fallback=tuple(create))]
  if opts.install:
    commands += install_commands(opts)
  commands.append(Command(f'Start job {job_name(opts)} on every worker; logs in '
                          f'~/{LOG_DIR}/{job_name(opts)}.log on each.',
                          _ssh(opts, start_script(opts))))
  return commands


def logs_commands(opts: Options) -> list[Command]:
  log = _home(LOG_DIR, f'{job_name(opts)}.log')
  return [Command('The end of the log of every worker.', _ssh(
      opts, f'echo "== $(hostname): {log[1:-1]}" && tail -n {int(opts.log_lines)} {log}'))]


def stop_commands(opts: Options) -> list[Command]:
  job = job_name(opts)
  pid = _home(LOG_DIR, f'{job}.pid')
  return [Command(f'Stop job {job} (its whole process group) on every worker.', _ssh(
      opts, f'if kill -0 "$(cat {pid} 2>/dev/null)" 2>/dev/null; then '
      f'kill -TERM -- -"$(cat {pid})" && echo "stopped {job} on $(hostname)"; '
      f'else echo "{job} is not running on $(hostname)"; fi; rm -f {pid}'))]


def delete_commands(opts: Options) -> list[Command]:
  return [Command(f'Delete TPU VM {opts.tpu_name}.', tuple(_gcloud('delete', opts) + ['--quiet']))]


def sweep_listing(opts: Options) -> list[str]:
  """Comment lines: the trainer command of each run the workers will start, in order."""
  if not opts.workdir_root:
    return []
  with contextlib.chdir(opts.local_dir):  # --config is relative to the repository root.
    runs = sweep_lib.select(sweep_lib.load_sweep(opts.config, opts.workdir_root), opts.only)
    if opts.validate:
      sweep_lib.validate(runs, (INITIALIZE,) + opts.overrides)
  lines = [f'# Every worker runs these {len(runs)} runs in turn, from ~/{opts.remote_dir} '
           f'(finished ones are skipped):']
  for run in runs:
    lines.append('#   ' + shlex.join(run.command(python=REMOTE_PYTHON,
                                                   extra=(INITIALIZE,) + opts.overrides)))
  return lines


def format_commands(commands: Sequence[Command]) -> str:
  """The commands as a shell script: a comment line, then the command line, for each."""
  return '\n'.join(f'# {c.comment}\n{c.shell()}' for c in commands)


# -- running --------------------------------------------------------------------------------------

def _require(program: str) -> None:
  if shutil.which(program) is None:
    hint = (' Install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run '
            '`gcloud auth login`,' if program == 'gcloud' else '')
    raise RuntimeError(f'{program} not found on PATH.{hint} Or pass --dry_run to print the '
                       f'commands instead.')


def execute(commands: Sequence[Command], out=None) -> None:
  """Runs the commands in order; a `fallback` runs when its `argv` fails.

  Raises:
    RuntimeError: a command failed, or the TPU VM exists but is not READY.
  """
  out = out or sys.stdout
  for command in commands:
    _require(command.argv[0])
    print(f'# {command.comment}\n{shlex.join(command.argv)}', file=out, flush=True)
    if command.fallback is None:
      returncode = subprocess.run(command.argv, check=False).returncode
      if returncode:
        raise RuntimeError(f'Command failed with status {returncode}: {shlex.join(command.argv)}')
      continue
    described = subprocess.run(command.argv, check=False, capture_output=True, text=True)
    if described.returncode == 0:
      state = described.stdout.strip()
      if state != 'READY':
        delete = shlex.join(command.argv[:4] + ('delete',) + command.argv[5:-1])
        raise RuntimeError(f'TPU VM exists but is {state or "in an unknown state"}, not READY. '
                           f'Wait while it is CREATING; delete a PREEMPTED or TERMINATED one '
                           f'({delete}) and launch again.')
      print('# It exists and is READY: reusing it.', file=out, flush=True)
      continue
    print(f'# Not found ({described.stderr.strip().splitlines()[-1:]}); creating it.\n'
          f'{shlex.join(command.fallback)}', file=out, flush=True)
    returncode = subprocess.run(command.fallback, check=False).returncode
    if returncode:
      raise RuntimeError(f'Creating the TPU VM failed with status {returncode}: '
                         f'{shlex.join(command.fallback)}')


# -- command line ---------------------------------------------------------------------------------

def _define_flags() -> None:
  """Defines the flags; only when run as a program, so the module imports as a library."""
  flags.DEFINE_enum('action', 'launch', ['launch', 'logs', 'stop', 'delete'],
                    'launch: create or reuse the TPU VM, install, start the job; logs: tail every '
                    'worker\'s log; stop: end the job on every worker; delete: delete the TPU VM.')
  flags.DEFINE_string('tpu_name', None, 'TPU VM (pod slice) name.')
  flags.DEFINE_string('zone', None, 'Zone, e.g. us-central2-b.')
  flags.DEFINE_string('project', None, 'GCP project (default: gcloud\'s core/project).')
  flags.DEFINE_string('accelerator_type', None, 'Accelerator type, e.g. v4-32, v5litepod-16.')
  flags.DEFINE_string('runtime_version', Options.runtime_version, 'TPU software version: '
                      'tpu-ubuntu2204-base (v4 and older), v2-alpha-tpuv5-lite (v5e), '
                      'v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e).')
  flags.DEFINE_bool('spot', False, 'Create a Spot TPU VM.')
  flags.DEFINE_bool('preemptible', False, 'Create a preemptible TPU VM.')
  flags.DEFINE_string('config', None, 'Config file (relative to the repo) and argument, e.g. '
                      'configs/cityscapes.py:sweep=fig6,pretrain_root=gs://my-bucket/pretrain.')
  flags.DEFINE_string('workdir', None, 'gs:// work directory of a single run.')
  flags.DEFINE_string('workdir_root', None, 'gs:// root of the runs of the config\'s sweep.')
  flags.DEFINE_multi_string('only', [], 'Only sweep runs whose name matches this glob.')
  flags.DEFINE_multi_string('set', [], 'config.<key>=<value> added to every run.')
  flags.DEFINE_string('tfds_data_dir', None, 'gs:// TFDS data dir, exported as TFDS_DATA_DIR.')
  flags.DEFINE_string('source', 'copy', '"copy" (this working tree) or a git URL to clone.')
  flags.DEFINE_string('git_ref', 'main', 'Branch, tag or commit of a git --source.')
  flags.DEFINE_string('local_dir', REPO_ROOT, 'Working tree shipped with --source=copy.')
  flags.DEFINE_string('staging_dir', tempfile.gettempdir(), 'Local directory of the tarball.')
  flags.DEFINE_string('remote_dir', 'ddep_jax', 'Code directory on the workers, relative to home.')
  flags.DEFINE_string('remote_python', 'python3.11', 'Python that creates the workers\' venv.')
  flags.DEFINE_bool('apt_install', True, 'apt-get install that Python and its venv module when '
                    'the venv is missing.')
  flags.DEFINE_bool('install', True, 'Ship and install the code before starting.')
  flags.DEFINE_string('job_name', None, 'Name of the log and pid files (default: the name of '
                      '--workdir, else of the config file).')
  flags.DEFINE_integer('log_lines', 100, 'Lines shown per worker by --action=logs.')
  flags.DEFINE_bool('validate', True, 'Check the sweep\'s config keys before launching.')
  flags.DEFINE_bool('dry_run', False, 'Print the commands as a shell script; run nothing.')


def options_from_flags() -> Options:
  """The `Options` of the command-line flags."""
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  return Options(
      tpu_name=FLAGS.tpu_name, zone=FLAGS.zone, project=FLAGS.project,
      accelerator_type=FLAGS.accelerator_type, runtime_version=FLAGS.runtime_version,
      spot=FLAGS.spot, preemptible=FLAGS.preemptible, config=FLAGS.config,
      workdir=FLAGS.workdir, workdir_root=FLAGS.workdir_root, only=tuple(FLAGS.only),
      overrides=tuple(FLAGS.set), tfds_data_dir=FLAGS.tfds_data_dir, source=FLAGS.source,
      git_ref=FLAGS.git_ref, local_dir=FLAGS.local_dir, staging_dir=FLAGS.staging_dir,
      remote_dir=FLAGS.remote_dir, remote_python=FLAGS.remote_python,
      apt_install=FLAGS.apt_install, install=FLAGS.install, job_name=FLAGS.job_name,
      log_lines=FLAGS.log_lines, validate=FLAGS.validate)


def main(argv: Sequence[str]) -> None:
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  opts = options_from_flags()
  action = FLAGS.action
  commands = {'launch': launch_commands, 'logs': logs_commands, 'stop': stop_commands,
              'delete': delete_commands}[action](opts)
  listing = sweep_listing(opts) if action == 'launch' else []
  if FLAGS.dry_run:
    print('\n'.join(listing + [format_commands(commands)]))
    return
  if listing:
    print('\n'.join(listing))
  execute(commands)
  if action == 'launch':
    follow = logs_commands(opts)[0]
    print(f'# Started. Follow the logs with\n{follow.shell()}')


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['tpu_name', 'zone'])
  app.run(main)
