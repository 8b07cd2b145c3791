"""Tests of ddep_jax.fileio, including the tf.io.gfile path that gs:// work directories take.

TensorFlow's in-memory `ram://` file system stands in for GCS: same code path, no network.
"""

import io
import json
import os

from ddep_jax import fileio
from experiments import results_table
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
  assert fileio.isfile(path) and not fileio.isfile(str(tmp_path / 'a'))
  fileio.write_bytes(str(tmp_path / 'a' / 'b' / 'c.png'), b'png')
  assert not os.path.exists(str(tmp_path / 'a' / 'b' / 'c.png.tmp'))
  assert fileio.glob(str(tmp_path / '**' / '*.png'), recursive=True) == [
      str(tmp_path / 'a' / 'b' / 'c.png')]
  assert fileio.abspath('run') == os.path.abspath('run')


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
  assert fileio.isfile(f'ram://{tmp_path.name}/x/results/val.json')
  assert not fileio.isfile(f'ram://{tmp_path.name}/x')
  assert fileio.abspath(root) == root
  assert fileio.dirname(f'ram://{tmp_path.name}/x/') == f'ram://{tmp_path.name}'
  assert fileio.dirname('gs://bucket') == 'gs://bucket'  # The root is its own parent, as '/'.


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
  (record,) = results_table.load_records([f'{root}/*'])
  assert record == results_table.Record(
      workdir=workdir, tags={'init': 'ddep', 'lr': 1e-4, 'subset_seed': 0}, config={},
      results={'val': {'mIoU': 0.5, 'final': True}})
  assert json.loads(json.dumps(runs[0].run_json())) == fileio.read_json(f'{workdir}/run.json')


# -- every user path of the library on a non-local file system -----------------------------------

def test_checkpoint_resolution_on_a_remote_workdir(tmp_path):
  from ddep_jax import checkpoints  # pylint: disable=g-import-not-at-top
  workdir = f'ram://{tmp_path.name}/pretrain/ddep'
  for step in (3, 7):
    fileio.write_json(f'{workdir}/checkpoints/{step}/meta/metadata', {'step': step})
  fileio.makedirs(f'{workdir}/checkpoints/9.orbax-checkpoint-tmp-1')  # An unfinished save.
  fileio.makedirs(f'{workdir}/checkpoints/11/state')  # No meta: not a complete checkpoint.
  ckpt_dir = f'{workdir}/checkpoints'
  assert checkpoints._resolve_checkpoint(workdir, None) == (ckpt_dir, 7)
  assert checkpoints._resolve_checkpoint(workdir + '/', 3) == (ckpt_dir, 3)
  assert checkpoints._resolve_checkpoint(ckpt_dir, None) == (ckpt_dir, 7)
  assert checkpoints._resolve_checkpoint(f'{ckpt_dir}/3', None) == (ckpt_dir, 3)
  try:
    checkpoints._resolve_checkpoint(workdir, 5)
  except FileNotFoundError as e:
    assert str(e) == f'No checkpoint for step 5 in {ckpt_dir}; available steps: [3, 7].'
  else:
    raise AssertionError('no error')
  try:
    checkpoints._resolve_checkpoint(f'ram://{tmp_path.name}/pretrain/dep', None)
  except FileNotFoundError as e:
    assert f"No Orbax checkpoint found at 'ram://{tmp_path.name}/pretrain/dep'" in str(e)
  else:
    raise AssertionError('no error')


