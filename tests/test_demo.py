"""`make demo` end to end at smoke size, and the demo's configs.

The module fixture runs the real command once (`python -m experiments.demo --smoke`): every stage
through the trainer, the fine-tuning sweep, the table and the plot. The tests then check what it
printed and wrote, against numbers recomputed here from the runs' own files.
"""

import csv
import io
import math
import os
import re
import subprocess
import sys
import types

import flax
import numpy as np
import pytest

from configs import paper
from ddep_jax import checkpoints
from ddep_jax import fileio
from ddep_jax import predict
from experiments import demo
from experiments import demo_diagnostics
from experiments import demo_figures
from experiments import demo_runs
from experiments import hyper
from experiments import sweep
import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
config_module = sweep.load_config_module(demo_runs.CONFIG_FILE)
SMOKE_ARG = 'stage=finetune,runlocal=True'
NUM_PRETRAIN = 3
NUM_SMOKE_FINETUNE = 4 * len(config_module.SMOKE_LABEL_FRACTIONS) * config_module.SMOKE_NUM_SUBSETS
NUM_RUNS = NUM_PRETRAIN + NUM_SMOKE_FINETUNE


def _run_demo(workdir, data_dir):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2')
  env['XLA_FLAGS'] = xla_flags.flags(None)  # One CPU device, as `make demo` runs.
  return subprocess.run(
      [sys.executable, '-m', 'experiments.demo', f'--workdir={workdir}', '--smoke',
       f'--data_dir={data_dir}'], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=900, check=False)


@pytest.fixture(scope='module')
def smoke(tmp_path_factory, digit_scenes_dir):
  workdir = str(tmp_path_factory.mktemp('demo'))
  result = _run_demo(workdir, digit_scenes_dir)
  assert result.returncode == 0, result.stderr[-5000:]
  return types.SimpleNamespace(workdir=workdir, data_dir=digit_scenes_dir,
                               stdout=result.stdout, stderr=result.stderr)


