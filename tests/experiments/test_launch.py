"""Tests of experiments/tpu/launch.py: exact gcloud command lines, never a real gcloud call."""

import io
import json
import os
import subprocess
import sys
import textwrap

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

# Stands in for gcloud: logs its arguments; `describe` prints $FAKE_TPU_STATE or fails.
FAKE_GCLOUD = textwrap.dedent("""\
    import json, os, sys
    with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:
      f.write(json.dumps(sys.argv[1:]) + '\\n')
    if sys.argv[4] == 'describe':
      if 'FAKE_TPU_STATE' not in os.environ:
        sys.exit('ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: node not found')
      print(os.environ['FAKE_TPU_STATE'])
    """)

SSH = ('gcloud compute tpus tpu-vm ssh ddep-v4-32 --zone=us-central2-b --project=my-proj '
       '--worker=all')


@pytest.fixture
def repo(tmp_path):
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'demo.py').write_text(CONFIG)
  return tmp_path


def test_dry_run_of_a_sweep_prints_the_exact_commands(repo):
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.tpu.launch', '--tpu_name=ddep-v4-32',
       '--zone=us-central2-b', '--project=my-proj', '--accelerator_type=v4-32', '--spot',
       '--config=configs/demo.py:width=2', '--workdir_root=gs://bucket/cs',
       '--tfds_data_dir=gs://bucket/tfds', '--only=init=ddep-*', '--set=config.seed=7',
       f'--local_dir={repo}', '--staging_dir=/stage', '--dry_run'],
      cwd=REPO_ROOT, capture_output=True, text=True, check=True)
  run = ('#   .venv/bin/python -m ddep_jax.main '
         '--config=configs/demo.py:width=2,init=ddep,label_count=100 '
         '--workdir=gs://bucket/cs/init=ddep-label_count=100-lr={lr}-subset_seed={seed} '
         '--config.input.subset_seed={seed} --config.lr={lr} --config.seed={seed} '
         '--config.distributed.initialize=True --config.seed=7')
  assert result.stdout.splitlines() == [
      '# Every worker runs these 4 runs in turn, from ~/ddep_jax (finished ones are skipped):',
      run.format(lr='0.0001', seed=0),
      run.format(lr='0.0003', seed=0),
      run.format(lr='0.0001', seed=1),
      run.format(lr='0.0003', seed=1),
      '# Reuse TPU VM ddep-v4-32 if it exists, else create it.',
      'gcloud compute tpus tpu-vm describe ddep-v4-32 --zone=us-central2-b --project=my-proj '
      "'--format=value(state)' || gcloud compute tpus tpu-vm create ddep-v4-32 "
      '--zone=us-central2-b --project=my-proj --accelerator-type=v4-32 '
      '--version=tpu-ubuntu2204-base --spot',
      f'# Pack the working tree {repo}.',
      'tar -czf /stage/demo-src.tar.gz --exclude=.git --exclude=.venv --exclude=workdirs '
      f"--exclude=__pycache__ '--exclude=*.egg-info' -C {repo} .",
      '# Copy it to every worker.',
      'gcloud compute tpus tpu-vm scp /stage/demo-src.tar.gz ddep-v4-32: --worker=all '
      '--zone=us-central2-b --project=my-proj',
      '# Unpack it into ~/ddep_jax and install it on every worker.',
      f"{SSH} '--command=mkdir -p ddep_jax && tar -xzf demo-src.tar.gz -C ddep_jax && "
      'rm demo-src.tar.gz && cd ddep_jax && (test -x .venv/bin/python || { sudo apt-get update '
      '-qq && sudo apt-get install -y -qq python3.11 python3.11-venv && python3.11 -m venv '
      '.venv; }) && .venv/bin/pip install -q -e ".[tpu]"\'',
      '# Start job demo on every worker; logs in ~/ddep_logs/demo.log on each.',
      f"{SSH} '--command=mkdir -p \"$HOME/ddep_logs\" && cd ddep_jax && "
      'if kill -0 "$(cat "$HOME/ddep_logs/demo.pid" 2>/dev/null)" 2>/dev/null; then '
      'echo "demo is already running on $(hostname); stop it first (--action=stop)" >&2; exit 1; '
      'fi && { TFDS_DATA_DIR=gs://bucket/tfds setsid nohup .venv/bin/python -m experiments.sweep '
      '--config=configs/demo.py:width=2 --workdir_root=gs://bucket/cs --python=.venv/bin/python '
      '--set=config.distributed.initialize=True --set=config.seed=7 '
      '\'"\'"\'--only=init=ddep-*\'"\'"\' > "$HOME/ddep_logs/demo.log" 2>&1 < /dev/null & '
      'echo $! > "$HOME/ddep_logs/demo.pid"; }\'',
  ]


