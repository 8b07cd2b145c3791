"""Tests of experiments.sweep: names, commands, validation and running a sweep locally."""

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from experiments import hyper
from experiments import sweep

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = textwrap.dedent("""\
    import ml_collections
    from ml_collections import config_dict

    def get_config(arg=None):
      for item in filter(None, (arg or '').split(',')):
        if item.split('=', 1)[0] not in ('init', 'label_count', 'width'):
          raise ValueError(f'Unknown config argument {item!r}')
      config = ml_collections.ConfigDict()
      config.lr = 0.0
      config.wd = 0.0
      config.seed = 0
      config.total_steps = 100
      config.input = ml_collections.ConfigDict({
          'label_count': config_dict.placeholder(int), 'label_fraction': None, 'subset_seed': 0})
      config.distributed = ml_collections.ConfigDict({'initialize': False})
      return config

    def get_sweep(hyper, arg=None):
      return hyper.product([
          hyper.sweep('arg.init', ['supervised', 'ddep']),
          hyper.label_efficiency('cityscapes', labels=[100], max_runs=2),
          hyper.sweep('config.lr', [1e-4]),
          hyper.fixed('config.total_steps', 10),
      ])
    """)

NAMES = ['init=supervised-label_count=100-lr=0.0001-subset_seed=0',
         'init=supervised-label_count=100-lr=0.0001-subset_seed=1',
         'init=ddep-label_count=100-lr=0.0001-subset_seed=0',
         'init=ddep-label_count=100-lr=0.0001-subset_seed=1']

# Stands in for ddep_jax.main: logs its arguments, then writes final results (or fails).
FAKE_TRAINER = textwrap.dedent("""\
    import json, os, sys
    args = dict(a[2:].split('=', 1) for a in sys.argv[1:])
    with open(os.environ['FAKE_TRAINER_LOG'], 'a') as f:
      f.write(json.dumps(sys.argv[1:]) + '\\n')
    if os.environ.get('FAKE_TRAINER_FAIL', '//') in args['workdir']:
      sys.exit(3)
    os.makedirs(os.path.join(args['workdir'], 'results'), exist_ok=True)
    with open(os.path.join(args['workdir'], 'results', 'val.json'), 'w') as f:
      json.dump({'step': 10, 'mIoU': 0.5, 'final': True}, f)
    """)


@pytest.fixture
def repo(tmp_path, monkeypatch):
  """A directory with configs/demo.py and a fake trainer module, as the current directory."""
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'demo.py').write_text(CONFIG)
  (tmp_path / 'fake_trainer.py').write_text(FAKE_TRAINER)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('PYTHONPATH', str(tmp_path))
  monkeypatch.setenv('FAKE_TRAINER_LOG', str(tmp_path / 'calls.jsonl'))
  return tmp_path


def write_results(workdir, final):
  os.makedirs(os.path.join(workdir, 'results'), exist_ok=True)
  with open(os.path.join(workdir, 'results', 'val.json'), 'w') as f:
    json.dump({'step': 5, 'mIoU': 0.1, 'final': final}, f)


# -- names, values, commands ----------------------------------------------------------------------

def test_expand_one_run_exactly():
  runs = sweep.expand('configs/cs.py', 'decoder_width=2', [{
      'arg.init': 'ddep', 'arg.label_count': 100, 'config.input.subset_seed': 3,
      'config.seed': hyper.Untagged(3), 'config.lr': 1e-4, 'config.wd': 1e-5}], 'gs://b/sweep/')
  assert runs == [sweep.Run(
      name='init=ddep-label_count=100-lr=0.0001-subset_seed=3-wd=1e-05',
      workdir='gs://b/sweep/init=ddep-label_count=100-lr=0.0001-subset_seed=3-wd=1e-05',
      config_file='configs/cs.py', config_arg='decoder_width=2,init=ddep,label_count=100',
      overrides={'config.input.subset_seed': 3, 'config.lr': 1e-4, 'config.seed': 3,
                 'config.wd': 1e-5},
      tags={'init': 'ddep', 'label_count': 100, 'subset_seed': 3, 'lr': 1e-4, 'wd': 1e-5})]
  assert runs[0].command(python='python3') == [
      'python3', '-m', 'ddep_jax.main',
      '--config=configs/cs.py:decoder_width=2,init=ddep,label_count=100',
      '--workdir=gs://b/sweep/init=ddep-label_count=100-lr=0.0001-subset_seed=3-wd=1e-05',
      '--config.input.subset_seed=3', '--config.lr=0.0001', '--config.seed=3', '--config.wd=1e-05']


