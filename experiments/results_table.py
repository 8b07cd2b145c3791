"""The table maths of `experiments.collect_results`: runs' records, and the paper's aggregation.

As in the paper (§5.1), for every (row, column) the hyper-parameter combination (`hparam_keys`)
with the best mean `select_metric` on the `select_eval` results (validation by default) is
chosen, and the cell reports that combination's `metric` on `report_eval` (default: the same
eval) as mean ± std over its runs (the repetitions, `seed_key`), with the number of runs.
Metrics are stored as fractions and multiplied by `scale` (100: percent, as in the tables).

Each work directory contributes its tags (`run.json`, written by `experiments.sweep`) and its
`results/<eval>.json`; a run launched by hand has no `run.json`, so keys are looked up in its
`config.json` instead: a dotted key (`input.label_fraction`) or a unique last part of one
(`label_fraction`). Only final results (`"final": true`) count.

  records = results_table.load_records(['workdirs/demo/finetune/*'])
  table = results_table.aggregate(records, row_key='init', col_key='label_fraction')

`experiments.collect_results` writes a `Table` as Markdown, CSV and a plot.
"""

import dataclasses
import math
import os
from typing import Any, Iterable, Mapping, Sequence

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

def is_number(value: Any) -> bool:
  """A number, and not a bool (which Python counts as an int)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sort_key(value: Any):
  """Numbers before strings, each in natural order, so mixed columns still sort."""
  if isinstance(value, tuple):
    return (2, tuple(_sort_key(v) for v in value))
  if is_number(value):
    return (0, value)
  return (1, str(value))


def _matches(value: Any, wanted: Any) -> bool:
  if is_number(value) and isinstance(wanted, str):
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
  if all(is_number(c) for c in cols):
    cols.reverse()  # Numeric columns run from the most labels to the fewest, as in the paper.
  return Table(row_keys=row_keys, col_key=col_key, rows=rows, cols=cols, cells=cells,
               metric=metric, report_eval=report_eval, select_metric=select_metric,
               select_eval=select_eval, seed_key=seed_key, hparam_keys=hparam_keys, scale=scale)