def test_single_run_from_git_on_a_preemptible_tpu():
  opts = launch.Options(
      tpu_name='ddep-pretrain', zone='europe-west4-a', accelerator_type='v3-128',
      runtime_version='tpu-ubuntu2204-base', preemptible=True,
      config='configs/ddep_pretrain.py:decoder_width=2', workdir='gs://bucket/ddep_2x',
      source='https://github.com/example/ddep_jax.git', git_ref='v0.1', apt_install=False)
  assert [(c.comment, c.shell()) for c in launch.launch_commands(opts)] == [
      ('Reuse TPU VM ddep-pretrain if it exists, else create it.',
       "gcloud compute tpus tpu-vm describe ddep-pretrain --zone=europe-west4-a "
       "'--format=value(state)' || gcloud compute tpus tpu-vm create ddep-pretrain "
       '--zone=europe-west4-a --accelerator-type=v3-128 --version=tpu-ubuntu2204-base '
       '--preemptible'),
      ('Clone https://github.com/example/ddep_jax.git at v0.1 on every worker and install it.',
       'gcloud compute tpus tpu-vm ssh ddep-pretrain --zone=europe-west4-a --worker=all '
       "'--command=(test -d ddep_jax/.git || git clone -q "
       'https://github.com/example/ddep_jax.git ddep_jax) && cd ddep_jax && git fetch -q origin '
       'v0.1 && git checkout -q --detach FETCH_HEAD && (test -x .venv/bin/python || python3.11 '
       '-m venv .venv) && .venv/bin/pip install -q -e ".[tpu]"\''),
      ('Start job ddep_2x on every worker; logs in ~/ddep_logs/ddep_2x.log on each.',
       'gcloud compute tpus tpu-vm ssh ddep-pretrain --zone=europe-west4-a --worker=all '
       "'--command=mkdir -p \"$HOME/ddep_logs\" && cd ddep_jax && "
       'if kill -0 "$(cat "$HOME/ddep_logs/ddep_2x.pid" 2>/dev/null)" 2>/dev/null; then '
       'echo "ddep_2x is already running on $(hostname); stop it first (--action=stop)" >&2; '
       'exit 1; fi && { setsid nohup .venv/bin/python -m ddep_jax.main '
       '--config=configs/ddep_pretrain.py:decoder_width=2 --workdir=gs://bucket/ddep_2x '
       '--config.distributed.initialize=True > "$HOME/ddep_logs/ddep_2x.log" 2>&1 < /dev/null & '
       'echo $! > "$HOME/ddep_logs/ddep_2x.pid"; }\''),
  ]
  no_install = launch.launch_commands(launch.Options(**{**opts.__dict__, 'install': False}))
  assert [c.comment.split()[0] for c in no_install] == ['Reuse', 'Start']


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


BASE = dict(tpu_name='t', zone='z', accelerator_type='v4-8', config='configs/demo.py',
            workdir='gs://b/run')


