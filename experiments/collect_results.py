r"""Paper-style result tables and label-efficiency plots from many work directories.

  python -m experiments.collect_results --workdirs='/tmp/sweeps/cityscapes/*' --out=/tmp/tables \
      --row_key=init,decoder_width --col_key=label_count [--seed_key=subset_seed] \
      [--hparam_keys=lr,wd] [--metric=mIoU] [--select_eval=val] [--where=decoder_width=1]

writes `<out>/<name>.md` (the table, then the hyper-parameters chosen per cell), `<out>/<name>.csv`
(one line per cell) and `<out>/<name>.png` (mean metric vs labelled amount, one line per row, error
bars = std; like Fig. 1, right, of the paper).

As in the paper (§5.1), for every (row, column) the hyper-parameter combination (`--hparam_keys`)
with the best mean `--select_metric` on the `--select_eval` results (validation by default) is
chosen, and the cell reports that combination's `--metric` on `--report_eval` (default: the same
eval) as mean ± std over its runs (the repetitions, `--seed_key`), with the number of runs.
Metrics are stored as fractions and multiplied by `--scale` (100: percent, as in the tables).

Each work directory contributes its tags (`run.json`, written by `experiments.sweep`) and its
`results/<eval>.json`; a run launched by hand has no `run.json`, so keys are looked up in its
`config.json` instead: a dotted key (`input.label_fraction`) or a unique last part of one
(`label_fraction`). Only final results (`"final": true`) count.

The same aggregation is a library for the demo and notebooks:

  records = collect_results.load_records(['workdirs/demo/finetune/*'])
  table = collect_results.aggregate(records, row_key='init', col_key='label_fraction')
  print(collect_results.to_markdown(table))
  collect_results.plot_label_efficiency(table, 'label_efficiency.png')
"""

import csv
import dataclasses
import io
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from ddep_jax import fileio

_MAX_LISTED = 20  # Work directories listed in an error before "... and N more".


@dataclasses.dataclass
class Record:
  """One run: its tags (run.json), flattened config.json and results by eval name."""
  workdir: str
  tags: dict[str, Any] = dataclasses.field(default_factory=dict)
  config: dict[str, Any] = dataclasses.field(default_factory=dict)
  results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

  def lookup(self, key: str) -> Any:
    """The value of `key`: a tag, else a dotted config key, else a unique config key suffix.

    Raises:
      KeyError: with a message that lists what this run does have.
    """
    if key in self.tags:
      return _hashable(self.tags[key])
    dotted = key[len('config.'):] if key.startswith('config.') else key
    if dotted in self.config:
      return _hashable(self.config[dotted])
    matches = [k for k in self.config if k.endswith('.' + dotted)]
    if len(matches) == 1:
      return _hashable(self.config[matches[0]])
    if matches:
      raise KeyError(f'{key!r} is ambiguous in {self.workdir}/config.json: it may be any of '
                     f'{sorted(matches)}; pass the full dotted key.')
    raise KeyError(f'{self.workdir} has no tag or config key {key!r} (tags: {sorted(self.tags)}'
                   f'{"; no run.json" if not self.tags else ""}'
                   f'{"; no config.json" if not self.config else ""}).')


@dataclasses.dataclass
class Cell:
  """The reported runs of one (row, column): those of the chosen hyper-parameters."""
  mean: float
  std: float
  n: int
  values: tuple[float, ...]  # Scaled metric of each run, in seed order.
  hparams: dict[str, Any]  # The chosen combination.
  selection: float  # Its mean selection metric (unscaled).
  workdirs: tuple[str, ...]


@dataclasses.dataclass
class Table:
  """Cells by (row, column) plus what was aggregated, for tables, CSV and plots."""
  row_keys: tuple[str, ...]
  col_key: str
  rows: list[tuple]
  cols: list[Any]
  cells: dict[tuple[tuple, Any], Cell]
  metric: str
  report_eval: str
  select_metric: str
  select_eval: str
  seed_key: str
  hparam_keys: tuple[str, ...]
  scale: float


# -- loading --------------------------------------------------------------------------------------

