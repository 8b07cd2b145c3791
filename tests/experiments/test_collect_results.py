"""Tests of experiments.collect_results and results_table against a table computed by hand."""

import csv
import io
import json
import math
import os
import subprocess
import sys

import pytest

from experiments import collect_results as cr
from experiments import results_table

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (init, label_fraction, lr, subset_seed, val mIoU); wd is 1e-5 everywhere.
SWEPT = [
    ('supervised', 1.0, 1e-4, 0, 0.60), ('supervised', 1.0, 1e-4, 1, 0.62),
    ('supervised', 1.0, 1e-4, 2, 0.64),
    ('supervised', 1.0, 3e-4, 0, 0.58), ('supervised', 1.0, 3e-4, 1, 0.59),
    ('supervised', 1.0, 3e-4, 2, 0.60),
    ('supervised', 0.1, 1e-4, 0, 0.30), ('supervised', 0.1, 1e-4, 1, 0.34),
    ('supervised', 0.1, 3e-4, 0, 0.40), ('supervised', 0.1, 3e-4, 1, 0.36),
    ('ddep', 1.0, 1e-4, 0, 0.70), ('ddep', 1.0, 1e-4, 1, 0.71), ('ddep', 1.0, 1e-4, 2, 0.72),
    ('ddep', 1.0, 1e-4, 3, 0.75),
    ('ddep', 0.1, 3e-4, 0, 0.50),
]
# Launched by hand: no run.json, the keys come from config.json.
BY_HAND = [('none', 1.0, 1e-4, 0, 0.20), ('none', 1.0, 1e-4, 1, 0.22)]

# By hand, from the values above (std with ddof=1):
#   supervised 100 %: lr 1e-4 (mean .62) beats 3e-4 (.59): 60, 62, 64 -> 62.00 ± 2.00
#   supervised  10 %: lr 3e-4 (mean .38) beats 1e-4 (.32): 40, 36 -> 38.00 ± sqrt(8) = 2.83
#   ddep       100 %: 70, 71, 72, 75 -> 72.00 ± sqrt((4 + 1 + 0 + 9) / 3) = 2.16
#   ddep        10 %: one run -> 50.00
#   none       100 %: 20, 22 -> 21.00 ± sqrt(2) = 1.41
TABLE = """\
| init | 100% | 10% |
|:--|--:|--:|
| none | 21.00 ± 1.41 (2) | – |
| supervised | 62.00 ± 2.00 (3) | 38.00 ± 2.83 (2) |
| ddep | 72.00 ± 2.16 (4) | 50.00 (1) |"""


def held_out_value(init, fraction, lr, val):
  """`test` results: val + 0.05, except runs that validation must not choose."""
  return 0.9 if (init, fraction, lr) == ('supervised', 0.1, 1e-4) else val + 0.05


def write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(obj, f)


def write_run(root, init, fraction, lr, seed, val, *, by_hand=False, final=True, metrics=None):
  workdir = os.path.join(root, f'{init}-{fraction}-{lr}-{seed}')
  if by_hand:
    write_json(os.path.join(workdir, 'config.json'), {
        'init': init, 'lr': lr, 'wd': 1e-5, 'seed': seed,
        'input': {'label_fraction': fraction, 'subset_seed': seed, 'crop_size': [512, 512]}})
  else:
    write_json(os.path.join(workdir, 'run.json'), {
        'name': os.path.basename(workdir), 'config_file': 'configs/pascal_context.py',
        'config_arg': f'init={init}', 'overrides': {},
        'tags': {'init': init, 'label_fraction': fraction, 'lr': lr, 'subset_seed': seed,
                 'wd': 1e-5}})
  for eval_name, value in (('val', val), ('test', held_out_value(init, fraction, lr, val))):
    results = metrics if metrics is not None else {
        'mIoU': value, 'mAcc': 0.0, 'aAcc': 0.0, 'per_class_iou': {}}
    write_json(os.path.join(workdir, 'results', f'{eval_name}.json'), dict(
        results, step=100, dataset='pascal_context', split=eval_name, final=final))
  return workdir


@pytest.fixture
def roots(tmp_path):
  swept, by_hand = str(tmp_path / 'sweep'), str(tmp_path / 'by_hand')
  for run in SWEPT:
    write_run(swept, *run)
  for run in BY_HAND:
    write_run(by_hand, *run, by_hand=True)
  os.makedirs(os.path.join(swept, 'logs'))  # Not a work directory: skipped.
  return swept, by_hand


def table_of(roots, **kwargs):
  records = results_table.load_records([os.path.join(r, '*') for r in roots])
  return results_table.aggregate(records, 'init', 'label_fraction', **kwargs)


