"""Tests of experiments/tpu/launch.py, never a real gcloud call.

The launch script is executed by bash against a fake `gcloud` on PATH that records its calls,
answers `describe` with a scripted sequence of states (not found, CREATING, READY, PREEMPTED...),
and, for `ssh`, runs the worker command itself in a fake worker home: the refusal of a second
launch, the appended per-attempt logs and their copy to the (fake) bucket are real behaviour.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from experiments.tpu import launch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = textwrap.dedent("""\
    import ml_collections

    def get_config(arg=None):
      config = ml_collections.ConfigDict()
      config.lr = 0.0
      config.seed = 0
      config.input = ml_collections.ConfigDict({'label_count': 0, 'subset_seed': 0})
      config.distributed = ml_collections.ConfigDict({'initialize': False})
      return config

    def get_sweep(hyper, arg=None):
      return hyper.product([
          hyper.sweep('arg.init', ['supervised', 'ddep']),
          hyper.label_efficiency('cityscapes', labels=[100], max_runs=2),
          hyper.sweep('config.lr', [1e-4, 3e-4]),
      ])
    """)

# Stands in for gcloud (bash: a Python start-up per call costs seconds on a loaded machine). Logs
# its arguments (separated by \x1f); `describe` answers the next line of $FAKE_TPU_STATES (the
# last one repeats; an empty line is "not found"); `ssh` runs the worker command in
# $FAKE_WORKER_HOME as worker 0 when that is set; `storage cp` copies into $FAKE_GCS.
FAKE_GCLOUD = textwrap.dedent("""\
    #!/bin/bash
    ( IFS=$'\\x1f'; printf '%s\\n' "$*" ) >> "$FAKE_GCLOUD_LOG"
    case "${@: -1}" in --format=value\\(state*)
      mapfile -t states < "$FAKE_TPU_STATES"
      state="${states[0]:-}"
      if [ ${#states[@]} -gt 1 ]; then printf '%s\\n' "${states[@]:1}" > "$FAKE_TPU_STATES"; fi
      if [ -z "$state" ]; then echo "ERROR: NOT_FOUND" >&2; exit 1; fi
      echo "$state"; exit 0 ;;
    esac
    if [ "$1 $2" = 'storage cp' ]; then
      dest="$FAKE_GCS/${4#gs://}"; mkdir -p "$(dirname "$dest")"; cp "$3" "$dest"; exit 0
    fi
    if [ "${4:-}" = ssh ] && [ -n "${FAKE_WORKER_HOME:-}" ]; then
      for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}" ;; esac; done
      cd "$FAKE_WORKER_HOME" && HOME="$FAKE_WORKER_HOME" DDEP_WORKER_ID=0 exec bash -c "$cmd"
    fi
    """)

BASE = dict(tpu_name='t', zone='z', accelerator_type='v4-8', config='configs/demo.py',
            workdir='gs://b/run', poll_s=0, ready_timeout_s=10)


@pytest.fixture
def repo(tmp_path):
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'demo.py').write_text(CONFIG)
  return tmp_path


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  script = bin_dir / 'gcloud'
  script.write_text(FAKE_GCLOUD)
  script.chmod(0o755)
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  monkeypatch.setenv('FAKE_GCLOUD_LOG', str(tmp_path / 'gcloud.jsonl'))
  monkeypatch.setenv('FAKE_TPU_STATES', str(tmp_path / 'states'))
  monkeypatch.setenv('FAKE_GCS', str(tmp_path / 'gcs'))
  monkeypatch.delenv('FAKE_WORKER_HOME', raising=False)

  def run(opts, states):
    """Runs the launch script of `opts`; returns (the gcloud calls, the error or None)."""
    (tmp_path / 'states').write_text('\n'.join(states))
    (tmp_path / 'gcloud.jsonl').write_text('')
    error = None
    try:
      launch.run_script(launch.launch_script(opts))
    except RuntimeError as e:
      error = str(e)
    with open(tmp_path / 'gcloud.jsonl') as f:
      return [line.rstrip('\n').split('\x1f') for line in f], error
  return run


def _verbs(calls):
  return [' '.join(c[2:4]) if c[0] == 'compute' else ' '.join(c[:2]) for c in calls]


@pytest.mark.parametrize('accelerator, runtime, devices, hosts', [
    ('v4-32', 'tpu-ubuntu2204-base', 16, 4), ('v5litepod-16', 'v2-alpha-tpuv5-lite', 16, 4),
    ('v5e-16', 'v2-alpha-tpuv5-lite', 16, 4), ('v5p-32', 'v2-alpha-tpuv5', 16, 4),
    ('v5litepod-8', 'v2-alpha-tpuv5-lite', 8, 1), ('v6e-64', 'v2-alpha-tpuv6e', 64, 16),
    ('v3-128', 'tpu-ubuntu2204-base', 128, 16), ('v2-8', 'tpu-ubuntu2204-base', 8, 1),
    ('v4-8', 'tpu-ubuntu2204-base', 4, 1),
])
def test_runtime_version_and_devices_follow_the_accelerator(accelerator, runtime, devices, hosts):
  assert launch.runtime_version(accelerator) == runtime
  assert launch.slice_shape(accelerator) == (devices, hosts)


def test_batches_are_checked_against_the_requested_slice():
  opts = launch.Options(tpu_name='t', zone='z', accelerator_type='v5p-32',
                        config='configs/cityscapes.py:init=none', workdir='gs://b/cs')
  with pytest.raises(ValueError, match=r"^Run 'cs' cannot run on v5p-32: config.input.batch_size=8"
                     r": every global batch must be a multiple of the 16 devices of v5p-32 \(4 "
                     r"processes\)\..* Launch with --set=config.input.batch_size=16 \(or choose"):
    launch.check_slice(opts)
  launch.check_slice(launch.Options(**{**opts.__dict__,
                                       'overrides': ('config.input.batch_size=16',)}))
  launch.check_slice(launch.Options(**{**opts.__dict__, 'accelerator_type': 'v5p-16'}))
  launch.check_slice(launch.Options(**{**opts.__dict__, 'accelerator_type': 'v4-32',
                                       'config': 'configs/ade20k.py:init=none'}))


def test_dry_run_prints_one_safe_script(repo):
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.tpu.launch', '--tpu_name=ddep-v5p-32',
       '--zone=us-east5-a', '--project=my-proj', '--accelerator_type=v5p-32', '--spot',
       '--queued', '--config=configs/demo.py:width=2', '--workdir_root=gs://bucket/cs',
       '--tfds_data_dir=gs://bucket/tfds', '--only=init=ddep-*', '--set=config.seed=7',
       f'--local_dir={repo}', '--staging_dir=/stage', '--dry_run'],
      cwd=REPO_ROOT, capture_output=True, text=True, check=True)
  lines = result.stdout.splitlines()
  assert lines[0] == ('# Every worker runs these 4 runs in turn, from ~/ddep_jax (finished ones '
                      'are skipped):')
  assert lines[5:7] == ['#!/bin/bash', 'set -euo pipefail']
  script = '\n'.join(lines[5:])
  assert ('gcloud compute tpus queued-resources create ddep-v5p-32 --node-id=ddep-v5p-32 '
          '--zone=us-east5-a --project=my-proj --accelerator-type=v5p-32 '
          '--runtime-version=v2-alpha-tpuv5 --spot') in script
  assert ('sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq '
          'python3.11 python3.11-venv') in script
  assert '.venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e' in script
  assert 'gs://bucket/cs/logs/demo/worker-' in script
  # The refusal of a second launch comes before the tarball is copied to the workers.
  assert script.index('is already running') < script.index('tpu-vm scp')
  syntax = subprocess.run(['bash', '-n', '-c', script], capture_output=True, text=True)
  assert syntax.returncode == 0, syntax.stderr


def test_a_missing_slice_is_created_waited_for_then_installed_and_started(repo, tmp_path,
                                                                          fake_gcloud):
  stage = tmp_path.parent / f'{tmp_path.name}-stage'
  stage.mkdir()
  opts = launch.Options(**{**BASE, 'local_dir': str(repo), 'staging_dir': str(stage),
                           'apt_install': False})
  calls, error = fake_gcloud(opts, ['', 'CREATING', 'CREATING', 'READY'])
  assert error is None
  assert _verbs(calls) == ['tpu-vm describe', 'tpu-vm create', 'tpu-vm describe',
                           'tpu-vm describe', 'tpu-vm describe', 'tpu-vm ssh', 'tpu-vm scp',
                           'tpu-vm ssh', 'tpu-vm ssh']
  assert calls[1][6:] == ['--accelerator-type=v4-8', '--version=tpu-ubuntu2204-base']
  assert 'is already running' in calls[5][-1] and 'tar -xzf' in calls[7][-1]
  assert 'setsid nohup' in calls[8][-1]
  listing = subprocess.run(['tar', '-tzf', str(stage / 'run-src.tar.gz')], check=True,
                           capture_output=True, text=True).stdout.split()
  assert './configs/demo.py' in listing


def test_never_ready_is_an_error_not_a_hang(fake_gcloud):
  calls, error = fake_gcloud(launch.Options(**{**BASE, 'install': False}), ['CREATING'])
  assert 'status 1' in error and _verbs(calls).count('tpu-vm describe') == 12
  assert 'tpu-vm ssh' not in _verbs(calls)


def test_preempted_slice_is_refused_unless_resume_recreates_it(fake_gcloud):
  opts = launch.Options(**{**BASE, 'install': False, 'spot': True})
  calls, error = fake_gcloud(opts, ['PREEMPTED'])
  assert error is not None and _verbs(calls) == ['tpu-vm describe']  # Workers untouched.
  calls, error = fake_gcloud(launch.Options(**{**opts.__dict__, 'resume': True}),
                             ['PREEMPTED', 'CREATING', 'READY'])
  assert error is None
  assert _verbs(calls) == ['tpu-vm describe', 'tpu-vm delete', 'tpu-vm create',
                           'tpu-vm describe', 'tpu-vm describe', 'tpu-vm ssh', 'tpu-vm ssh']
  assert calls[2][-1] == '--spot'


def test_queued_resource_waits_for_capacity(fake_gcloud):
  opts = launch.Options(**{**BASE, 'install': False, 'spot': True, 'queued': True,
                           'accelerator_type': 'v5litepod-16'})
  calls, error = fake_gcloud(opts, ['', '', 'READY'])  # Request, then node not yet there, READY.
  assert error is None
  assert _verbs(calls) == ['queued-resources describe', 'queued-resources create',
                           'tpu-vm describe', 'tpu-vm describe', 'tpu-vm ssh', 'tpu-vm ssh']
  assert calls[1][4:] == ['t', '--node-id=t', '--zone=z', '--accelerator-type=v5litepod-16',
                          '--runtime-version=v2-alpha-tpuv5-lite', '--spot']


FAKE_PYTHON = '#!/bin/bash\necho "python $* worker=$DDEP_PROCESS_INDEX"\nsleep "${FAKE_JOB_S:-0}"\n'


def test_worker_job_refuses_a_second_launch_and_appends_logs(tmp_path, fake_gcloud,
                                                              monkeypatch):
  home = tmp_path / 'worker0'
  (home / 'ddep_jax' / '.venv' / 'bin').mkdir(parents=True)
  python = home / 'ddep_jax' / '.venv' / 'bin' / 'python'
  python.write_text(FAKE_PYTHON)
  python.chmod(0o755)
  monkeypatch.setenv('FAKE_WORKER_HOME', str(home))
  monkeypatch.setenv('FAKE_JOB_S', '1')
  opts = launch.Options(**{**BASE, 'install': False, 'log_copy_s': 1})
  pid_file = home / 'ddep_logs' / 'run.pid'

  def wait_for_the_job():
    deadline = time.time() + 20
    while time.time() < deadline:
      if subprocess.run(['kill', '-0', pid_file.read_text().strip()],
                        capture_output=True).returncode:
        return
      time.sleep(0.1)
    raise AssertionError('the job did not end')

  calls, error = fake_gcloud(opts, ['READY'])
  assert error is None
  calls, error = fake_gcloud(opts, ['READY'])  # While the first job runs.
  # The running job's own log copies ('storage cp') land in the same call log.
  assert error is not None and [v for v in _verbs(calls) if v != 'storage cp'] == [
      'tpu-vm describe', 'tpu-vm describe', 'tpu-vm ssh']
  wait_for_the_job()
  calls, error = fake_gcloud(opts, ['READY'])
  assert error is None
  wait_for_the_job()
  log = (home / 'ddep_logs' / 'run.log').read_text().splitlines()
  assert [line.split(' at ')[0] for line in log if line.startswith('==')] == [
      '== attempt', '== exit status 0', '== attempt', '== exit status 0']
  assert log[1] == ('python -m ddep_jax.main --config=configs/demo.py --workdir=gs://b/run '
                    '--config.distributed.initialize=True worker=0')
  copied = tmp_path / 'gcs' / 'b' / 'run' / 'logs' / 'run' / 'worker-0.log'
  assert copied.read_text().splitlines() == log


def test_logs_stop_delete():
  opts = launch.Options(tpu_name='t1', zone='z', project='p', job_name='cs', log_lines=20)
  ssh = "gcloud compute tpus tpu-vm ssh t1 --zone=z --project=p --worker=all '--command="
  assert launch.logs_commands(opts)[0].shell() == (
      ssh + 'echo "== $(hostname): $HOME/ddep_logs/cs.log" && tail -n 20 '
      '"$HOME/ddep_logs/cs.log"\'')
  assert launch.stop_commands(opts)[0].shell() == (
      ssh + 'if kill -0 "$(cat "$HOME/ddep_logs/cs.pid" 2>/dev/null)" 2>/dev/null; then '
      'kill -TERM -- -"$(cat "$HOME/ddep_logs/cs.pid")" && echo "stopped cs on $(hostname)"; '
      'else echo "cs is not running on $(hostname)"; fi; rm -f "$HOME/ddep_logs/cs.pid"\'')
  assert launch.delete_commands(opts)[0].shell() == (
      'gcloud compute tpus tpu-vm delete t1 --zone=z --project=p --quiet')



@pytest.mark.parametrize('changes, message', [
    (dict(workdir='/tmp/run'), r"--workdir='/tmp/run' must be a gs:// path"),
    (dict(tfds_data_dir='~/tfds'), r"--tfds_data_dir='~/tfds' must be a gs:// path"),
    (dict(workdir_root='gs://b/sweep'), 'Pass exactly one of --workdir'),
    (dict(workdir=None), 'Pass exactly one of --workdir'),
    (dict(spot=True, preemptible=True), 'at most one of --spot and --preemptible'),
    (dict(config='/home/me/configs/x.py'), 'must be relative to the repository root'),
    (dict(accelerator_type=None), '--accelerator_type is needed to create the TPU VM'),
    (dict(accelerator_type='v9-32'), r"--accelerator_type='v9-32': expected <generation>-<size>"),
    (dict(queued=True, preemptible=True), 'Queued resources take --spot'),
    (dict(remote_dir='~/code'), r"--remote_dir='~/code' must be a plain path"),
    (dict(job_name='my job'), "Job name 'my job' may only use"),
    (dict(remote_python='python3; rm -rf ~'), "--remote_python='python3; rm -rf ~' must be"),
])
def test_bad_options_are_explained(changes, message):
  with pytest.raises(ValueError, match=message):
    launch.launch_script(launch.Options(**{**BASE, **changes}))


def test_execute_without_gcloud_says_what_to_do(monkeypatch, tmp_path):
  monkeypatch.setenv('PATH', str(tmp_path))  # No gcloud there.
  with pytest.raises(RuntimeError, match=r'gcloud not found on PATH. Install the Google Cloud '
                     r'CLI \(https://cloud.google.com/sdk/docs/install\).*--dry_run'):
    launch.execute(launch.delete_commands(launch.Options(tpu_name='t', zone='z')))


def test_staging_dir_inside_the_shipped_tree_is_refused(repo):
  opts = launch.Options(**{**BASE, 'local_dir': str(repo), 'staging_dir': str(repo / 'tmp')})
  with pytest.raises(ValueError, match='staging_dir.*inside --local_dir'):
    launch.launch_script(opts)