def _hashable(value: Any) -> Any:
  return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def load_record(workdir: str) -> Record | None:
  """Reads one work directory; None when it has neither run.json nor config.json."""
  run_json, config_json = fileio.join(workdir, 'run.json'), fileio.join(workdir, 'config.json')
  has_run, has_config = fileio.exists(run_json), fileio.exists(config_json)
  if not (has_run or has_config):
    return None
  results = {}
  for path in fileio.glob(fileio.join(workdir, 'results', '*.json')):
    results[os.path.splitext(path.rsplit('/', 1)[-1])[0]] = fileio.read_json(path)
  return Record(workdir=workdir,
                tags=dict(fileio.read_json(run_json).get('tags', {})) if has_run else {},
                config=_flatten(fileio.read_json(config_json)) if has_config else {},
                results=results)


def load_records(patterns: Iterable[str]) -> list[Record]:
  """Records of every directory matching the glob patterns (local or gs://).

  Raises:
    ValueError: a pattern matches nothing.
  """
  workdirs = []
  for pattern in patterns:
    matches = [p for p in fileio.glob(pattern) if fileio.isdir(p)]
    if not matches:
      raise ValueError(f'--workdirs pattern {pattern!r} matches no directory.')
    workdirs += [m for m in matches if m not in workdirs]
  records = []
  for workdir in workdirs:
    record = load_record(workdir)
    if record is None:
      logging.warning('Skipping %s: no run.json or config.json, not a work directory.', workdir)
    else:
      records.append(record)
  return records


# -- aggregation ----------------------------------------------------------------------------------

def _sort_key(value: Any):
  # Numbers before strings, each in natural order, so mixed columns still sort.
  if isinstance(value, tuple):
    return (2, tuple(_sort_key(v) for v in value))
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return (0, value)
  return (1, str(value))


def _matches(value: Any, wanted: Any) -> bool:
  if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(wanted, str):
    try:
      return float(wanted) == value
    except ValueError:
      return False
  return str(value) == str(wanted)


def _fail(problem: str, lines: Sequence[str], advice: str) -> None:
  if lines:
    listed = list(lines[:_MAX_LISTED])
    if len(lines) > _MAX_LISTED:
      listed.append(f'... and {len(lines) - _MAX_LISTED} more')
    raise ValueError(f'{len(lines)} {problem}:\n  ' + '\n  '.join(listed) + f'\n{advice}')


def _final_metric(record: Record, eval_name: str, metric: str, unfinished: list, missing: list):
  result = record.results.get(eval_name)
  if result is None or result.get('final') is not True:
    why = (f'no results/{eval_name}.json' if result is None else
           f'results/{eval_name}.json is not final (step {result.get("step")})')
    unfinished.append(f'{record.workdir}: {why}')
    return None
  if metric not in result:
    missing.append(f'{record.workdir}: results/{eval_name}.json has no {metric!r} '
                   f'(it has {sorted(result)})')
    return None
  return float(result[metric])