def test_reproduces_the_hand_made_table(roots):
  table = table_of(roots, row_order=['none', 'supervised'])
  assert cr.to_markdown(table) == TABLE
  cell = table.cells[(('supervised',), 0.1)]
  assert cell.hparams == {'lr': 3e-4, 'wd': 1e-5}
  assert cell.values == pytest.approx((40.0, 36.0))
  assert (cell.mean, cell.std, cell.n) == (pytest.approx(38.0), pytest.approx(math.sqrt(8)), 2)
  assert cell.selection == pytest.approx(0.38)
  assert cell.workdirs == tuple(os.path.join(roots[0], f'supervised-0.1-0.0003-{s}')
                                for s in (0, 1))
  assert table.cells[(('ddep',), 1.0)].std == pytest.approx(math.sqrt(14 / 3))
  assert math.isnan(table.cells[(('ddep',), 0.1)].std)
  assert cr.hparams_markdown(table).splitlines()[2:] == [
      '| none | lr=0.0001, wd=1e-05 (0.21) | – |',
      '| supervised | lr=0.0001, wd=1e-05 (0.62) | lr=0.0003, wd=1e-05 (0.38) |',
      '| ddep | lr=0.0001, wd=1e-05 (0.72) | lr=0.0003, wd=1e-05 (0.5) |']
  assert cr.caption(table) == (
      'mIoU (×100) on `val`: mean ± std over `subset_seed` (number of runs); `lr`, `wd` chosen '
      'per cell by the best mean mIoU on `val`.')


def test_selects_on_validation_and_reports_another_eval(roots):
  table = table_of(roots, report_eval='test')
  # Validation still picks lr 3e-4 at 10 %, though its test numbers (90) would look better.
  assert cr.format_cell(table.cells[(('supervised',), 0.1)]) == '43.00 ± 2.83 (2)'
  assert cr.format_cell(table.cells[(('supervised',), 1.0)]) == '67.00 ± 2.00 (3)'
  # Rows sorted by name without row_order.
  assert table.rows == [('ddep',), ('none',), ('supervised',)]


def test_min_selection_and_where(roots):
  table = table_of(roots, select_mode='min', where={'init': 'supervised'})
  assert table.rows == [('supervised',)]
  assert table.cells[(('supervised',), 1.0)].hparams['lr'] == 3e-4
  assert cr.format_cell(table.cells[(('supervised',), 1.0)], precision=1) == '59.0 ± 1.0 (3)'
  only_lr = table_of(roots, where={'lr': '1e-4'})  # Numbers compare as numbers.
  assert cr.format_cell(only_lr.cells[(('supervised',), 0.1)]) == '32.00 ± 2.83 (2)'


def test_csv(roots):
  rows = list(csv.DictReader(io.StringIO(cr.to_csv(table_of(roots)))))
  assert list(rows[0]) == ['init', 'label_fraction', 'mean', 'std', 'n', 'lr', 'wd', 'val_mIoU',
                           'workdirs']
  assert [(r['init'], r['label_fraction'], r['n'], r['lr']) for r in rows] == [
      ('ddep', '1.0', '4', '0.0001'), ('ddep', '0.1', '1', '0.0003'),
      ('none', '1.0', '2', '0.0001'),
      ('supervised', '1.0', '3', '0.0001'), ('supervised', '0.1', '2', '0.0003')]
  assert [float(r['mean']) for r in rows] == pytest.approx([72, 50, 21, 62, 38])
  assert float(rows[4]['std']) == pytest.approx(math.sqrt(8))
  assert rows[1]['std'] == 'nan'
  assert rows[2]['workdirs'].split(';') == [os.path.join(roots[1], f'none-1.0-0.0001-{s}')
                                            for s in (0, 1)]


