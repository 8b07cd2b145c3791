r"""Runs a config, or a whole sweep, on a Cloud TPU VM pod slice with `gcloud`.

  python -m experiments.tpu.launch --tpu_name=ddep-v4-32 --zone=us-central2-b \
      --project=my-project --accelerator_type=v4-32 --spot \
      --config=configs/cityscapes.py:sweep=fig6,pretrain_root=gs://my-bucket/pretrain \
      --workdir_root=gs://my-bucket/cityscapes \
      --tfds_data_dir=gs://my-bucket/tensorflow_datasets [--dry_run]

`--action=launch` (the default) first checks, locally, that every run's global train and eval
batch splits over the slice's devices (`slice_shape`: v4-32, v5litepod-16 and v5p-32 are 16
devices on 4 hosts) and refuses with the `--set=config...` overrides that fit. Then one bash
script (`set -euo pipefail`; `--dry_run` prints it, otherwise bash runs it):

1. creates the slice when `describe` does not find it: `tpu-vm create`, or with `--queued` a
   queued resource (`queued-resources create`, the recommended way to wait for Spot capacity),
   with the runtime version of the accelerator's generation (`RUNTIME_VERSIONS`); a PREEMPTED /
   TERMINATED / SUSPENDED slice is refused, or with `--resume` deleted and recreated; then waits
   until the TPU VM is READY (`--ready_timeout_s`);
2. refuses to go on if the job still runs on a worker, before touching any worker;
3. installs the code on every worker: copies this working tree (a tarball, `tpu-vm scp
   --worker=all`) or clones `--source=<git URL>` at `--git_ref`, then upgrades pip and runs
   `pip install -e '.[tpu]'` in `<remote_dir>/.venv` (Python 3.11 from apt, non-interactive,
   waiting for the dpkg lock, when the venv is missing);
4. starts the same command on every worker (`tpu-vm ssh --worker=all`), detached with
   `setsid nohup`: with `--workdir_root`, `python -m experiments.sweep` over the config's sweep
   (finished runs are skipped, interrupted ones resume, so `--resume` after a preemption
   continues the sweep; only worker 0 writes run.json); with `--workdir`, one
   `python -m ddep_jax.main` run. Both pass `--config.distributed.initialize=True`. Each launch
   appends an `== attempt` section to `~/ddep_logs/<job>.log` on each worker, which is copied to
   `<workdir(_root)>/logs/<job>/worker-<i>.log` every `--log_copy_s` seconds and at the end.
   Work directories (and the TFDS data dir) must be on GCS, which every worker can reach.

`--action=logs` tails every worker's log, `--action=stop` ends the job on every worker,
`--action=delete` deletes the TPU VM (the queued resource with `--queued`).
"""

import ast
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

from ddep_jax import sharding
from experiments import sweep as sweep_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOG_DIR = 'ddep_logs'  # On every worker, under $HOME.
REMOTE_PYTHON = '.venv/bin/python'  # Relative to --remote_dir, where commands run.
# Never shipped to the workers: local environments, caches and outputs.
EXCLUDES = ('.git', '.venv', 'workdirs', '__pycache__', '*.egg-info')
INITIALIZE = 'config.distributed.initialize=True'
_WORKER_NUMBER_URL = ('http://metadata.google.internal/computeMetadata/v1/instance/attributes/'
                      'agent-worker-number')
_SAFE_RE = re.compile(r'^[A-Za-z0-9._-]+$')
_SAFE_PATH_RE = re.compile(r'^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$')
_ACCELERATOR_RE = re.compile(r'^(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)$')
# TPU VM software version of each generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {'v2': 'tpu-ubuntu2204-base', 'v3': 'tpu-ubuntu2204-base',
                    'v4': 'tpu-ubuntu2204-base', 'v5p': 'v2-alpha-tpuv5',
                    'v5litepod': 'v2-alpha-tpuv5-lite', 'v5e': 'v2-alpha-tpuv5-lite',
                    'v6e': 'v2-alpha-tpuv6e'}
# A TPU VM in one of these states never becomes READY again: delete and recreate it (--resume).
_DEAD_STATES = ('PREEMPTED', 'TERMINATED', 'FAILED', 'SUSPENDED')


@dataclasses.dataclass(frozen=True)
class Options:
  """What to run where; mirrors the command-line flags."""
  tpu_name: str
  zone: str
  project: str | None = None
  accelerator_type: str | None = None
  runtime_version: str | None = None  # None: derived from accelerator_type.
  queued: bool = False
  resume: bool = False
  ready_timeout_s: int = 3600
  poll_s: int = 30
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
  log_copy_s: int = 300
  validate: bool = True


@dataclasses.dataclass(frozen=True)
class Command:
  """One step of the install, logs, stop or delete actions."""
  comment: str
  argv: tuple[str, ...]

  def shell(self) -> str:
    return shlex.join(self.argv)


