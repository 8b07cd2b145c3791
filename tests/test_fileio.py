"""Tests of ddep_jax.fileio, including the tf.io.gfile path that gs:// work directories take.

TensorFlow's in-memory `ram://` file system stands in for GCS: same code path, no network.
"""

import json
import os

from experiments import collect_results
from ddep_jax import fileio
from experiments import sweep


def test_local_paths(tmp_path):
  path = fileio.join(str(tmp_path), 'a', 'run.json')
  fileio.write_json(path, {'b': 1, 'a': [1, 2]})
  with open(path) as f:
    assert f.read() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
  assert not os.path.exists(path + '.tmp')
  assert fileio.read_json(path) == {'a': [1, 2], 'b': 1}
  assert fileio.glob(str(tmp_path / '*')) == [str(tmp_path / 'a')]
  assert fileio.isdir(str(tmp_path / 'a')) and not fileio.exists(str(tmp_path / 'b'))


def test_invalid_json_names_the_file(tmp_path):
  (tmp_path / 'bad.json').write_text('{"step": ')
  try:
    fileio.read_json(str(tmp_path / 'bad.json'))
  except ValueError as e:
    assert str(e).startswith(f'{tmp_path}/bad.json is not valid JSON (')
  else:
    raise AssertionError('no error')


def test_remote_paths(tmp_path):
  root = f'ram://{tmp_path.name}/'
  assert fileio.join(root, 'x', 'results/') == f'ram://{tmp_path.name}/x/results'
  fileio.write_json(fileio.join(root, 'x', 'results', 'val.json'), {'final': True})
  assert fileio.glob(f'ram://{tmp_path.name}/x/results/*') == [
      f'ram://{tmp_path.name}/x/results/val.json']
  assert fileio.read_json(f'ram://{tmp_path.name}/x/results/val.json') == {'final': True}
  assert fileio.glob(f'ram://{tmp_path.name}/*') == [f'ram://{tmp_path.name}/x']
  assert fileio.isdir(f'ram://{tmp_path.name}/x')
  assert not fileio.exists(f'ram://{tmp_path.name}/y')


def test_sweep_and_collector_on_remote_workdirs(tmp_path):
  root = f'ram://{tmp_path.name}/cityscapes'
  runs = sweep.expand('configs/cs.py', None, [{'arg.init': 'ddep', 'config.input.subset_seed': 0,
                                               'config.lr': 1e-4}], root)
  workdir = runs[0].workdir
  assert workdir == f'{root}/init=ddep-lr=0.0001-subset_seed=0'
  assert sweep.status(workdir) == 'new'
  fileio.write_json(f'{workdir}/run.json', runs[0].run_json())
  fileio.write_json(f'{workdir}/results/val.json', {'mIoU': 0.5, 'final': False})
  assert sweep.status(workdir) == 'started'
  fileio.write_json(f'{workdir}/results/val.json', {'mIoU': 0.5, 'final': True})
  assert sweep.status(workdir) == 'finished'
  (record,) = collect_results.load_records([f'{root}/*'])
  assert record == collect_results.Record(
      workdir=workdir, tags={'init': 'ddep', 'lr': 1e-4, 'subset_seed': 0}, config={},
      results={'val': {'mIoU': 0.5, 'final': True}})
  assert json.loads(json.dumps(runs[0].run_json())) == fileio.read_json(f'{workdir}/run.json')