def aggregate(records: Sequence[Record], row_key: str | Sequence[str], col_key: str,
              seed_key: str = 'subset_seed', hparam_keys: Sequence[str] = ('lr', 'wd'),
              metric: str = 'mIoU', *, select_eval: str = 'val', report_eval: str | None = None,
              select_metric: str | None = None, select_mode: str = 'max', scale: float = 100.0,
              where: Mapping[str, Any] | None = None, skip_unfinished: bool = False,
              row_order: Sequence[Any] | None = None, ddof: int = 1) -> Table:
  """Builds the paper-style table: best hyper-parameters per cell, mean ± std over seeds.

  Args:
    records: runs, from `load_records` (or built by hand as `Record`s).
    row_key: the key(s) naming a row, e.g. 'init' or ('init', 'decoder_width').
    col_key: the key of the columns, e.g. 'label_fraction' or 'label_count'.
    seed_key: the key telling repetitions apart; never two runs with the same value per
      (row, column, hyper-parameters).
    hparam_keys: keys of the hyper-parameters chosen per cell.
    metric: the reported metric; `report_eval` (default `select_eval`) the eval reporting it.
    select_eval, select_metric, select_mode: the choice of hyper-parameters: best ('max' or
      'min') mean of `select_metric` (default `metric`) on `select_eval` (default 'val').
    scale: factor applied to reported values (100: fractions to percent).
    where: only runs whose `key` has this value (numbers compare numerically, so '1e-4' matches
      0.0001).
    skip_unfinished: leave out runs without final results instead of raising.
    row_order: rows in this order (values, or tuples of values for several row keys); rows not
      listed follow, sorted.
    ddof: delta degrees of freedom of the std (1: sample std; NaN for a single run).

  Returns:
    A `Table`.

  Raises:
    ValueError: listing runs that miss a key, final results or the metric, or that repeat a seed.
  """
  row_keys = (row_key,) if isinstance(row_key, str) else tuple(row_key)
  hparam_keys = tuple(hparam_keys)
  report_eval = report_eval or select_eval
  select_metric = select_metric or metric
  if select_mode not in ('max', 'min'):
    raise ValueError(f"select_mode must be 'max' or 'min', got {select_mode!r}.")

  missing_keys, unfinished, missing_metric, groups = [], [], [], {}
  for record in records:
    try:
      if where and not all(_matches(record.lookup(k), v) for k, v in where.items()):
        continue
      row = tuple(record.lookup(k) for k in row_keys)
      col = record.lookup(col_key)
      hparams = tuple(record.lookup(k) for k in hparam_keys)
      seed = record.lookup(seed_key)
    except KeyError as e:
      missing_keys.append(e.args[0])
      continue
    selected = _final_metric(record, select_eval, select_metric, unfinished, missing_metric)
    reported = (selected if (report_eval, metric) == (select_eval, select_metric) else
                _final_metric(record, report_eval, metric, unfinished, missing_metric))
    if selected is None or reported is None:
      continue
    groups.setdefault((row, col), {}).setdefault(hparams, []).append(
        (seed, selected, reported, record.workdir))

  _fail('runs lack a key', missing_keys, 'Pick keys that every run has (tags of run.json or '
        'dotted config.json keys), or filter runs with --where.')
  if not skip_unfinished:
    evals = select_eval if select_eval == report_eval else f'{select_eval} and {report_eval}'
    _fail(f'runs have no final {evals} results', sorted(set(unfinished)),
          'Wait for them to finish, restart them (python -m experiments.sweep skips finished '
          'runs), or leave them out with --skip_unfinished.')
  _fail('runs lack the metric', missing_metric, 'Choose --metric / --select_metric among the '
        'keys listed.')

  repeated = []
  for (row, col), by_hparams in groups.items():
    for hparams, runs in by_hparams.items():
      seen = {}
      for seed, _, _, workdir in runs:
        if seed in seen:
          repeated.append(f'{seed_key}={seed} in {seen[seed]} and {workdir}')
        seen[seed] = workdir
  _fail(f'runs repeat a {seed_key} within one cell and hyper-parameter setting', repeated,
        'These runs differ in a key that is neither a row, a column, a seed nor a '
        'hyper-parameter: add it to --row_key, or keep one value with --where.')

  worst = -math.inf if select_mode == 'max' else math.inf
  cells = {}
  for (row, col), by_hparams in groups.items():
    def score(hparams, by_hparams=by_hparams):
      mean = float(np.mean([selected for _, selected, _, _ in by_hparams[hparams]]))
      return worst if math.isnan(mean) else mean  # A diverged setting is never preferred.
    # Ties go to the first combination in sorted order, so the choice is reproducible.
    ordered = sorted(by_hparams, key=_sort_key)
    pick = max if select_mode == 'max' else min
    best = pick(ordered, key=score)
    runs = sorted(by_hparams[best], key=lambda r: _sort_key(r[0]))
    values = np.array([reported for _, _, reported, _ in runs]) * scale
    cells[(row, col)] = Cell(
        mean=float(values.mean()),
        std=float(values.std(ddof=ddof)) if len(values) > ddof else math.nan,
        n=len(values), values=tuple(float(v) for v in values),
        hparams=dict(zip(hparam_keys, best)), selection=score(best),
        workdirs=tuple(r[3] for r in runs))

  rows = sorted({row for row, _ in cells}, key=_sort_key)
  if row_order:
    wanted = [r if isinstance(r, tuple) else (r,) for r in row_order]
    rows = [r for r in wanted if r in rows] + [r for r in rows if r not in wanted]
  cols = sorted({col for _, col in cells}, key=_sort_key)
  if all(_sort_key(c)[0] == 0 for c in cols):
    cols.reverse()  # Numeric columns run from the most labels to the fewest, as in the paper.
  return Table(row_keys=row_keys, col_key=col_key, rows=rows, cols=cols, cells=cells,
               metric=metric, report_eval=report_eval, select_metric=select_metric,
               select_eval=select_eval, seed_key=seed_key, hparam_keys=hparam_keys, scale=scale)


# -- output ---------------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, tuple):
    return '+'.join(_fmt(v) for v in value)
  return str(value)


def _row_label(row: tuple) -> str:
  return ' / '.join(_fmt(v) for v in row)