def test_plot_is_a_png(roots, tmp_path):
  path = str(tmp_path / 'plots' / 'pc.png')
  cr.plot_label_efficiency(table_of(roots), path, title='Pascal Context')
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:8] == b'\x89PNG\r\n\x1a\n' and data[12:16] == b'IHDR'
  # 5.5 x 4 inches at 150 dpi.
  assert (int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')) == (825, 600)


def test_plot_needs_numeric_columns(roots, tmp_path):
  table = results_table.aggregate(results_table.load_records([os.path.join(roots[0], '*')]),
                                  'label_fraction', 'init')
  with pytest.raises(ValueError, match="Column key 'init' has non-numeric values"):
    cr.plot_label_efficiency(table, str(tmp_path / 'x.png'))


def test_unfinished_runs_are_listed_or_skipped(roots):
  late = write_run(roots[0], 'ddep', 0.1, 3e-4, 1, 0.1, final=False)
  missing = os.path.join(roots[0], 'ddep-0.1-0.0003-2')
  write_json(os.path.join(missing, 'run.json'), {'tags': {
      'init': 'ddep', 'label_fraction': 0.1, 'lr': 3e-4, 'subset_seed': 2, 'wd': 1e-5}})
  with pytest.raises(ValueError) as error:
    table_of(roots)
  assert str(error.value) == (
      f'2 runs have no final val results:\n'
      f'  {late}: results/val.json is not final (step 100)\n'
      f'  {missing}: no results/val.json\n'
      'Wait for them to finish, restart them (python -m experiments.sweep skips finished runs), '
      'or leave them out with --skip_unfinished.')
  assert cr.to_markdown(table_of(roots, skip_unfinished=True, row_order=['none', 'supervised'])
                        ) == TABLE


def test_a_run_without_the_metric_is_an_error(roots):
  bad = write_run(roots[0], 'ddep', 0.1, 3e-4, 1, 0.0, metrics={'loss': 0.1, 'psnr': 20.0})
  with pytest.raises(ValueError, match=(
      rf"1 runs lack the metric:\n  {bad}: results/val.json has no 'mIoU' \(it has \['dataset', "
      r"'final', 'loss', 'psnr', 'split', 'step'\]\)")):
    table_of(roots)


def test_missing_keys_and_repeated_seeds_are_errors(roots):
  with pytest.raises(ValueError, match=(
      r"17 runs lack a key:\n  .*ddep-0.1-0.0003-0 has no tag or config key 'decoder_width' "
      r"\(tags: \['init', 'label_fraction', 'lr', 'subset_seed', 'wd'\]; no config.json\)")):
    results_table.aggregate(results_table.load_records([os.path.join(r, '*') for r in roots]),
                            ('init', 'decoder_width'), 'label_fraction')
  # Ignoring lr puts two runs with the same seed into one group.
  with pytest.raises(ValueError, match=(
      r"5 runs repeat a subset_seed within one cell and hyper-parameter setting:\n  "
      r"subset_seed=0 in .*supervised-0.1-0.0001-0 and .*supervised-0.1-0.0003-0")):
    table_of(roots, hparam_keys=['wd'])


def test_config_json_lookup():
  record = results_table.Record('/w', config={'input.label_fraction': 0.1,
                                              'evals.val.data_dir': 'a', 'input.data_dir': 'b',
                                              'lr': 1e-4})
  assert record.lookup('label_fraction') == 0.1
  assert record.lookup('config.lr') == 1e-4
  assert record.lookup('input.data_dir') == 'b'
  with pytest.raises(KeyError, match="'data_dir' is ambiguous in /w/config.json: it may be any "
                     r"of \['evals.val.data_dir', 'input.data_dir'\]"):
    record.lookup('data_dir')


def test_command_line(roots, tmp_path):
  out = tmp_path / 'tables'
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.collect_results',
       f'--workdirs={roots[0]}/*,{roots[1]}/*', f'--out={out}', '--name=pascal_context',
       '--where=wd=1e-5'],
      cwd=REPO_ROOT, capture_output=True, text=True, check=True)
  markdown = (out / 'pascal_context.md').read_text()
  assert markdown.startswith(
      'mIoU (×100) on `val`: mean ± std over `subset_seed` (number of runs); `lr`, `wd` chosen '
      'per cell by the best mean mIoU on `val`.\n\n| init | 100% | 10% |\n')
  assert '| supervised | 62.00 ± 2.00 (3) | 38.00 ± 2.83 (2) |' in markdown
  assert 'Chosen hyper-parameters' in markdown and markdown in result.stdout
  assert (out / 'pascal_context.csv').read_text().startswith('init,label_fraction,mean,')
  assert (out / 'pascal_context.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  missing = subprocess.run(
      [sys.executable, '-m', 'experiments.collect_results', f'--workdirs={tmp_path}/nope*',
       f'--out={out}'], cwd=REPO_ROOT, capture_output=True, text=True)
  assert missing.returncode != 0
  assert f"--workdirs pattern '{tmp_path}/nope*' matches no directory." in missing.stderr


def test_tables_go_to_a_remote_out_directory(roots, tmp_path):
  # `--out=gs://...`: the tables go through fileio (ram:// takes the same tf.io.gfile path as
  # gs://), and nothing lands in a local directory named after the URL.
  base = f'ram://{tmp_path.name}/tables/pascal_context'
  markdown = cr.write_tables(table_of(roots), base)
  from ddep_jax import fileio  # pylint: disable=g-import-not-at-top
  assert fileio.read_text(base + '.md') == markdown
  assert '| supervised | 62.00 ± 2.00 (3) | 38.00 ± 2.83 (2) |' in markdown
  assert fileio.read_text(base + '.csv').startswith('init,label_fraction,mean,')
  assert fileio.read_bytes(base + '.png')[:8] == b'\x89PNG\r\n\x1a\n'
  assert not os.path.exists('ram:') and not os.path.exists(os.path.join(REPO_ROOT, 'ram:'))