# -- accelerators ---------------------------------------------------------------------------------

def _parse_accelerator(accelerator_type: str) -> tuple[str, int]:
  match = _ACCELERATOR_RE.match(accelerator_type or '')
  if not match:
    raise ValueError(f'--accelerator_type={accelerator_type!r}: expected <generation>-<size> with '
                     f'a generation among {sorted(RUNTIME_VERSIONS)}, e.g. v4-32, v5litepod-16, '
                     'v5p-32, v6e-16.')
  return match.group(1), int(match.group(2))


def runtime_version(accelerator_type: str) -> str:
  """The TPU VM base image of the accelerator's generation."""
  return RUNTIME_VERSIONS[_parse_accelerator(accelerator_type)[0]]


def slice_shape(accelerator_type: str) -> tuple[int, int]:
  """(JAX devices, hosts) of a slice: v4-32 and v5p-32 are 16 chips on 4 hosts (the size counts
  TensorCores, two per chip, one JAX device per chip); v5litepod-16 / v6e-16 are 16 chips on 4
  hosts (the size counts chips; up to 8 chips fit one host); v2 / v3 show each of a host's 8
  cores as a device."""
  generation, size = _parse_accelerator(accelerator_type)
  if generation in ('v4', 'v5p'):
    return max(size // 2, 1), max(size // 8, 1)
  if generation in ('v2', 'v3'):
    return size, max(size // 8, 1)
  return size, 1 if size <= 8 else size // 4


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
    # A fresh TPU VM runs unattended-upgrades at boot: wait for the dpkg lock, never prompt.
    apt = 'sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600'
    create_venv = (f'{{ {apt} update -qq && {apt} install -y -qq {python} {python}-venv && '
                   f'{create_venv}; }}')
  venv = f'test -x {REMOTE_PYTHON} || {create_venv}'
  setup = (f'({venv}) && .venv/bin/pip install -q --upgrade pip && '
           f'.venv/bin/pip install -q -e ".[tpu]"')
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


def log_destination(opts: Options) -> str:
  """gs:// folder the workers copy their logs to (a preempted Spot VM loses its disk)."""
  return f'{(opts.workdir_root or opts.workdir).rstrip("/")}/logs/{job_name(opts)}'


def _running_check(opts: Options) -> str:
  job = job_name(opts)
  pid = _home(LOG_DIR, f'{job}.pid')
  return (f'if kill -0 "$(cat {pid} 2>/dev/null)" 2>/dev/null; then '
          f'echo "{job} is already running on $(hostname); stop it first (--action=stop)" >&2; '
          f'exit 1; fi')


def start_script(opts: Options) -> str:
  """Starts `remote_command` detached (own process group), unless the job already runs.

  The log on each worker grows by one `== attempt` section per launch, and is copied to
  `log_destination` every `log_copy_s` seconds and when the job ends.
  """
  job = job_name(opts)
  log, pid = _home(LOG_DIR, f'{job}.log'), _home(LOG_DIR, f'{job}.pid')
  env = f'TFDS_DATA_DIR={shlex.quote(opts.tfds_data_dir)} ' if opts.tfds_data_dir else ''
  copy = (f'gcloud storage cp {log} '
          f'{shlex.quote(log_destination(opts))}/worker-"$DDEP_PROCESS_INDEX".log')
  runner = (f'{shlex.join(remote_command(opts))} >> {log} 2>&1 & job=$!; '
            # Copies every log_copy_s seconds, but notices the end of the job within a second.
            f'while kill -0 $job 2>/dev/null; do {copy} > /dev/null 2>&1 || true; i=0; '
            f'while [ $i -lt {int(opts.log_copy_s)} ] && kill -0 $job 2>/dev/null; do sleep 1; '
            f'i=$((i + 1)); done; done; wait $job; rc=$?; '
            f'echo "== exit status $rc at $(date -u +%FT%TZ)" >> {log}; '
            f'{copy} > /dev/null 2>&1 || true; exit $rc')
  # The worker number (process index) from the TPU VM metadata; only worker 0 writes run.json.
  worker = ('${DDEP_WORKER_ID:-$(curl -sf -H Metadata-Flavor:Google '
            f'{_WORKER_NUMBER_URL})}}')
  return (f'mkdir -p {_home(LOG_DIR)} && cd {opts.remote_dir} && {_running_check(opts)} && '
          f'worker={worker} && '
          f'echo "== attempt at $(date -u +%FT%TZ) on $(hostname), worker $worker" >> {log} && '
          f'{{ DDEP_PROCESS_INDEX=$worker {env}setsid nohup bash -c {shlex.quote(runner)} '
          f'> /dev/null 2>&1 < /dev/null & echo $! > {pid}; }}')


def _check_launch(opts: Options) -> None:
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
  _parse_accelerator(opts.accelerator_type)
  if opts.queued and opts.preemptible:
    raise ValueError('Queued resources take --spot, not --preemptible.')


def _create(opts: Options) -> list[str]:
  version = opts.runtime_version or runtime_version(opts.accelerator_type)
  project = [f'--project={opts.project}'] if opts.project else []
  if opts.queued:
    argv = (['gcloud', 'compute', 'tpus', 'queued-resources', 'create', opts.tpu_name,
             f'--node-id={opts.tpu_name}', f'--zone={opts.zone}'] + project +
            [f'--accelerator-type={opts.accelerator_type}', f'--runtime-version={version}'])
  else:
    argv = _gcloud('create', opts) + [f'--accelerator-type={opts.accelerator_type}',
                                      f'--version={version}']
  return argv + (['--spot'] if opts.spot else ['--preemptible'] if opts.preemptible else [])


def _delete(opts: Options) -> list[str]:
  if opts.queued:  # --force deletes the TPU VM of the request as well.
    return (['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', opts.tpu_name,
             f'--zone={opts.zone}'] + ([f'--project={opts.project}'] if opts.project else []) +
            ['--force', '--quiet'])
  return _gcloud('delete', opts) + ['--quiet']


def _vm_script(opts: Options) -> list[str]:
  """Shell lines: create the TPU VM if missing (or dead, with --resume), then wait until READY."""
  name = opts.tpu_name
  describe = shlex.join(_gcloud('describe', opts) + ['--format=value(state)'])
  lines = [f'tpu_state() {{ {describe} 2>/dev/null || true; }}']
  if opts.queued:
    queued = shlex.join(['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', name,
                         f'--zone={opts.zone}'] +
                        ([f'--project={opts.project}'] if opts.project else []) +
                        ['--format=value(state.state)'])
    lines += [f'state=$({queued} 2>/dev/null || true)']
  else:
    lines += ['state=$(tpu_state)']
  dead = '|'.join(_DEAD_STATES)
  if opts.resume:
    on_dead = (f'echo "# {name} is $state: deleting and recreating it (--resume)."; '
               f'{shlex.join(_delete(opts))}; {shlex.join(_create(opts))}')
  else:
    on_dead = (f'echo "{name} is $state and will not become READY. Launch again with --resume '
               f'to delete and recreate it (finished runs are skipped, interrupted ones '
               f'resume)." >&2; exit 1')
  max_polls = max(1, int(opts.ready_timeout_s) // max(1, int(opts.poll_s)))
  lines += [
      'case "$state" in',
      f'  "") echo "# {name} not found: creating it."; {shlex.join(_create(opts))} ;;',
      f'  {dead}) {on_dead} ;;',
      f'  *) echo "# {name} exists ($state): reusing it." ;;',
      'esac',
      '# Wait until the TPU VM is READY (a queued request may wait for capacity).',
      'polls=0',
      'while state=$(tpu_state); [ "$state" != READY ]; do',
      f'  case "$state" in {dead}) echo "{name} became $state while starting; launch again with '
      f'--resume." >&2; exit 1 ;; esac',
      f'  polls=$((polls + 1)); if [ "$polls" -gt {max_polls} ]; then echo "{name} is not READY '
      f'after {int(opts.ready_timeout_s)} s (state: ${{state:-none}})." >&2; exit 1; fi',
      f'  echo "# Waiting for {name} (state: ${{state:-not created yet}})."; '
      f'sleep {int(opts.poll_s)}',
      'done',
  ]
  return lines


def launch_script(opts: Options) -> str:
  """The whole launch as one bash script: what `--dry_run` prints and what the launcher runs."""
  _check_launch(opts)
  job = job_name(opts)
  lines = ['#!/bin/bash', 'set -euo pipefail', f'# Make sure TPU VM {opts.tpu_name} '
           f'({opts.accelerator_type}) exists and is READY.']
  lines += _vm_script(opts)
  lines += [f'# Refuse to start {job} a second time before touching the workers.',
            shlex.join(_ssh(opts, _running_check(opts)))]
  if opts.install:
    for command in install_commands(opts):
      lines += [f'# {command.comment}', command.shell()]
  lines += [f'# Start job {job} on every worker; logs in ~/{LOG_DIR}/{job}.log on each, copied '
            f'to {log_destination(opts)}/.', shlex.join(_ssh(opts, start_script(opts)))]
  return '\n'.join(lines) + '\n'


def check_slice(opts: Options) -> None:
  """Refuses a run whose train or eval batch the requested slice cannot split (before launching).

  Raises:
    ValueError: naming the run and the `--set=config...` overrides to add.
  """
  devices, hosts = slice_shape(opts.accelerator_type)
  with contextlib.chdir(opts.local_dir):  # --config is relative to the repository root.
    if opts.workdir_root:
      runs = sweep_lib.select(sweep_lib.load_sweep(opts.config, opts.workdir_root), opts.only)
    else:
      config_file, config_arg = sweep_lib.parse_config_spec(opts.config)
      runs = [sweep_lib.Run(name=job_name(opts), workdir=opts.workdir, config_file=config_file,
                            config_arg=config_arg, overrides={}, tags={})]
    modules = {}
    for run in runs:
      if run.config_file not in modules:
        modules[run.config_file] = sweep_lib.load_config_module(run.config_file)
      config = modules[run.config_file].get_config(run.config_arg)
      settings = list(run.overrides.items())
      for setting in opts.overrides:
        key, _, value = setting.partition('=')
        try:
          settings.append((key, ast.literal_eval(value)))
        except (ValueError, SyntaxError):
          settings.append((key, value))
      for key, value in settings:
        node, field = sweep_lib._resolve(config, key, run)  # pylint: disable=protected-access
        node[field] = value
      if 'input' not in config or 'batch_size' not in config.input:
        continue  # Not a trainer config (e.g. a test stand-in): nothing to check.
      try:
        sharding.check_batch_sizes(config, devices, hosts, where=opts.accelerator_type)
      except ValueError as e:
        fix = ' '.join(f'--set={m}' for m in re.findall(r'--(config\.[\w.]+=\d+)', str(e)))
        raise ValueError(f'Run {run.name!r} cannot run on {opts.accelerator_type}: {e} '
                         f'Launch with {fix} (or choose another slice).') from e


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
  return [Command(f'Delete TPU VM {opts.tpu_name}.', tuple(_delete(opts)))]


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
  """Runs the commands in order.

  Raises:
    RuntimeError: a command failed.
  """
  out = out or sys.stdout
  for command in commands:
    _require(command.argv[0])
    print(f'# {command.comment}\n{shlex.join(command.argv)}', file=out, flush=True)
    returncode = subprocess.run(command.argv, check=False).returncode
    if returncode:
      raise RuntimeError(f'Command failed with status {returncode}: {shlex.join(command.argv)}')


def run_script(script: str) -> None:
  """Runs a `launch_script` with bash; it stops at the first failing command (`set -e`).

  Raises:
    RuntimeError: the script failed; its own message is on stderr above.
  """
  _require('gcloud')
  returncode = subprocess.run(['bash', '-c', script], check=False).returncode
  if returncode:
    raise RuntimeError(f'The launch stopped with status {returncode} (see the messages above; '
                       '--dry_run prints the script).')


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
  flags.DEFINE_string('runtime_version', None, 'TPU software version; default: the one of the '
                      'accelerator\'s generation: tpu-ubuntu2204-base (v2, v3, v4), '
                      'v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e).')
  flags.DEFINE_bool('queued', False, 'Request the slice as a queued resource (`gcloud compute '
                    'tpus queued-resources create`, the recommended way to get Spot capacity) '
                    'instead of `tpu-vm create`.')
  flags.DEFINE_bool('resume', False, 'Relaunch after a preemption: delete and recreate a '
                    'PREEMPTED / TERMINATED / SUSPENDED slice, reinstall and restart; the sweep '
                    'skips finished runs and interrupted ones resume from their checkpoints.')
  flags.DEFINE_integer('ready_timeout_s', Options.ready_timeout_s, 'How long to wait for the TPU '
                       'VM to be READY.')
  flags.DEFINE_integer('poll_s', Options.poll_s, 'Seconds between state checks while waiting.')
  flags.DEFINE_integer('log_copy_s', Options.log_copy_s, 'Seconds between copies of each '
                       'worker\'s log to <workdir(_root)>/logs/<job>/ on GCS.')
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
      queued=FLAGS.queued, resume=FLAGS.resume, ready_timeout_s=FLAGS.ready_timeout_s,
      poll_s=FLAGS.poll_s, log_copy_s=FLAGS.log_copy_s,
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
  if action == 'launch':
    script = launch_script(opts)
    listing = sweep_listing(opts)
    if opts.validate:
      try:
        check_slice(opts)
      except ValueError as e:
        sys.exit(f'ERROR: {e}')  # Before anything is created or started.
    print('\n'.join(listing + ([script] if FLAGS.dry_run else [])), flush=True)
    if FLAGS.dry_run:
      return
    run_script(script)
    print(f'# Started. Follow the logs with\n{logs_commands(opts)[0].shell()}')
    return
  commands = {'logs': logs_commands, 'stop': stop_commands, 'delete': delete_commands}[action](opts)
  if FLAGS.dry_run:
    print(format_commands(commands))
    return
  execute(commands)


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['tpu_name', 'zone'])
  app.run(main)