def _col_label(table: Table, col: Any) -> str:
  # Label fractions read as percentages, as in the paper's tables and Fig. 1.
  if (table.col_key.endswith('fraction') and isinstance(col, (int, float))
      and all(_sort_key(c)[0] == 0 and c <= 1 for c in table.cols)):
    return f'{100 * col:g}%'
  return _fmt(col)


def format_cell(cell: Cell | None, precision: int = 2) -> str:
  """'mean ± std (n)', 'mean (1)' for a single run, '–' for an empty cell."""
  if cell is None:
    return '–'
  if math.isnan(cell.std):
    return f'{cell.mean:.{precision}f} ({cell.n})'
  return f'{cell.mean:.{precision}f} ± {cell.std:.{precision}f} ({cell.n})'


def _markdown_grid(table: Table, cell_text: Callable[[Cell | None], str]) -> str:
  """A Markdown table with a line per row and a column per column of `table`."""
  header = [' / '.join(table.row_keys)] + [_col_label(table, c) for c in table.cols]
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join([':--'] + ['--:'] * len(table.cols)) + '|']
  for row in table.rows:
    texts = [_row_label(row)] + [cell_text(table.cells.get((row, col))) for col in table.cols]
    lines.append('| ' + ' | '.join(texts) + ' |')
  return '\n'.join(lines)


def caption(table: Table) -> str:
  """One sentence saying what the cells are."""
  scaled = f' (×{table.scale:g})' if table.scale != 1 else ''
  chosen = ', '.join(f'`{k}`' for k in table.hparam_keys)
  selection = (f'{chosen} chosen per cell by the best mean {table.select_metric} on '
               f'`{table.select_eval}`' if chosen else 'one recipe, nothing chosen per cell')
  return (f'{table.metric}{scaled} on `{table.report_eval}`: mean ± std over `{table.seed_key}` '
          f'(number of runs); {selection}.')


def to_markdown(table: Table, precision: int = 2) -> str:
  """The table: rows = `row_keys` values, columns = `col_key` values, cells = mean ± std (n)."""
  return _markdown_grid(table, lambda cell: format_cell(cell, precision))


def hparams_markdown(table: Table) -> str:
  """The hyper-parameters chosen per cell, with their mean selection metric."""
  def text(cell):
    if cell is None:
      return '–'
    chosen = ', '.join(f'{k}={_fmt(v)}' for k, v in cell.hparams.items())
    return f'{chosen} ({cell.selection:.4g})'
  return _markdown_grid(table, text)


def to_csv(table: Table) -> str:
  """One line per cell: row keys, column, mean, std, n, chosen hyper-parameters, selection."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(list(table.row_keys) + [table.col_key, 'mean', 'std', 'n']
                  + list(table.hparam_keys)
                  + [f'{table.select_eval}_{table.select_metric}', 'workdirs'])
  for row in table.rows:
    for col in table.cols:
      cell = table.cells.get((row, col))
      if cell is not None:
        writer.writerow(list(row) + [col, repr(cell.mean), repr(cell.std), cell.n]
                        + list(cell.hparams.values())
                        + [repr(cell.selection), ';'.join(cell.workdirs)])
  return out.getvalue()


def plot_label_efficiency(table: Table, path: str, *, title: str | None = None,
                          log_x: bool = True) -> None:
  """Mean metric vs labelled amount, one line per row, error bars = std (PNG via Agg)."""
  # Figure + Agg canvas, not pyplot: no global backend state, safe in tests and on servers.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  if not all(_sort_key(c)[0] == 0 for c in table.cols):
    raise ValueError(f'Column key {table.col_key!r} has non-numeric values {table.cols}; a '
                     f'label-efficiency plot needs numbers (label fractions or counts).')
  figure = Figure(figsize=(5.5, 4.0))
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  for row in table.rows:
    points = sorted(((col, table.cells[(row, col)]) for col in table.cols
                     if (row, col) in table.cells), key=lambda point: point[0])
    axes.errorbar([x for x, _ in points], [c.mean for _, c in points],
                  yerr=[0.0 if math.isnan(c.std) else c.std for _, c in points],
                  marker='o', capsize=3, label=_row_label(row))
  if log_x and min(table.cols) > 0:
    axes.set_xscale('log')
  axes.set_xticks(sorted(table.cols))
  axes.set_xticklabels([_col_label(table, c) for c in sorted(table.cols)])
  axes.minorticks_off()
  axes.set_xlabel(table.col_key.replace('_', ' '))
  axes.set_ylabel(f'{table.metric}{" (%)" if table.scale == 100 else ""}')
  axes.set_title(title or f'{table.metric} on {table.report_eval}')
  axes.grid(alpha=0.3)
  axes.legend(title=' / '.join(table.row_keys))
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, dpi=150, format='png')
  fileio.write_bytes(path, buffer.getvalue())


def write_tables(table, base: str, *, precision: int = 2, plot: bool = True,
                 title: str | None = None) -> str:
  """Writes `<base>.md`, `<base>.csv` (and `<base>.png`), local or gs://; returns the Markdown."""
  markdown = (f'{caption(table)}\n\n{to_markdown(table, precision)}\n\n'
              f'Chosen hyper-parameters (mean {table.select_metric} on '
              f'`{table.select_eval}`):\n\n{hparams_markdown(table)}\n')
  fileio.write_text(base + '.md', markdown)
  fileio.write_text(base + '.csv', to_csv(table))
  if plot:
    plot_label_efficiency(table, base + '.png', title=title)
  return markdown