def test_names_are_safe_and_values_exact():
  assert hyper.run_name({'init_from': 'gs://b/run 1/ckpt', 'scales': (0.5, 1.0), 'flip': True,
                         'width': None}) == ('flip=True-init_from=gs___b_run_1_ckpt-'
                                             'scales=0.5+1.0-width=None')
  assert hyper.run_name({}) == 'run'
  assert hyper.format_value(0.1 + 0.2) == '0.30000000000000004'  # Never rounded: no clashes.
  assert hyper.format_value([0.5, 1]) == '(0.5, 1)'


def test_long_names_are_cut_with_a_stable_digest():
  tags = {f'key{i}': 'x' * 20 for i in range(12)}
  name = hyper.run_name(tags)
  assert len(name) == 200 and name == hyper.run_name(dict(reversed(list(tags.items()))))
  assert name.startswith('key0=xxxx') and name[-11] == '-'
  assert name != hyper.run_name({**tags, 'key11': 'y' * 20})


def test_tag_names_lengthen_only_on_clashes():
  assert sweep.tag_names(['config.input.data_dir', 'config.evals.data_dir', 'config.lr',
                          'arg.lr', 'config.input.subset_seed', 'config.seed']) == {
                              'config.input.data_dir': 'input.data_dir',
                              'config.evals.data_dir': 'evals.data_dir',
                              'config.lr': 'config.lr', 'arg.lr': 'arg.lr',
                              'config.input.subset_seed': 'subset_seed', 'config.seed': 'seed'}


def test_fold_arg():
  assert sweep.fold_arg('b=1,runlocal,a=2', {'a': 3, 'c': 0.5, 'aa': 'x'}) == (
      'b=1,runlocal,a=3,aa=x,c=0.5')
  assert sweep.fold_arg(None, {}) is None
  assert sweep.fold_arg('', {'gamma_range': (0.9, 0.95)}) == 'gamma_range=0.9+0.95'
  with pytest.raises(ValueError, match=r"arg.name='a,b': values folded into the config"):
    sweep.fold_arg('', {'name': 'a,b'})


def test_same_tags_are_an_error():
  with pytest.raises(ValueError, match=r"runs 0 and 1 of get_sweep both get the work directory "
                     r"name 'lr=0.1' \(runs: \{'config.lr': 0.1, 'config.seed': Untagged"):
    sweep.expand('configs/x.py', None, hyper.product([
        hyper.sweep('config.lr', [0.1]), hyper.sweep('config.seed', [1, 2], tag=False)]), '/w')


def test_bad_runs_are_errors():
  with pytest.raises(ValueError, match="Invalid sweep key 'lr'"):
    sweep.expand('configs/x.py', None, [{'lr': 1}], '/w')
  with pytest.raises(ValueError, match='returned list at index 0; expected a dict'):
    sweep.expand('configs/x.py', None, [[('config.lr', 1)]], '/w')
  with pytest.raises(ValueError, match=r"--set='distributed.initialize=True': expected "):
    sweep.train_command('c.py', '/w', extra=['distributed.initialize=True'])


# -- loading and validating -----------------------------------------------------------------------

def test_load_sweep_and_only(repo):
  runs = sweep.load_sweep('configs/demo.py:width=2', 'wd')
  assert [r.name for r in runs] == NAMES
  assert [r.config_arg for r in runs] == (['width=2,init=supervised,label_count=100'] * 2
                                          + ['width=2,init=ddep,label_count=100'] * 2)
  assert [r.name for r in sweep.select(runs, ['*subset_seed=1', 'init=ddep-*=0'])] == [
      NAMES[1], NAMES[2], NAMES[3]]
  with pytest.raises(ValueError, match=r"--only=init=dep-\* matches none of the 4 run names, "
                     r"which look like 'init=supervised-label_count=100-lr=0.0001-subset_seed=0'"):
    sweep.select(runs, ['init=dep-*'])


