"""Tests of experiments.hyper: the building blocks and the paper's sweep patterns."""

import collections

import pytest

from experiments import hyper
from experiments import sweep

U = hyper.Untagged


# -- building blocks ------------------------------------------------------------------------------

def test_sweep_and_fixed():
  assert hyper.sweep('config.lr', [1e-4, 3e-4]) == [{'config.lr': 1e-4}, {'config.lr': 3e-4}]
  assert hyper.sweep('arg.init', ['ddep'], tag=False) == [{'arg.init': U('ddep')}]
  assert hyper.fixed('config.total_steps', 100, length=2) == [
      {'config.total_steps': U(100)}, {'config.total_steps': U(100)}]


def test_product_varies_the_last_sweep_fastest():
  runs = hyper.product([hyper.sweep('arg.init', ['a', 'b']), hyper.sweep('config.lr', [1, 2]),
                        hyper.fixed('config.seed', 0)])
  assert runs == [
      {'arg.init': 'a', 'config.lr': 1, 'config.seed': U(0)},
      {'arg.init': 'a', 'config.lr': 2, 'config.seed': U(0)},
      {'arg.init': 'b', 'config.lr': 1, 'config.seed': U(0)},
      {'arg.init': 'b', 'config.lr': 2, 'config.seed': U(0)},
  ]


def test_zipit_and_chainit():
  zipped = hyper.zipit([hyper.sweep('config.lr', [1, 2]), hyper.sweep('config.wd', [3, 4])])
  assert zipped == [{'config.lr': 1, 'config.wd': 3}, {'config.lr': 2, 'config.wd': 4}]
  chained = hyper.chainit([hyper.sweep('config.lr', [1]), hyper.sweep('config.wd', [5, 6])])
  assert chained == [{'config.lr': 1}, {'config.wd': 5}, {'config.wd': 6}]


def test_repeats_tag_only_the_first_seed_key():
  assert hyper.repeats(2) == [
      {'config.input.subset_seed': 0, 'config.seed': U(0)},
      {'config.input.subset_seed': 1, 'config.seed': U(1)},
  ]