def test_npz_split_files_config_and_results_on_a_remote_workdir(tmp_path, monkeypatch):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddep_jax import evaluate  # pylint: disable=g-import-not-at-top
  from ddep_jax import train  # pylint: disable=g-import-not-at-top
  from ddep_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from ddep_jax.data import subsets  # pylint: disable=g-import-not-at-top
  from ddep_jax.models import pretrained  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  root = f'ram://{tmp_path.name}'

  npz = f'{root}/vit/R50+ViT-B_16.npz'
  buffer = io.BytesIO()
  np.savez(buffer, **{'Transformer/encoder_norm/scale': np.arange(3, dtype=np.float32)})
  fileio.write_bytes(npz, buffer.getvalue())
  tree = pretrained.read_npz(npz)
  np.testing.assert_array_equal(tree['Transformer']['encoder_norm']['scale'], [0.0, 1.0, 2.0])

  split = f'{root}/run/{input_pipeline.SUBSET_IDS_FILENAME}'
  subsets.write_split_file(split, ['b_2', 'a_1'])
  assert fileio.read_text(split) == 'a_1\nb_2\n'
  assert subsets.read_split_file(split) == ['a_1', 'b_2']

  config = ml_collections.ConfigDict({'lr': 1e-4, 'input': {'batch_size': 16}})
  train._save_config(config, f'{root}/run')
  assert fileio.read_json(f'{root}/run/config.json') == {'lr': 1e-4, 'input': {'batch_size': 16}}

  path = evaluate.write_results(f'{root}/run', 'val', {'mIoU': 0.25}, step=10, final=True)
  assert path == f'{root}/run/results/val.json'
  assert fileio.read_json(path) == {'mIoU': 0.25, 'step': 10, 'final': True, 'eval_name': 'val'}
  assert not fileio.exists(path + '.tmp')
  # Only process 0 writes shared files.
  monkeypatch.setattr(jax_module(), 'process_index', lambda: 1)
  train._save_config(ml_collections.ConfigDict({'lr': 0.5}), f'{root}/run')
  evaluate.write_results(f'{root}/run', 'val', {'mIoU': 0.5}, step=20, final=True)
  assert fileio.read_json(f'{root}/run/config.json')['lr'] == 1e-4
  assert fileio.read_json(path)['mIoU'] == 0.25


def jax_module():
  import jax  # pylint: disable=g-import-not-at-top
  return jax


# -- the same on gs://, against a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py) -------------

def test_gs_paths_and_checkpoints_on_a_gcs_emulator():
  import sys  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import gcs_emulator  # pylint: disable=g-import-not-at-top
  from ddep_jax import checkpoints  # pylint: disable=g-import-not-at-top
  with gcs_emulator.running() as environment, gcs_emulator.patched_environ(environment):
    root = f'gs://{gcs_emulator.BUCKET}/fileio'
    fileio.write_json(fileio.join(root, 'x', 'results', 'val.json'), {'final': True})
    fileio.write_bytes(f'{root}/x/blob', b'\x00\x01')
    assert fileio.glob(f'{root}/x/results/*') == [f'{root}/x/results/val.json']
    assert fileio.glob(f'{root}/*') == [f'{root}/x']
    assert fileio.listdir(f'{root}/x') == ['blob', 'results']
    assert fileio.read_json(f'{root}/x/results/val.json') == {'final': True}
    assert fileio.read_bytes(f'{root}/x/blob') == b'\x00\x01'
    assert fileio.isdir(f'{root}/x') and not fileio.exists(f'{root}/y')
    # Written directly under its name: a GCS upload is atomic, a rename is not.
    assert not fileio.exists(f'{root}/x/results/val.json.tmp')

    workdir = f'{root}/run'
    ckpt = checkpoints.Checkpointer(workdir)
    state = {'params': {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}}
    for step in (1, 2):
      ckpt.save(step, state, {'step': step}, force=True)
      ckpt.wait()
    ckpt.close()
    checkpoints.verify_checkpoint(f'{workdir}/checkpoints/2')  # TensorStore on the emulator.
    assert checkpoints._resolve_checkpoint(workdir, None) == (f'{workdir}/checkpoints', 2)
    params, step = checkpoints.load_params(workdir, 1)
    assert step == 1
    np.testing.assert_array_equal(params['w'], state['params']['w'])
  assert not os.path.exists('gs:')