def test_load_sweep_errors(repo):
  (repo / 'configs' / 'plain.py').write_text('def get_config(arg=None):\n  return {}\n')
  with pytest.raises(ValueError, match=r'configs/plain.py defines no get_sweep\(hyper, arg=None\)'):
    sweep.load_sweep('configs/plain.py', 'wd')
  with pytest.raises(FileNotFoundError, match="Config file 'configs/nope.py' not found"):
    sweep.load_sweep('configs/nope.py', 'wd')


def test_validate(repo):
  runs = sweep.load_sweep('configs/demo.py', 'wd')
  sweep.validate(runs, ['config.distributed.initialize=True'])  # Every key exists.
  placeholder = sweep.expand('configs/demo.py', None, [{'config.input.label_count': 100}], 'wd')
  sweep.validate(placeholder)  # A typed placeholder can be set from the command line.

  def check(run, message, extra=()):
    with pytest.raises(ValueError, match=message):
      sweep.validate(sweep.expand('configs/demo.py', None, [run], 'wd'), extra)

  check({'config.input.label_cont': 100},
        r"Unknown sweep key 'config.input.label_cont' in run 'label_cont=100' "
        r"\(configs/demo.py\): config.input has no field 'label_cont'; its fields are "
        r"\['label_count', 'label_fraction', 'subset_seed'\]")
  check({}, r"Unknown sweep key 'config.distributed.init'", ['config.distributed.init=True'])
  check({'config.lr': 'high'},
        r"Sweep value config.lr='high' of run 'lr=high' does not fit the config field")
  check({'config.input.label_fraction': 0.1},
        r"config.input.label_fraction is None in get_config\(None\) of configs/demo.py, and a "
        r"None field cannot be overridden from the command line")
  check({'arg.label_cnt': 100},
        r"get_config\('label_cnt=100'\) of configs/demo.py fails for run 'label_cnt=100': "
        r"ValueError: Unknown config argument 'label_cnt=100'")


# -- running --------------------------------------------------------------------------------------

def calls(repo):
  with open(repo / 'calls.jsonl') as f:
    return [json.loads(line) for line in f]


def test_run_sweep_skips_finished_resumes_started_and_starts_new(repo, capsys):
  runs = sweep.load_sweep('configs/demo.py', str(repo / 'wd'))
  write_results(runs[0].workdir, final=True)  # Finished.
  write_results(runs[1].workdir, final=False)  # Interrupted after an intermediate eval.
  os.makedirs(runs[2].workdir)  # Interrupted before any eval.
  assert [sweep.status(r.workdir) for r in runs] == ['finished', 'started', 'started', 'new']

  failed = sweep.run_sweep(runs, python=sys.executable, module='fake_trainer')
  assert failed == []
  wd = str(repo / 'wd')
  assert calls(repo) == [
      ['--config=configs/demo.py:init=supervised,label_count=100', f'--workdir={wd}/{NAMES[1]}',
       '--config.input.subset_seed=1', '--config.lr=0.0001', '--config.seed=1',
       '--config.total_steps=10'],
      ['--config=configs/demo.py:init=ddep,label_count=100', f'--workdir={wd}/{NAMES[2]}',
       '--config.input.subset_seed=0', '--config.lr=0.0001', '--config.seed=0',
       '--config.total_steps=10'],
      ['--config=configs/demo.py:init=ddep,label_count=100', f'--workdir={wd}/{NAMES[3]}',
       '--config.input.subset_seed=1', '--config.lr=0.0001', '--config.seed=1',
       '--config.total_steps=10'],
  ]
  assert not os.path.exists(os.path.join(runs[0].workdir, 'run.json'))  # Untouched.
  with open(os.path.join(runs[3].workdir, 'run.json')) as f:
    assert json.load(f) == {
        'name': NAMES[3], 'config_file': 'configs/demo.py',
        'config_arg': 'init=ddep,label_count=100',
        'overrides': {'config.input.subset_seed': 1, 'config.lr': 0.0001, 'config.seed': 1,
                      'config.total_steps': 10},
        'tags': {'init': 'ddep', 'label_count': 100, 'lr': 0.0001, 'subset_seed': 1}}
  out = capsys.readouterr().out.splitlines()
  assert out[0] == f'# [1/4] finished, skipped: {wd}/{NAMES[0]}'
  assert out[1] == f'# [2/4] resume: {wd}/{NAMES[1]}'
  assert out[3] == f'# [3/4] resume: {wd}/{NAMES[2]}'
  assert out[5] == f'# [4/4] new: {wd}/{NAMES[3]}'

  # Everything is finished now: a second pass starts nothing.
  assert sweep.run_sweep(runs, python=sys.executable, module='fake_trainer') == []
  assert len(calls(repo)) == 3