@pytest.mark.parametrize('changes, message', [
    (dict(workdir='/tmp/run'), r"--workdir='/tmp/run' must be a gs:// path"),
    (dict(tfds_data_dir='~/tfds'), r"--tfds_data_dir='~/tfds' must be a gs:// path"),
    (dict(workdir_root='gs://b/sweep'), 'Pass exactly one of --workdir'),
    (dict(workdir=None), 'Pass exactly one of --workdir'),
    (dict(spot=True, preemptible=True), 'at most one of --spot and --preemptible'),
    (dict(config='/home/me/configs/x.py'), 'must be relative to the repository root'),
    (dict(accelerator_type=None), '--accelerator_type is needed to create the TPU VM'),
    (dict(remote_dir='~/code'), r"--remote_dir='~/code' must be a plain path"),
    (dict(job_name='my job'), "Job name 'my job' may only use"),
    (dict(remote_python='python3; rm -rf ~'), "--remote_python='python3; rm -rf ~' must be"),
])
def test_bad_options_are_explained(changes, message):
  with pytest.raises(ValueError, match=message):
    launch.launch_commands(launch.Options(**{**BASE, **changes}))


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  script = bin_dir / 'gcloud'
  script.write_text(f'#!{sys.executable}\n' + FAKE_GCLOUD)
  script.chmod(0o755)
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  monkeypatch.setenv('FAKE_GCLOUD_LOG', str(tmp_path / 'gcloud.jsonl'))
  monkeypatch.delenv('FAKE_TPU_STATE', raising=False)

  def logged():
    with open(tmp_path / 'gcloud.jsonl') as f:
      return [json.loads(line) for line in f]
  return logged


def test_execute_creates_a_missing_tpu_then_installs_and_starts(repo, tmp_path, fake_gcloud):
  (repo / '.venv').mkdir()
  (repo / '.venv' / 'python').write_text('')
  stage = tmp_path.parent / f'{tmp_path.name}-stage'
  stage.mkdir()
  opts = launch.Options(**{**BASE, 'local_dir': str(repo), 'staging_dir': str(stage)})
  launch.execute(launch.launch_commands(opts), out=io.StringIO())
  tpu = ['t', '--zone=z']
  calls = fake_gcloud()
  assert [c[:6] for c in calls] == [
      ['compute', 'tpus', 'tpu-vm', 'describe'] + tpu,
      ['compute', 'tpus', 'tpu-vm', 'create'] + tpu,
      ['compute', 'tpus', 'tpu-vm', 'scp', str(stage / 'run-src.tar.gz'), 't:'],
      ['compute', 'tpus', 'tpu-vm', 'ssh'] + tpu,
      ['compute', 'tpus', 'tpu-vm', 'ssh'] + tpu,
  ]
  assert calls[1][6:] == ['--accelerator-type=v4-8', '--version=tpu-ubuntu2204-base']
  assert calls[4][7].startswith('--command=mkdir -p "$HOME/ddep_logs" && cd ddep_jax')
  # The tarball holds the working tree, without what must not travel.
  listing = subprocess.run(['tar', '-tzf', str(stage / 'run-src.tar.gz')], check=True,
                           capture_output=True, text=True).stdout.split()
  assert './configs/demo.py' in listing and not [p for p in listing if '.venv' in p]


def test_execute_reuses_a_ready_tpu_and_refuses_a_preempted_one(repo, tmp_path, fake_gcloud,
                                                                monkeypatch):
  opts = launch.Options(**{**BASE, 'install': False})
  monkeypatch.setenv('FAKE_TPU_STATE', 'READY')
  launch.execute(launch.launch_commands(opts), out=io.StringIO())
  assert [c[3] for c in fake_gcloud()] == ['describe', 'ssh']
  monkeypatch.setenv('FAKE_TPU_STATE', 'PREEMPTED')
  with pytest.raises(RuntimeError, match=r'TPU VM exists but is PREEMPTED, not READY.*'
                     r'\(gcloud compute tpus tpu-vm delete t --zone=z\)'):
    launch.execute(launch.launch_commands(opts), out=io.StringIO())


def test_execute_without_gcloud_says_what_to_do(monkeypatch, tmp_path):
  monkeypatch.setenv('PATH', str(tmp_path))  # No gcloud there.
  with pytest.raises(RuntimeError, match=r'gcloud not found on PATH. Install the Google Cloud '
                     r'CLI \(https://cloud.google.com/sdk/docs/install\).*--dry_run'):
    launch.execute(launch.delete_commands(launch.Options(tpu_name='t', zone='z')))


def test_staging_dir_inside_the_shipped_tree_is_refused(repo):
  opts = launch.Options(**{**BASE, 'local_dir': str(repo), 'staging_dir': str(repo / 'tmp')})
  with pytest.raises(ValueError, match='staging_dir.*inside --local_dir'):
    launch.launch_commands(opts)