def _flat(params):
  return {'/'.join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


def _params(workdir, step=None):
  return _flat(checkpoints.load_params(workdir, step)[0])


def _part(flat, prefix):
  return {k: v for k, v in flat.items() if k.startswith(prefix + '/')}


def _max_abs_diff(a, b):
  assert sorted(a) == sorted(b)
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _finetune_dir(smoke, init, fraction, subset_seed):
  name = f'init={init}-label_fraction={fraction!r}-subset_seed={subset_seed}'
  return os.path.join(smoke.workdir, 'finetune', name)


def _run_mious(smoke):
  """{(init, fraction): [mIoU x 100 per subset]} read from the runs' results/val.json."""
  by_cell = {}
  for init in paper.INITS:
    for fraction in config_module.SMOKE_LABEL_FRACTIONS:
      for seed in range(config_module.SMOKE_NUM_SUBSETS):
        results = fileio.read_json(
            os.path.join(_finetune_dir(smoke, init, fraction, seed), 'results', 'val.json'))
        assert results['final'] is True
        by_cell.setdefault((init, fraction), []).append(100 * results['mIoU'])
  return by_cell


# -- the printed progress and the outputs -------------------------------------------------------

def test_prints_one_line_per_run_with_its_metric_and_time(smoke):
  done = re.findall(r'^\[\s*(\d+)/(\d+)\] (.+): (mIoU|top-1|denoising loss) ([0-9.]+).*'
                    r'\((\d+) s; [0-9:]+ so far, ETA \d+:\d\d:\d\d\)$', smoke.stdout,
                    re.MULTILINE)
  # Two processes share the runs, so lines may come out of order; each run has exactly one.
  done = sorted(done, key=lambda line: int(line[0]))
  assert [int(i) for i, *_ in done] == list(range(1, NUM_RUNS + 1))
  assert {int(n) for _, n, *_ in done} == {NUM_RUNS}
  metrics = [m for *_, m, _, _ in done]
  assert metrics == ['top-1', 'denoising loss', 'denoising loss'] + ['mIoU'] * NUM_SMOKE_FINETUNE
  # Each fine-tuning line's mIoU is that run's final result.
  mious = _run_mious(smoke)
  printed = sorted(float(v) for _, _, _, m, v, _ in done if m == 'mIoU')
  assert printed == pytest.approx(sorted(round(x, 2) for v in mious.values() for x in v),
                                  abs=0.006)
  # The trainer's own log lines come through; parameter tables and Orbax chatter do not.
  assert 'Initialised from' in smoke.stderr and 'Eval val at step' in smoke.stderr
  assert 'Parameters' not in smoke.stderr and 'orbax' not in smoke.stderr.lower()


def test_table_is_the_mean_and_std_of_the_runs(smoke):
  with open(os.path.join(smoke.workdir, 'results.md'), encoding='utf-8') as f:
    markdown = f.read()
  assert markdown in smoke.stdout  # Printed as written.
  lines = [line for line in markdown.splitlines() if line.startswith('|')]
  fractions = sorted(config_module.SMOKE_LABEL_FRACTIONS, reverse=True)
  assert lines[0] == '| init | ' + ' | '.join(f'{100 * f:g}%' for f in fractions) + ' |'
  rows = [line.strip('|').split('|') for line in lines[2:]]
  assert [r[0].strip() for r in rows] == ['none', 'supervised', 'dep', 'ddep']
  mious = _run_mious(smoke)
  for row in rows:
    for fraction, cell in zip(fractions, row[1:]):
      mean, std, n = re.fullmatch(r' ([0-9.]+) ± ([0-9.]+) \((\d+)\) ', cell).groups()
      values = mious[(row[0].strip(), fraction)]
      assert int(n) == config_module.SMOKE_NUM_SUBSETS
      assert float(mean) == pytest.approx(np.mean(values), abs=0.006)
      assert float(std) == pytest.approx(np.std(values, ddof=1), abs=0.006)
  with open(os.path.join(smoke.workdir, 'results.csv'), encoding='utf-8') as f:
    cells = list(csv.DictReader(io.StringIO(f.read())))
  assert len(cells) == 4 * len(fractions)
  for cell in cells:
    values = mious[(cell['init'], float(cell['label_fraction']))]
    assert math.isfinite(float(cell['mean'])) and math.isfinite(float(cell['std']))
    assert float(cell['mean']) == pytest.approx(np.mean(values), rel=1e-9)


def test_plot_is_written(smoke):
  from matplotlib import image as mpl_image  # pylint: disable=g-import-not-at-top
  path = os.path.join(smoke.workdir, 'label_efficiency.png')
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  pixels = mpl_image.imread(path)
  assert pixels.ndim == 3 and min(pixels.shape[:2]) > 300
  assert np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 10  # Not blank.


def test_prediction_grid_shows_each_runs_own_prediction(smoke):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = os.path.join(smoke.workdir, 'predictions.png')
  assert f'{path}.' in smoke.stdout
  with Image.open(path) as picture:
    pixels = np.asarray(picture.convert('RGB'))
  # Rows: the smoke run's scenes; columns: scene, truth, then 4 inits per label fraction.
  rows, cols = demo_figures.SMOKE_NUM_SCENES, 2 + 4 * len(config_module.SMOKE_LABEL_FRACTIONS)
  cell, gap = 32 * demo_figures.SCALE, demo_figures.GAP
  top = demo_figures.TITLE_PX + demo_figures.HEADER_PX
  assert pixels.shape == (top + rows * cell + (rows - 1) * gap, cols * cell + (cols - 1) * gap, 3)
  scenes = tfds.as_numpy(tfds.load('ddep_digit_scenes/segmentation', split=f'validation[:{rows}]',
                                   batch_size=-1, data_dir=smoke.data_dir))
  row = rows - 1
  image, mask = scenes['image'][row], scenes['segmentation_mask'][row, ..., 0]

  def cell_at(col):
    y, x = top + row * (cell + gap), col * (cell + gap)
    return pixels[y:y + cell, x:x + cell]

  def enlarged(array):
    return np.repeat(np.repeat(array, demo_figures.SCALE, 0), demo_figures.SCALE, 1)

  def coloured(labels):  # The palette, with background black.
    colours = predict.palette(11)[labels]
    colours[labels == 0] = 0
    return colours

  np.testing.assert_array_equal(cell_at(0), enlarged(image))
  np.testing.assert_array_equal(cell_at(1), enlarged(coloured(mask)))
  # The last column: DDeP at the highest fraction, from the first subset seed's run.
  run = _finetune_dir(smoke, 'ddep', max(config_module.SMOKE_LABEL_FRACTIONS),
                      config_module.SMOKE_SUBSET_SEEDS[0])
  config, params, _ = predict.load_run(run)
  np.testing.assert_array_equal(cell_at(cols - 1),
                                enlarged(coloured(predict.predict(params, config, image))))


def test_eta_weighs_the_remaining_work_by_the_pace_of_the_trained_runs():
  # 10 s for 100 examples and 30 s for 300: 0.1 s each; the skipped run took no time.
  done = [(100, 10.0), (500, None), (300, 30.0)]
  assert demo_runs.eta_seconds(done, [200, 50]) == pytest.approx(25.0)
  assert demo_runs.eta_seconds(done, []) == 0.0  # The lane's last run.
  assert demo_runs.clock(demo_runs.eta_seconds([(32, 1.0)], [32 * 600])) == '0:10:00'
  config = config_module.get_config('stage=finetune')
  assert demo_runs.work(config) == config.total_steps * config.input.batch_size == 300 * 16


def test_grid_puts_each_cell_enlarged_at_its_place():
  labels = np.array([[0, 1], [2, 10]])
  image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
  mask = demo_figures.colour_mask(labels, 11)
  cells = [[image, mask], [mask, image]]
  grid = demo_figures.compose_grid(cells, scale=3, gap=2)
  assert grid.shape == (2 * 6 + 2, 2 * 6 + 2, 3)
  colours = predict.palette(11)
  # Row 0, column 1: each label a 3x3 block of its palette colour; background black.
  for (i, j), label in np.ndenumerate(labels):
    block = grid[3 * i:3 * i + 3, 8 + 3 * j:8 + 3 * j + 3].reshape(-1, 3)
    assert (block == (0 if label == 0 else colours[label])).all()
  assert set(map(tuple, grid[:, 6:8].reshape(-1, 3))) == {(255, 255, 255)}  # The gap.
  # Row 1, column 1: the image, pixel (1, 0) at rows 11-13, columns 8-10.
  assert (grid[11:14, 8:11] == image[1, 0]).all()
  assert demo_figures.cell_origin(1, 1, (2, 2), scale=3, gap=2) == (8, 8)
  # Black is no class's colour: the background stands apart.
  assert not (colours[1:11] == 0).all(axis=-1).any()


def test_grid_columns_are_the_first_seeds_runs_by_fraction_then_table_order(tmp_path):
  runs = demo_runs.plan_runs(str(tmp_path), str(tmp_path / 'tfds'), smoke=False,
                             subset_seeds=(7, 3))
  columns = demo_figures.prediction_columns(runs, demo.ROW_ORDER)
  assert [(r.tags['label_fraction'], r.tags['init']) for r in columns] == [
      (f, i) for f in (0.01, 0.05) for i in ('none', 'supervised', 'dep', 'ddep')]
  assert {r.tags['subset_seed'] for r in columns} == {7}
  assert [demo_figures.header(r) for r in columns[:4]] == [
      '1 % · No pretrain.', '1 % · Supervised', '1 % · DeP', '1 % · DDeP']


# -- what each stage started from -----------------------------------------------------------------

def test_ddep_encoder_is_the_frozen_supervised_encoder_and_its_decoder_trains(smoke):
  supervised = _params(os.path.join(smoke.workdir, 'pretrain', 'supervised'))
  ddep_dir = os.path.join(smoke.workdir, 'pretrain', 'ddep')
  first, last = _params(ddep_dir, 1), _params(ddep_dir)
  encoder = _part(supervised, 'encoder')
  for ddep in (first, last):
    assert sorted(_part(ddep, 'encoder')) == sorted(encoder)
    for key, value in encoder.items():
      np.testing.assert_array_equal(_part(ddep, 'encoder')[key], value, err_msg=key)
  assert _max_abs_diff(_part(first, 'decoder'), _part(last, 'decoder')) > 0
  assert re.search(r'DDeP encoder vs supervised encoder: (\d+) of \1 arrays bitwise equal '
                   r'\(frozen\)', smoke.stdout)


@pytest.mark.parametrize('init', ['supervised', 'dep', 'ddep'])
def test_finetuning_starts_from_its_pretrained_parameters(smoke, init):
  # Subset seed 1: its fresh initialisation (seed 1) differs from the pretraining runs' (seed 0).
  config = config_module.get_config(f'{SMOKE_ARG},init={init},subset_seed=1')
  assert config.optimizer.name == 'adam' and config.wd == 0 and not config.grad_clip_norm
  # An Adam step moves a parameter by at most lr x its schedule factor (x 1.0014 at step 2,
  # where |m_hat| / sqrt(v_hat) <= 1.0014 by Cauchy-Schwarz): the fine-tuned parameters stay
  # within `bound` of their starting point.
  bound = 1.01 * config.lr * config.total_steps
  fraction = config_module.SMOKE_LABEL_FRACTIONS[0]
  tuned = _params(_finetune_dir(smoke, init, fraction, 1))
  fresh = _params(_finetune_dir(smoke, 'none', fraction, 1))
  pretrained = _params(os.path.join(smoke.workdir, 'pretrain', init))
  carried = ('encoder',) if init == 'supervised' else ('encoder', 'decoder')
  for part in carried:
    assert _max_abs_diff(_part(tuned, part), _part(pretrained, part)) <= bound
    # A run started from scratch ends up far from the pretrained parameters: the bound tells
    # the two apart.
    assert _max_abs_diff(_part(fresh, part), _part(pretrained, part)) > 10 * bound
  if init == 'supervised':  # The supervised run has no decoder to carry.
    ddep_decoder = _part(_params(os.path.join(smoke.workdir, 'pretrain', 'ddep')), 'decoder')
    assert _max_abs_diff(_part(tuned, 'decoder'), ddep_decoder) > 10 * bound


def test_rerun_skips_finished_runs(smoke):
  checkpoint_dir = os.path.join(
      _finetune_dir(smoke, 'ddep', config_module.SMOKE_LABEL_FRACTIONS[0], 0), 'checkpoints')
  mtimes = lambda: {d: os.path.getmtime(os.path.join(checkpoint_dir, d))
                    for d in os.listdir(checkpoint_dir)}
  before = mtimes()
  result = _run_demo(smoke.workdir, smoke.data_dir)
  assert result.returncode == 0, result.stderr[-5000:]
  assert len(re.findall(r': finished earlier, ', result.stdout)) == NUM_RUNS
  assert ' ... \n' not in result.stdout  # No run started.
  assert mtimes() == before


def test_a_different_config_in_the_same_workdir_is_refused(smoke):
  full_runs = demo_runs.plan_runs(smoke.workdir, smoke.data_dir, smoke=False)
  run = full_runs[0]  # pretrain/supervised, which the smoke run wrote with another config.
  with pytest.raises(ValueError, match=r'different config \(differs in .*total_steps'):
    demo_runs.check_same_config(run, demo_runs.run_config(run))


# -- experiments/demo_diagnostics.py --------------------------------------------------------------

def test_diagnostic_scores_separate_where_from_which_digit():
  masks = np.array([[[0, 1], [2, 0]]])  # Background, digit 0 (class 1), digit 1 (class 2).
  perfect = np.eye(3)[masks]
  assert demo_diagnostics.scores(perfect, masks) == {'mIoU': 100.0, 'fgIoU': 100.0,
                                                      'identity': 100.0}
  # Background wins everywhere, but the right digit is the runner-up on each digit pixel.
  background_first = perfect + np.array([2.0, 0.0, 0.0])
  assert demo_diagnostics.scores(background_first, masks) == pytest.approx(
      {'mIoU': 100 * 0.5 / 3, 'fgIoU': 0.0, 'identity': 100.0})
  swapped = np.eye(3)[np.array([[[0, 2], [1, 0]]])]  # Digits found, identities swapped.
  assert demo_diagnostics.scores(swapped, masks) == pytest.approx(
      {'mIoU': 100 / 3, 'fgIoU': 100.0, 'identity': 0.0})


def test_diagnostics_run_on_a_finished_demo(smoke):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2')
  env['XLA_FLAGS'] = xla_flags.flags(None)
  result = subprocess.run(
      [sys.executable, os.path.join('experiments', 'demo_diagnostics.py'),
       f'--demo_dir={smoke.workdir}', f'--data_dir={smoke.data_dir}', '--inits=none,ddep',
       '--steps=2', '--eval_every=1', '--probe_steps=2', '--num_labelled=8',
       '--val_split=validation[:8]'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-5000:]
  number = r'(\d+\.\d)'
  for init in ('none', 'ddep'):
    probe = re.findall(rf'{init} probe \(frozen tokens\): mIoU +{number} fgIoU +{number} '
                       rf'identity +{number}', result.stdout)
    finetune = re.findall(rf'{init} finetune step +(\d+): loss (\d+\.\d+) mIoU +{number} '
                          rf'fgIoU +{number} identity +{number}', result.stdout)
    assert len(probe) == 1 and [row[0] for row in finetune] == ['1', '2'], result.stdout
    values = [float(v) for v in probe[0]] + [float(v) for row in finetune for v in row[2:]]
    assert all(0.0 <= v <= 100.0 for v in values)
    assert all(math.isfinite(float(row[1])) for row in finetune)


# -- the configs ----------------------------------------------------------------------------------

def test_full_sweep_has_every_method_fraction_and_subset_with_one_recipe():
  runs = config_module.get_sweep(hyper, 'stage=finetune')
  tags = {(r['arg.init'], r['arg.label_fraction'], r['arg.subset_seed']) for r in runs}
  assert len(runs) == len(tags) == 4 * 2 * 3
  assert {t[0] for t in tags} == {'none', 'supervised', 'dep', 'ddep'}
  # The low fractions, on subsets the design was not explored on (issue 19's protocol).
  assert {t[1] for t in tags} == {0.01, 0.05} and {t[2] for t in tags} == {100, 101, 102}
  assert not set(config_module.SUBSET_SEEDS) & set(config_module.EXPLORATION_SUBSET_SEEDS)
  # Only the initialisation, the labelled subset and the seed differ between fine-tuning runs.
  allowed = {'init_from.checkpoint', 'init_from.params', 'input.label_fraction',
             'input.subset_seed', 'seed'}
  reference = demo_runs.flat_config(demo_runs.config_json(
      config_module.get_config('stage=finetune,init=none')))
  for init, fraction, seed in tags:
    config = config_module.get_config(
        f'stage=finetune,init={init},label_fraction={fraction},subset_seed={seed}')
    flat = demo_runs.flat_config(demo_runs.config_json(config))
    assert {k for k in flat if flat[k] != reference[k]} <= allowed
    assert flat['input.subset_seed'] == flat['seed'] == seed
    assert flat['input.label_fraction'] == fraction


def test_stage_configs_follow_the_paper():
  ddep = config_module.get_config('stage=ddep,root=/r')
  assert ddep.task == 'denoise' and ddep.schedule[0] == ('encoder/.*', None)
  assert ddep.init_from.checkpoint == '/r/pretrain/supervised'
  assert tuple(ddep.init_from.params) == ('encoder/.*',)
  assert (ddep.denoising.noise_type, ddep.denoising.noise_std,
          ddep.denoising.predict_target) == ('scaled', 0.22, 'noise')
  dep = config_module.get_config('stage=dep,root=/r')
  assert [rule[1] is None for rule in dep.schedule] == [False] and not dep.init_from.checkpoint
  assert dep.total_steps == ddep.total_steps and dep.denoising == ddep.denoising
  assert config_module.get_config('stage=finetune,init=none').init_from.checkpoint == ''
  supervised = config_module.get_config('stage=finetune,init=supervised,root=/r')
  assert tuple(supervised.init_from.params) == ('encoder/.*',)
  assert config_module.get_config('stage=supervised').input.data_dir == 'workdirs/demo/tfds'


def test_gs_roots_stay_urls(tmp_path, monkeypatch):
  """A gs:// root or data_dir reaches every derived path as a URL (no cwd, no os.path)."""
  monkeypatch.chdir(tmp_path)
  assert demo.demo_dirs('gs://b/x', None) == ('gs://b/x', 'gs://b/x/tfds')
  assert demo.demo_dirs('gs://b/x', 'gs://b/data') == ('gs://b/x', 'gs://b/data')
  assert demo.demo_dirs('w', 'd') == (str(tmp_path / 'w'), str(tmp_path / 'd'))
  assert demo.demo_dirs('w', None) == (str(tmp_path / 'w'), str(tmp_path / 'w' / 'tfds'))
  ddep = config_module.get_config('stage=ddep,root=gs://b/x')
  assert ddep.input.data_dir == 'gs://b/x/tfds'
  assert ddep.init_from.checkpoint == 'gs://b/x/pretrain/supervised'
  finetune = config_module.get_config('stage=finetune,init=dep,root=gs://b/x')
  assert finetune.init_from.checkpoint == 'gs://b/x/pretrain/dep'
  runs = demo_runs.plan_runs('gs://b/x', 'gs://b/data', smoke=True)
  assert [r.workdir for r in runs[:3]] == [f'gs://b/x/pretrain/{s}'
                                           for s in ('supervised', 'ddep', 'dep')]
  assert all(r.workdir.startswith('gs://b/x/finetune/') for r in runs[3:])
  assert all(demo_runs.run_config(r).input.data_dir == 'gs://b/data' for r in runs)
  assert not os.path.exists(tmp_path / 'gs:')


def test_bad_arguments_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match=r"stage='pretrain': expected one of"):
    config_module.get_config('stage=pretrain')
  with pytest.raises(ValueError, match=r"init='imagenet': expected one of"):
    config_module.get_config('init=imagenet')
  with pytest.raises(ValueError, match=r'contains \',\'.*choose a path without'):
    demo_runs.plan_runs(str(tmp_path / 'a,b'), str(tmp_path / 'tfds'), smoke=True)


# -- other subset seeds (`--subset_seeds`) and the stride-4 model (`--config_arg=stride=4`) ------

def _finetune_plan(runs):
  return {(r.tags['init'], r.tags['label_fraction'], r.tags['subset_seed']): r
          for r in runs if r.sweep_run is not None}


def test_subset_seeds_plan_the_same_pretraining_and_runs_named_by_the_new_seeds(tmp_path):
  workdir, data_dir = str(tmp_path / 'demo'), str(tmp_path / 'tfds')
  default = demo_runs.plan_runs(workdir, data_dir, smoke=False)
  explored = demo_runs.plan_runs(workdir, data_dir, smoke=False, subset_seeds=(0, 1, 2))
  # The default plan: the held-out seeds 100-102, and no subset_seeds in any run's argument.
  assert {seed for *_, seed in _finetune_plan(default)} == {100, 101, 102}
  assert not any(item.startswith('subset_seeds=') for r in default
                 for item in r.config_arg.split(','))
  # The same three pretraining runs (same directories and configs: reused by a re-run) ...
  assert [r.workdir for r in explored[:3]] == [r.workdir for r in default[:3]]
  for new, old in zip(explored[:3], default[:3]):
    assert (demo_runs.config_json(demo_runs.run_config(new)) ==
            demo_runs.config_json(demo_runs.run_config(old)))
  # ... then every init x fraction x new seed, in a directory named by its seed.
  plan = _finetune_plan(explored)
  assert len(explored) == 3 + len(plan) == 3 + 4 * 2 * 3
  assert set(plan) == {(i, f, s) for i in paper.INITS for f in (0.01, 0.05) for s in (0, 1, 2)}
  for (init, fraction, seed), run in plan.items():
    assert os.path.basename(run.workdir) == (
        f'init={init}-label_fraction={fraction!r}-subset_seed={seed}')
    assert run.name == f'finetune/{os.path.basename(run.workdir)}'
    config = demo_runs.run_config(run)
    assert config.input.subset_seed == config.seed == seed
    assert config.input.label_fraction == fraction
    # Only the subset and the seed differ from the run of the same cell on a default seed.
    old = demo_runs.flat_config(demo_runs.config_json(demo_runs.run_config(
        _finetune_plan(default)[(init, fraction, seed + 100)])))
    new = demo_runs.flat_config(demo_runs.config_json(config))
    assert {k for k in new if new[k] != old[k]} == {'input.subset_seed', 'seed'}
  # A single seed, and the smoke plan.
  assert {k[2] for k in _finetune_plan(demo_runs.plan_runs(workdir, data_dir, smoke=True,
                                                      subset_seeds=(7,)))} == {7}


def test_subset_seeds_flag_and_output_names():
  assert demo.parse_subset_seeds(None, smoke=False) is None
  assert demo.parse_subset_seeds(['0', '1', '2'], smoke=False) == (0, 1, 2)
  # The config's default seeds are the default demo (same runs, same output files).
  assert demo.parse_subset_seeds(['100', '101', '102'], smoke=False) is None
  assert demo.parse_subset_seeds(['0', '1'], smoke=True) is None
  assert demo.parse_subset_seeds(['0', '1'], smoke=False) == (0, 1)
  with pytest.raises(ValueError, match=r'--subset_seeds=1,x: expected integers'):
    demo.parse_subset_seeds(['1', 'x'], smoke=False)
  with pytest.raises(ValueError, match='repeats a seed'):
    config_module.get_sweep(hyper, 'stage=finetune,subset_seeds=3+3')
  assert demo.output_suffix(None) == ''
  assert demo.output_suffix((100, 101, 102)) == '-subset_seeds=100_101_102'
  with pytest.raises(ValueError, match=r"--config_arg sets 'subset_seed'"):
    demo_runs.base_arg('/w', '/d', False, config_arg='stride=4,subset_seed=3')


def test_table_holds_only_the_planned_seeds(tmp_path):
  """Runs of other seeds in the same work directory stay out of the table."""
  workdir = str(tmp_path)
  runs = []
  for seeds in ((0, 1, 2), (100, 101, 102)):
    plan = demo_runs.plan_runs(workdir, str(tmp_path / 'tfds'), smoke=True,
                               subset_seeds=None if seeds == (0, 1, 2) else seeds)
    for run in plan[3:]:
      fileio.write_json(os.path.join(run.workdir, 'run.json'), run.sweep_run.run_json())
      fileio.write_json(os.path.join(run.workdir, 'results', 'val.json'),
                        {'mIoU': run.tags['subset_seed'] / 1000, 'final': True})
    runs.append(plan)
  held_out = demo.write_outputs(workdir, runs[1], (100, 101, 102))
  assert held_out.markdown_path == os.path.join(workdir, 'results-subset_seeds=100_101_102.md')
  assert os.path.exists(held_out.csv_path) and os.path.exists(held_out.plot_path)
  assert 'Labelled subsets (`subset_seed`): 100, 101, 102.' in held_out.markdown
  # mIoU x 100 = seed / 10: mean 10.1 over 100-102, and 3 runs (not 5 with smoke seeds 0, 1).
  assert '| 10.10 ± 0.10 (3) |' in held_out.markdown
  default = demo.write_outputs(workdir, runs[0])
  assert default.markdown_path == os.path.join(workdir, 'results.md')
  assert '| 0.05 ± 0.07 (2) |' in default.markdown


@pytest.mark.parametrize('stride,tokens,widths', [(16, 2, (64, 32, 32, 16, 16)),
                                                  (8, 4, (32, 32, 16, 16)),
                                                  (4, 8, (32, 16, 16))])
def test_stride_gives_the_token_map_and_decoder_of_the_model_family(stride, tokens, widths):
  import jax  # pylint: disable=g-import-not-at-top
  from ddep_jax import models  # pylint: disable=g-import-not-at-top
  arg = '' if stride == 16 else f',stride={stride}'
  configs = {stage: config_module.get_config(f'stage={stage}{arg}')
             for stage in config_module.STAGES}
  expected = models.get_config('tiny', output_stride=stride, dropout_rate=0.0,
                               classifier='none', decoder={'base_widths': widths,
                                                           'num_groups': 8})
  for config in configs.values():  # Every stage, so that checkpoints carry over.
    assert config.model == expected
  assert tuple(expected.decoder.base_widths) == widths
  model = models.build_model(expected, task='segment', num_classes=11)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                             images)
  out, aux = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert out.shape == (2, 32, 32, 11)
  assert aux['tokens'].shape == (2, tokens * tokens, expected.encoder.hidden_size)
  with pytest.raises(ValueError, match=r'stride=2: expected one of \(16, 8, 4\)'):
    config_module.get_config('stride=2')


