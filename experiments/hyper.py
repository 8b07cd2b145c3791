r"""Sweep definitions, written the big_vision `get_hyper(hyper)` way.

A *sweep* is a list of *runs*; a run is a dict of overrides:

* `'config.<dotted.key>': value` becomes the trainer flag `--config.<dotted.key>=<value>`;
* `'arg.<name>': value` is folded into the config argument string, so
  `configs/x.py:decoder_width=2` plus `{'arg.init': 'ddep'}` runs
  `configs/x.py:decoder_width=2,init=ddep` (`get_config(arg)` sees both).

Config files define `get_sweep(hyper, arg=None)` next to `get_config(arg=None)`;
`python -m experiments.sweep --config=configs/x.py:<arg> --workdir_root=...` calls it with this
module as `hyper` and `arg` the string after the colon. For example, Fig. 6 of the paper (four
initialisations of a 1x decoder, Cityscapes label counts with the paper's run counts, the lr x
weight-decay grid):

  def get_sweep(hyper, arg=None):
    return hyper.product([
        hyper.sweep('arg.init', ['none', 'supervised', 'dep', 'ddep']),
        hyper.label_efficiency('cityscapes'),   # 10 + 4 + 6 + 10 runs (subsets / seeds)
        hyper.lr_wd_grid(),                     # 4 x 4 values in [1e-5, 3e-4]
    ])                                          # -> 4 * 30 * 16 = 1920 runs

Building blocks (each returns a list of runs, so they nest freely):

* `sweep(key, values)`: one run per value.
* `fixed(key, value, length=1)`: the same value in `length` runs.
* `product([s1, s2, ...])`: every combination (the last sweep varies fastest).
* `zipit([s1, s2, ...])`: runs merged position by position (equal lengths).
* `chainit([s1, s2, ...])`: one sweep after another.
* `label_efficiency(dataset)`: the paper's label fractions / counts x subset seeds (§5.1):
  `arg.label_count` (Cityscapes) or `arg.label_fraction`, with `config.input.subset_seed`
  (tag `subset_seed`) and `config.seed` (untagged) set to the repetition index.
* `lr_wd_grid()`: the fine-tuning learning rate x weight decay grid in [1e-5, 3e-4] (§5.1):
  `config.lr` x `config.wd`, tags `lr` and `wd`.

Tags and work-directory names: keys set with `sweep` are the run's *coordinates*. They become its
`tags` (recorded in `run.json`, used by `experiments.collect_results` for rows, columns, seeds and
hyper-parameters) and its work-directory name (`run_name(tags)`), e.g.
`init=ddep-label_count=100-lr=0.0001-...`: a function of the tags alone, so a config can name
the run of an earlier stage's sweep it starts from (`configs.stages.pretrain_run`).
A tag is named by the last component of its key (`config.input.label_count` -> `label_count`),
longer suffixes only where two keys would clash. Keys set with `fixed`, or with
`sweep(..., tag=False)`, change the run but not its name: use them for values that do not
distinguish runs (step counts) or that follow a coordinate (the model seed zipped with the subset
seed). Runs must differ in their tags; `experiments.sweep` says which runs clash otherwise.
Whatever should be a row or column of a result table must be tagged in every run, even with a
single value: `hyper.sweep('arg.decoder_width', [1])`, not `hyper.fixed(...)`.
"""

import dataclasses
import hashlib
import itertools
import re
from typing import Any, Iterable, Mapping, Sequence

Run = dict[str, Any]

_KEY_RE = re.compile(r'^(config\.[A-Za-z_]\w*(\.[A-Za-z_]\w*)*|arg\.[A-Za-z_]\w*)$')
# Work-directory names keep to characters that are safe in file names, shell words and GCS
# object names; everything else becomes '_'.
_UNSAFE_RE = re.compile(r'[^A-Za-z0-9._=+-]')
_MAX_NAME_LEN = 200  # File-name components are limited to 255 bytes on common file systems.