# -- command line ---------------------------------------------------------------------------------

def _define_flags() -> None:
  """Defines the flags; only when run as a program, so the module imports as a library."""
  flags.DEFINE_list('workdirs', None, 'Comma-separated globs of work directories (local or '
                    'gs://), e.g. "/tmp/sweeps/cityscapes/*".')
  flags.DEFINE_string('out', None, 'Directory (local or gs://) for <name>.md, <name>.csv and '
                      '<name>.png.')
  flags.DEFINE_string('name', 'results', 'Base name of the output files.')
  flags.DEFINE_list('row_key', ['init'], 'Key(s) of the rows, e.g. init,decoder_width.')
  flags.DEFINE_string('col_key', 'label_fraction', 'Key of the columns, e.g. label_count.')
  flags.DEFINE_string('seed_key', 'subset_seed', 'Key telling the repetitions of a cell apart.')
  flags.DEFINE_list('hparam_keys', ['lr', 'wd'], 'Hyper-parameters chosen per cell.')
  flags.DEFINE_string('metric', 'mIoU', 'Reported metric.')
  flags.DEFINE_string('select_eval', 'val', 'Eval whose results choose the hyper-parameters '
                      '(the paper: validation).')
  flags.DEFINE_string('report_eval', None, 'Eval reported (default: --select_eval).')
  flags.DEFINE_string('select_metric', None, 'Selection metric (default: --metric).')
  flags.DEFINE_enum('select_mode', 'max', ['max', 'min'], 'Best selection metric: max or min.')
  flags.DEFINE_float('scale', 100.0, 'Factor of the reported values (100: fractions to percent).')
  flags.DEFINE_multi_string('where', [], 'key=value: only runs with this value (repeatable).')
  flags.DEFINE_bool('skip_unfinished', False, 'Leave out runs without final results instead of '
                    'failing.')
  flags.DEFINE_integer('precision', 2, 'Decimals in the Markdown table.')
  flags.DEFINE_bool('plot', True, 'Also write the label-efficiency plot.')
  flags.DEFINE_string('title', None, 'Title of the plot.')


def main(argv: Sequence[str]) -> None:
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  where = {}
  for item in FLAGS.where:
    key, sep, value = item.partition('=')
    if not sep:
      raise app.UsageError(f'--where={item!r}: expected key=value.')
    where[key] = value
  records = load_records(FLAGS.workdirs)
  table = aggregate(records, FLAGS.row_key, FLAGS.col_key, FLAGS.seed_key, FLAGS.hparam_keys,
                    FLAGS.metric, select_eval=FLAGS.select_eval, report_eval=FLAGS.report_eval,
                    select_metric=FLAGS.select_metric, select_mode=FLAGS.select_mode,
                    scale=FLAGS.scale, where=where, skip_unfinished=FLAGS.skip_unfinished)
  if not records:
    raise app.UsageError(f'No work directory (with run.json or config.json) in --workdirs='
                         f'{",".join(FLAGS.workdirs)}.')
  if not table.cells:
    raise app.UsageError(f'None of the {len(records)} runs found is left to tabulate (filtered '
                         f'by --where={FLAGS.where}, or unfinished and skipped).')
  base = fileio.join(FLAGS.out, FLAGS.name)
  markdown = write_tables(table, base, precision=FLAGS.precision, plot=FLAGS.plot,
                          title=FLAGS.title)
  print(markdown)
  print(f'Wrote {base}.md, {base}.csv{", " + base + ".png" if FLAGS.plot else ""}')


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['workdirs', 'out'])
  app.run(main)
