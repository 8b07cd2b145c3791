r"""Paper-style result tables and label-efficiency plots from many work directories.

  python -m experiments.collect_results --workdirs='/tmp/sweeps/cityscapes/*' --out=/tmp/tables \
      --row_key=init,decoder_width --col_key=label_count [--seed_key=subset_seed] \
      [--hparam_keys=lr,wd] [--metric=mIoU] [--select_eval=val] [--where=decoder_width=1]

writes `<out>/<name>.md` (the table, then the hyper-parameters chosen per cell), `<out>/<name>.csv`
(one line per cell) and `<out>/<name>.png` (mean metric vs labelled amount, one line per row, error
bars = std; like Fig. 1, right, of the paper).

The table is `experiments.results_table`'s: for every (row, column) the hyper-parameters
(`--hparam_keys`) with the best mean `--select_metric` on `--select_eval` (validation by default,
as in the paper, §5.1), reported as mean ± std of `--metric` on `--report_eval` over the
repetitions (`--seed_key`), scaled by `--scale` (100: percent). Keys are run.json tags or
config.json keys; only final results count.

The same tables are a library for the demo and notebooks:

  records = results_table.load_records(['workdirs/demo/finetune/*'])
  table = results_table.aggregate(records, row_key='init', col_key='label_fraction')
  print(collect_results.to_markdown(table))
  collect_results.plot_label_efficiency(table, 'label_efficiency.png')
"""

import csv
import io
import math
from typing import Any, Callable, Sequence

from absl import app
from absl import flags

from ddep_jax import fileio
from experiments import results_table

# -- output ---------------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, tuple):
    return '+'.join(_fmt(v) for v in value)
  return str(value)


def _row_label(row: tuple) -> str:
  return ' / '.join(_fmt(v) for v in row)


def _col_label(table: results_table.Table, col: Any) -> str:
  # Label fractions read as percentages, as in the paper's tables and Fig. 1.
  if (table.col_key.endswith('fraction') and isinstance(col, (int, float))
      and all(results_table.is_number(c) and c <= 1 for c in table.cols)):
    return f'{100 * col:g}%'
  return _fmt(col)


def format_cell(cell: results_table.Cell | None, precision: int = 2) -> str:
  """'mean ± std (n)', 'mean (1)' for a single run, '–' for an empty cell."""
  if cell is None:
    return '–'
  if math.isnan(cell.std):
    return f'{cell.mean:.{precision}f} ({cell.n})'
  return f'{cell.mean:.{precision}f} ± {cell.std:.{precision}f} ({cell.n})'


def _markdown_grid(table: results_table.Table,
                   cell_text: Callable[[results_table.Cell | None], str]) -> str:
  """A Markdown table with a line per row and a column per column of `table`."""
  header = [' / '.join(table.row_keys)] + [_col_label(table, c) for c in table.cols]
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join([':--'] + ['--:'] * len(table.cols)) + '|']
  for row in table.rows:
    texts = [_row_label(row)] + [cell_text(table.cells.get((row, col))) for col in table.cols]
    lines.append('| ' + ' | '.join(texts) + ' |')
  return '\n'.join(lines)


def caption(table: results_table.Table) -> str:
  """One sentence saying what the cells are."""
  scaled = f' (×{table.scale:g})' if table.scale != 1 else ''
  chosen = ', '.join(f'`{k}`' for k in table.hparam_keys)
  selection = (f'{chosen} chosen per cell by the best mean {table.select_metric} on '
               f'`{table.select_eval}`' if chosen else 'one recipe, nothing chosen per cell')
  return (f'{table.metric}{scaled} on `{table.report_eval}`: mean ± std over `{table.seed_key}` '
          f'(number of runs); {selection}.')


def to_markdown(table: results_table.Table, precision: int = 2) -> str:
  """The table: rows = `row_keys` values, columns = `col_key` values, cells = mean ± std (n)."""
  return _markdown_grid(table, lambda cell: format_cell(cell, precision))


def hparams_markdown(table: results_table.Table) -> str:
  """The hyper-parameters chosen per cell, with their mean selection metric."""
  def text(cell):
    if cell is None:
      return '–'
    chosen = ', '.join(f'{k}={_fmt(v)}' for k, v in cell.hparams.items())
    return f'{chosen} ({cell.selection:.4g})'
  return _markdown_grid(table, text)


def to_csv(table: results_table.Table) -> str:
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


def plot_label_efficiency(table: results_table.Table, path: str, *, title: str | None = None,
                          log_x: bool = True) -> None:
  """Mean metric vs labelled amount, one line per row, error bars = std (PNG via Agg)."""
  # Figure + Agg canvas, not pyplot: no global backend state, safe in tests and on servers.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  if not all(results_table.is_number(c) for c in table.cols):
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
  records = results_table.load_records(FLAGS.workdirs)
  table = results_table.aggregate(
      records, FLAGS.row_key, FLAGS.col_key, FLAGS.seed_key, FLAGS.hparam_keys, FLAGS.metric,
      select_eval=FLAGS.select_eval, report_eval=FLAGS.report_eval,
      select_metric=FLAGS.select_metric, select_mode=FLAGS.select_mode, scale=FLAGS.scale,
      where=where, skip_unfinished=FLAGS.skip_unfinished)
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
