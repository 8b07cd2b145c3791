"""Batch sizes against the device count of a pod slice (issue #16).

Every paper config states in its docstring the slices it runs on as is; the trainer refuses,
before any step, a global train or eval batch that the devices cannot split, and names the
overrides that fit. The runlocal twin of every paper config is checked on 16 simulated devices
(the device count of v4-32, v5litepod-16 and v5p-32) in a subprocess, since the test session has 8.
"""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest

from ddep_jax import sharding
import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAPER_CONFIGS = {  # name -> (argument, train batch, eval batch)
    'supervised_imagenet21k': ('', 4096, 1024),
    'ddep_pretrain': ('', 512, 256),
    'cityscapes': ('init=none', 8, 16),
    'pascal_context': ('init=none', 16, 16),
    'ade20k': ('init=none', 16, 16),
}


def _config(name, arg):
  return importlib.import_module(f'configs.{name}').get_config(arg or None)


@pytest.mark.parametrize('name', sorted(PAPER_CONFIGS))
def test_paper_configs_state_and_fit_their_slices(name):
  arg, batch, eval_batch = PAPER_CONFIGS[name]
  config = _config(name, arg)
  assert (config.input.batch_size, config.evals.val.batch_size) == (batch, eval_batch)
  doc = importlib.import_module(f'configs.{name}').__doc__
  assert 'Slices' in doc and 'v5p-32' in doc and 'v5litepod-16' in doc
  # v4-32, v5litepod-16, v5p-32: 16 devices on 4 hosts.
  if name == 'cityscapes':
    with pytest.raises(ValueError) as e:
      sharding.check_batch_sizes(config, 16, 4, where='v4-32')
    assert str(e.value).startswith(
        'config.input.batch_size=8: every global batch must be a multiple of the 16 devices of '
        'v4-32 (4 processes). Pass --config.input.batch_size=16.')
    sharding.check_batch_sizes(config, 8, 2)  # v4-16 / v5p-16: as is.
  else:
    sharding.check_batch_sizes(config, 16, 4)
  if batch == 16:
    with pytest.raises(ValueError, match=r'Pass --config.input.batch_size=32 '
                       r'--config.evals.val.batch_size=32\. A larger train batch'):
      sharding.check_batch_sizes(config, 32, 8)


def test_eval_only_check_and_the_eval_override():
  config = _config('cityscapes', 'init=none,runlocal=True')
  with pytest.raises(ValueError, match=r'^config.evals.val.batch_size=8: .* Pass '
                     r'--config.evals.val.batch_size=16\. The eval batch size does not change'):
    sharding.check_batch_sizes(config, 16, 4, include_train=False)
  with pytest.raises(ValueError, match='cannot be split evenly over 3 processes'):
    sharding.check_batch_sizes(config, 16, 3)


# Runs with 16 simulated devices: for each runlocal twin the check refuses batch 8 and names the
# overrides; with them the mesh and the parameter shardings (through jax.eval_shape, no compile:
# initialising on 16 CPU devices costs a minute per model) are built.
_SIXTEEN = textwrap.dedent("""\
    import importlib, re
    import jax
    from ddep_jax import initialization, sharding, train_step
    from ddep_jax.data import input_pipeline
    assert jax.device_count() == 16
    for name, arg in %r:
      config = importlib.import_module('configs.' + name).get_config(arg + 'runlocal=True')
      try:
        sharding.check_batch_sizes(config, jax.device_count(), 4)
        raise SystemExit(name + ': batch 8 was not refused on 16 devices')
      except ValueError as e:
        overrides = re.findall(r'--config\\.([\\w.]+)=(\\d+)', str(e))
      assert overrides == [('input.batch_size', '16'), ('evals.val.batch_size', '16')], overrides
      for key, value in overrides:
        node = config
        for part in key.split('.')[:-1]:
          node = node[part]
        node[key.split('.')[-1]] = int(value)
      sharding.check_batch_sizes(config, jax.device_count(), 4)
      assert input_pipeline.local_batch_size(config.input.batch_size, 4) == 4
      mesh = sharding.make_mesh(config)
      model = initialization.build_model_for(config)
      abstract = train_step.abstract_params(config, model, initialization.image_shape(config))
      shardings = sharding.param_shardings(abstract, mesh, config)
      assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(abstract)) > 10
      print('started', name, dict(mesh.shape))
    """)


def test_runlocal_twins_start_on_16_devices():
  configs = [(name, f'{arg},' if arg else '') for name, (arg, _, _) in PAPER_CONFIGS.items()]
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS=xla_flags.flags(16))
  result = subprocess.run([sys.executable, '-c', _SIXTEEN % (configs,)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines() == [f"started {name} {{'data': 16}}" for name, _ in configs]


def test_trainer_refuses_before_any_step(tmp_path):
  sys.path.insert(0, os.path.join(REPO, 'tests'))
  import tiny_config  # pylint: disable=g-import-not-at-top
  from ddep_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_config.get_config('task=denoise')
  with config.unlocked():
    config.input.batch_size = 12
  with pytest.raises(ValueError, match=r'^config.input.batch_size=12: every global batch must be '
                     r'a multiple of the 8 devices of this job \(1 process\)\. Pass '
                     r'--config.input.batch_size=16\.'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()