def test_foreground_classes_are_the_digit_masks_as_one_class(digit_scenes_dir):
  config = config_module.get_config(
      f'stage=finetune,classes=foreground,init=ddep,data_dir={digit_scenes_dir}')
  assert config.num_classes == 2 and config.class_weights == (0.1, 1.0)
  assert config.input.dataset == config.evals.val.dataset == 'digit_scenes_foreground'
  # Everything else is the default (digits) run's recipe.
  digits = demo_runs.flat_config(demo_runs.config_json(config_module.get_config(
      f'stage=finetune,init=ddep,data_dir={digit_scenes_dir}')))
  differ = {k for k, v in demo_runs.flat_config(demo_runs.config_json(config)).items()
            if digits[k] != v}
  assert differ == {'num_classes', 'class_weights', 'input.dataset', 'evals.val.dataset'}
  # The same scenes, read through the real reader: the masks' digits become class 1.
  images, masks = demo_figures.read_scenes(digit_scenes_dir, 8)
  fg_images, fg_masks = demo_figures.read_scenes(digit_scenes_dir, 8, 'digit_scenes_foreground')
  np.testing.assert_array_equal(fg_images, images)
  assert masks.max() > 1  # Digits other than 0 are in these scenes.
  np.testing.assert_array_equal(fg_masks, (masks > 0).astype(np.int32))
  with pytest.raises(ValueError, match='classes='):
    config_module.get_config('stage=finetune,classes=letters')