# Fine-tuning grid (§5.1: "we sweep over weight decay and learning rate values between
# [1e-5, 3e-4]"). The paper does not list its grid points; half-decade steps span the interval.
LEARNING_RATES = (1e-5, 3e-5, 1e-4, 3e-4)
WEIGHT_DECAYS = (1e-5, 3e-5, 1e-4, 3e-4)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A label-efficiency protocol: the config key of the labelled amount and runs per amount."""
  label_key: str
  runs: Mapping[float, int]


# §5.1: 10 runs at 100 %; Pascal Context / ADE20K: 10 runs at 1, 5, 10 % and 5 at 20 %;
# Cityscapes: 10 runs at 1/30 (100 images), 6 at 1/8 (372), 4 at 1/4 (744). Cityscapes is
# indexed by image count, as its tables are (full = all 2975 train_fine images).
# The amount goes into the config argument (`configs/x.py:label_count=100`): the config's
# `input.label_count` / `input.label_fraction` default to None, which the command line cannot
# override, and at most one of them may be set.
_FRACTIONS = {1.0: 10, 0.2: 5, 0.1: 10, 0.05: 10, 0.01: 10}
PROTOCOLS = {
    'cityscapes': Protocol('arg.label_count', {2975: 10, 744: 4, 372: 6, 100: 10}),
    'pascal_context': Protocol('arg.label_fraction', _FRACTIONS),
    'ade20k': Protocol('arg.label_fraction', _FRACTIONS),
}
# Each repetition draws another labelled subset and also another model seed, so that the runs
# at 100 % labels (where every subset is the whole train set) still differ.
SEED_KEYS = ('config.input.subset_seed', 'config.seed')


@dataclasses.dataclass(frozen=True)
class Untagged:
  """A value that is set in a run but is not one of its coordinates (see module docstring)."""
  value: Any


def check_key(key: str) -> str:
  """Returns `key` if it is `config.<dotted.key>` or `arg.<name>`; raises ValueError otherwise."""
  if not isinstance(key, str) or not _KEY_RE.match(key):
    raise ValueError(
        f'Invalid sweep key {key!r}: use "config.<dotted.key>" for a config override (e.g. '
        f'"config.lr") or "arg.<name>" for an entry of the config argument (e.g. "arg.init").')
  return key


def sweep(key: str, values: Iterable[Any], *, tag: bool = True) -> list[Run]:
  """One run per value of `key`; `tag=False` keeps the key out of tags and names."""
  check_key(key)
  values = list(values)
  if not values:
    raise ValueError(f'hyper.sweep({key!r}, ...) got no values.')
  return [{key: v if tag else Untagged(v)} for v in values]


def fixed(key: str, value: Any, length: int = 1) -> list[Run]:
  """`length` runs setting `key` to `value`, which is not a tag (big_vision's `hyper.fixed`)."""
  return sweep(key, [value] * length, tag=False)


def _merge(runs: Sequence[Run], where: str) -> Run:
  merged = {}
  for run in runs:
    for key, value in run.items():
      if key in merged:
        raise ValueError(f'{where}: key {key!r} is set by two of its sweeps; set it in one.')
      merged[key] = value
  return merged


def product(sweeps: Sequence[Sequence[Run]]) -> list[Run]:
  """Every combination of one run from each sweep, merged (like `itertools.product`)."""
  return [_merge(combo, 'hyper.product') for combo in itertools.product(*sweeps)]


def zipit(sweeps: Sequence[Sequence[Run]]) -> list[Run]:
  """Merges the i-th runs of all sweeps; the sweeps must have equal lengths."""
  lengths = [len(s) for s in sweeps]
  if len(set(lengths)) > 1:
    raise ValueError(f'hyper.zipit needs sweeps of equal length, got lengths {lengths}.')
  return [_merge(runs, 'hyper.zipit') for runs in zip(*sweeps)]


def chainit(sweeps: Sequence[Sequence[Run]]) -> list[Run]:
  """The runs of all sweeps, one sweep after another."""
  return [dict(run) for s in sweeps for run in s]


def repeats(count: int, seed_keys: Sequence[str] = SEED_KEYS) -> list[Run]:
  """`count` repetitions: seeds 0..count-1 under `seed_keys`; only the first key is a tag."""
  if not seed_keys:
    raise ValueError('repeats() needs at least one seed key.')
  seeds = range(count)
  return zipit([sweep(seed_keys[0], seeds)] + [sweep(k, seeds, tag=False) for k in seed_keys[1:]])


def label_efficiency(dataset: str, *, labels: Sequence[float] | None = None,
                     max_runs: int | None = None, label_key: str | None = None,
                     seed_keys: Sequence[str] = SEED_KEYS) -> list[Run]:
  """The paper's label-efficiency runs for `dataset`: each labelled amount x its repetitions.

  Args:
    dataset: a key of `PROTOCOLS` ('cityscapes', 'pascal_context', 'ade20k').
    labels: a subset of the protocol's amounts (e.g. `[1.0, 0.2, 0.1]` for Table 4); default all.
    max_runs: caps the repetitions per amount (a cheaper sweep than the paper's).
    label_key: overrides the protocol's key of the labelled amount (`arg.label_count` for
      Cityscapes, `arg.label_fraction` otherwise), e.g. `config.input.label_fraction` for a config
      that declares that field with a type.
    seed_keys: keys set to the repetition index (the first one is the tag, e.g. `subset_seed`).

  Returns:
    Runs setting the labelled amount (a tag named like its key, e.g. `label_count`) and seeds.
  """
  if dataset not in PROTOCOLS:
    raise ValueError(f'Unknown label-efficiency protocol {dataset!r}; known: '
                     f'{sorted(PROTOCOLS)}.')
  protocol = PROTOCOLS[dataset]
  runs_per_amount = dict(protocol.runs)
  if labels is not None:
    unknown = [x for x in labels if x not in runs_per_amount]
    if unknown:
      raise ValueError(f'{dataset}: labelled amounts {unknown} are not in the paper protocol '
                       f'{sorted(runs_per_amount, reverse=True)}.')
    runs_per_amount = {x: runs_per_amount[x] for x in labels}
  key = check_key(label_key or protocol.label_key)
  return chainit([
      product([sweep(key, [amount]),
               repeats(min(count, max_runs) if max_runs else count, seed_keys)])
      for amount, count in runs_per_amount.items()
  ])


def lr_wd_grid(lrs: Sequence[float] = LEARNING_RATES, wds: Sequence[float] = WEIGHT_DECAYS, *,
               lr_key: str = 'config.lr', wd_key: str = 'config.wd') -> list[Run]:
  """The fine-tuning grid: every learning rate x every weight decay (tags `lr`, `wd`)."""
  return product([sweep(lr_key, lrs), sweep(wd_key, wds)])


# -- run names: a run's work directory is a function of its tags ---------------------------------

def format_value(value: Any) -> str:
  """A value as written on the command line (parsed back by ml_collections' config_flags)."""
  if isinstance(value, float):
    return repr(value)  # Shortest exact form: 0.0001, 1e-05.
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return str(value)


def compact_value(value: Any) -> str:
  """A value as written in names and config arguments: tuples as `a+b` (`configs.common`)."""
  if isinstance(value, (list, tuple)):
    return '+'.join(compact_value(v) for v in value)
  return format_value(value)


def run_name(tags: Mapping[str, Any]) -> str:
  """The work-directory name of a run: its tags, sorted by name, as `tag=value` joined by '-'."""
  name = '-'.join(f'{k}={compact_value(tags[k])}' for k in sorted(tags)) or 'run'
  name = _UNSAFE_RE.sub('_', name)
  if len(name) > _MAX_NAME_LEN:
    # Still unique and stable: a digest of the full name replaces the tail.
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    name = f'{name[:_MAX_NAME_LEN - 11]}-{digest}'
  return name