def test_run_sweep_stops_at_a_failure_unless_keep_going(repo, monkeypatch, capsys):
  runs = sweep.load_sweep('configs/demo.py', str(repo / 'wd'))
  monkeypatch.setenv('FAKE_TRAINER_FAIL', 'subset_seed=0')
  assert sweep.run_sweep(runs, python=sys.executable, module='fake_trainer') == [NAMES[0]]
  assert len(calls(repo)) == 1
  assert f'# FAILED {NAMES[0]}: exited with status 3' in capsys.readouterr().out
  assert sweep.run_sweep(runs, python=sys.executable, module='fake_trainer',
                         keep_going=True) == [NAMES[0], NAMES[2]]
  assert len(calls(repo)) == 1 + 4


def test_run_json_of_another_run_is_refused(repo):
  runs = sweep.load_sweep('configs/demo.py:width=1', str(repo / 'wd'))
  os.makedirs(runs[0].workdir)
  with open(os.path.join(runs[0].workdir, 'run.json'), 'w') as f:
    json.dump(dict(runs[0].run_json(), config_arg='width=2,init=supervised,label_count=100'), f)
  with pytest.raises(ValueError, match=r"already holds run.json of a different run \(config_arg: "
                     r"'width=2,init=supervised,label_count=100' there, "
                     r"'width=1,init=supervised,label_count=100' now\)"):
    sweep.run_sweep(runs, python=sys.executable, module='fake_trainer')
  assert not os.path.exists(repo / 'calls.jsonl')


def test_dry_run_command_line(repo):
  write_results(repo / 'wd' / NAMES[2], final=True)
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.sweep', '--config=configs/demo.py:width=2',
       '--workdir_root=wd', '--dry_run', '--python=python3', '--only=init=ddep-*',
       '--set=config.distributed.initialize=True'],
      cwd=repo, env=dict(os.environ, PYTHONPATH=REPO_ROOT), capture_output=True, text=True,
      check=True)
  assert result.stdout.splitlines() == [
      '# configs/demo.py:width=2: 4 runs in the sweep, 2 selected, under wd',
      f'# [1/2] finished, skipped: wd/{NAMES[2]}',
      f'# [2/2] new: wd/{NAMES[3]}',
      'python3 -m ddep_jax.main --config=configs/demo.py:width=2,init=ddep,label_count=100'
      f' --workdir=wd/{NAMES[3]} --config.input.subset_seed=1 --config.lr=0.0001'
      ' --config.seed=1 --config.total_steps=10 --config.distributed.initialize=True',
  ]
  assert not os.path.exists(repo / 'wd' / NAMES[3])  # A dry run writes nothing.


def test_only_worker_zero_writes_run_json(repo):
  # Every worker of a pod slice runs the same sweep; one writer per shared object.
  runs = sweep.load_sweep('configs/demo.py', str(repo / 'wd'))[:1]
  assert sweep.run_sweep(runs, python=sys.executable, module='fake_trainer',
                         process_index=1) == []
  assert len(calls(repo)) == 1
  assert not os.path.exists(os.path.join(runs[0].workdir, 'run.json'))
  os.remove(os.path.join(runs[0].workdir, 'results', 'val.json'))
  assert sweep.run_sweep(runs, python=sys.executable, module='fake_trainer',
                         process_index=0) == []
  assert json.loads((repo / 'wd' / NAMES[0] / 'run.json').read_text())['name'] == NAMES[0]


def test_a_config_of_the_configs_package_is_loaded_once_under_its_package_name():
  # The config files import each other's helpers as `configs.<name>`; loading one by path must
  # give that same module, not a second copy under another name.
  path = os.path.join(REPO_ROOT, 'configs', 'cityscapes.py')
  module = sweep.load_config_module(path)
  assert module.__name__ == 'configs.cityscapes'
  assert module is importlib.import_module('configs.cityscapes')
  assert sweep.load_config_module(os.path.relpath(path)) is module