def test_label_efficiency_cityscapes_is_the_paper_protocol():
  runs = hyper.label_efficiency('cityscapes')
  per_count = collections.Counter(r['arg.label_count'] for r in runs)
  # §5.1: 10 runs at full and 1/30, 6 at 1/8, 4 at 1/4.
  assert per_count == {2975: 10, 744: 4, 372: 6, 100: 10}
  assert [r['config.input.subset_seed'] for r in runs if r['arg.label_count'] == 372] == [
      0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize('dataset', ['pascal_context', 'ade20k'])
def test_label_efficiency_fractions(dataset):
  runs = hyper.label_efficiency(dataset)
  per_fraction = collections.Counter(r['arg.label_fraction'] for r in runs)
  assert per_fraction == {1.0: 10, 0.2: 5, 0.1: 10, 0.05: 10, 0.01: 10}


def test_label_efficiency_subset_and_cap():
  runs = hyper.label_efficiency('pascal_context', labels=[1.0, 0.2], max_runs=3,
                                label_key='config.input.label_fraction')
  assert [(r['config.input.label_fraction'], r['config.input.subset_seed']) for r in runs] == [
      (1.0, 0), (1.0, 1), (1.0, 2), (0.2, 0), (0.2, 1), (0.2, 2)]


def test_lr_wd_grid_spans_the_paper_interval():
  grid = hyper.lr_wd_grid()
  assert len(grid) == 16
  values = {v for run in grid for v in run.values()}
  assert min(values) == 1e-5 and max(values) == 3e-4  # §5.1: [1e-5, 3e-4].


@pytest.mark.parametrize('call, message', [
    (lambda: hyper.sweep('lr', [1]), "Invalid sweep key 'lr'"),
    (lambda: hyper.sweep('config.', [1]), "Invalid sweep key 'config.'"),
    (lambda: hyper.sweep('arg.a.b', [1]), "Invalid sweep key 'arg.a.b'"),
    (lambda: hyper.sweep('config.lr', []), 'got no values'),
    (lambda: hyper.product([hyper.sweep('config.lr', [1]), hyper.sweep('config.lr', [2])]),
     "key 'config.lr' is set by two of its sweeps"),
    (lambda: hyper.zipit([hyper.sweep('config.lr', [1, 2]), hyper.sweep('config.wd', [1])]),
     r'equal length, got lengths \[2, 1\]'),
    (lambda: hyper.label_efficiency('voc'), "Unknown label-efficiency protocol 'voc'"),
    (lambda: hyper.label_efficiency('cityscapes', labels=[50]),
     r'labelled amounts \[50\] are not in the paper protocol \[2975, 744, 372, 100\]'),
])
def test_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call()


# -- the paper's sweeps, as the configs will write them -------------------------------------------

def cityscapes_fig6(h, arg=None):
  """Fig. 6: four initialisations with a 1x decoder, three with a 2x decoder."""
  del arg
  return h.chainit([
      h.product([h.sweep('arg.decoder_width', [1]),
                 h.sweep('arg.init', ['none', 'supervised', 'dep', 'ddep']),
                 h.label_efficiency('cityscapes'), h.lr_wd_grid()]),
      h.product([h.sweep('arg.decoder_width', [2]),
                 h.sweep('arg.init', ['none', 'supervised', 'ddep']),
                 h.label_efficiency('cityscapes'), h.lr_wd_grid()]),
  ])


def cityscapes_fig6_reordered(h, arg=None):
  """The same runs, with the sweeps and their values listed in another order."""
  del arg
  return h.chainit([
      h.product([h.lr_wd_grid(lrs=hyper.LEARNING_RATES[::-1]), h.label_efficiency('cityscapes'),
                 h.sweep('arg.init', ['supervised', 'ddep', 'none']),
                 h.sweep('arg.decoder_width', [2])]),
      h.product([h.sweep('arg.init', ['ddep', 'dep', 'supervised', 'none']),
                 h.lr_wd_grid(wds=hyper.WEIGHT_DECAYS[::-1]), h.label_efficiency('cityscapes'),
                 h.sweep('arg.decoder_width', [1])]),
  ])


def table1_predict_target(h, arg=None):
  """Table 1 (Cityscapes): DDeP pretrained to predict x or eps, then fine-tuned."""
  del arg
  return h.product([h.sweep('arg.predict_target', ['image', 'noise']),
                    h.label_efficiency('cityscapes'), h.lr_wd_grid()])


def pascal_context_table6(h, arg=None):
  """Table 6 / Fig. 1: three initialisations x decoder widths 1x and 3x."""
  del arg
  return h.product([h.sweep('arg.decoder_width', [1, 3]),
                    h.sweep('arg.init', ['none', 'supervised', 'ddep']),
                    h.label_efficiency('pascal_context'), h.lr_wd_grid()])


def ade20k_fig7(h, arg=None):
  del arg
  return h.product([h.sweep('arg.decoder_width', [1, 3]),
                    h.sweep('arg.init', ['none', 'supervised', 'ddep']),
                    h.label_efficiency('ade20k'), h.lr_wd_grid()])


def pascal_context_table4(h, arg=None):
  """Table 4: fixed gamma vs gamma ~ U(0.9, 0.95), 3x decoder, 100 / 20 / 10 %."""
  del arg
  return h.product([h.fixed('arg.decoder_width', 3),
                    h.sweep('arg.noise', ['fixed', 'uniform']),
                    h.label_efficiency('pascal_context', labels=[1.0, 0.2, 0.1]), h.lr_wd_grid()])


def pascal_context_table7(h, arg=None):
  """Table 7: ResNet-50 U-Net, three initialisations."""
  del arg
  return h.product([h.sweep('arg.init', ['none', 'supervised', 'ddep']),
                    h.label_efficiency('pascal_context'), h.lr_wd_grid()])


@pytest.mark.parametrize('get_sweep, expected', [
    (cityscapes_fig6, 4 * (10 + 6 + 4 + 10) * 16 + 3 * (10 + 6 + 4 + 10) * 16),  # 3360
    (table1_predict_target, 2 * 30 * 16),  # 960
    (pascal_context_table6, 2 * 3 * (10 + 5 + 10 + 10 + 10) * 16),  # 4320
    (ade20k_fig7, 2 * 3 * 45 * 16),  # 4320
    (pascal_context_table4, 2 * (10 + 5 + 10) * 16),  # 800
    (pascal_context_table7, 3 * 45 * 16),  # 2160
])
def test_paper_sweeps_expand_to_the_paper_run_counts(get_sweep, expected):
  runs = sweep.expand('configs/x.py', None, get_sweep(hyper), '/w')
  assert len(runs) == expected
  assert len({r.name for r in runs}) == expected  # Every run has its own work directory.


def test_fig6_runs_per_cell():
  runs = sweep.expand('configs/x.py', None, cityscapes_fig6(hyper), '/w')
  cells = collections.Counter(
      (r.tags['decoder_width'], r.tags['init'], r.tags['label_count']) for r in runs)
  # Per (width, init, label count): the paper's repetitions x 16 grid points.
  assert cells[(1, 'dep', 100)] == 10 * 16
  assert cells[(1, 'dep', 372)] == 6 * 16
  assert cells[(2, 'ddep', 744)] == 4 * 16
  assert cells[(2, 'none', 2975)] == 10 * 16
  assert (2, 'dep', 100) not in cells
  assert len(cells) == 4 * 4 + 3 * 4
  assert {r.config_arg for r in runs if r.tags['label_count'] == 100 and r.tags['init'] == 'dep'
          } == {'decoder_width=1,init=dep,label_count=100'}


def test_names_do_not_depend_on_the_order_of_the_sweep():
  runs = sweep.expand('configs/x.py', None, cityscapes_fig6(hyper), '/w')
  reordered = sweep.expand('configs/x.py', None, cityscapes_fig6_reordered(hyper), '/w')
  assert [r.name for r in runs] != [r.name for r in reordered]  # Other order...
  by_name = {r.name: r for r in runs}
  assert by_name.keys() == {r.name for r in reordered}  # ... same names ...
  for r in reordered:  # ... for the same runs.
    assert (by_name[r.name].overrides, by_name[r.name].config_arg) == (r.overrides, r.config_arg)
