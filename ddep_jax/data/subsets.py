"""Label-efficient subsets: which labelled examples a fine-tuning run may use.

The paper fine-tunes on 1/5/10/20/100 % of Pascal Context and ADE20K and on 100 / 372 / 744
of the 2,975 Cityscapes training images (§5, Table 5), averaging runs over different subsets.

A subset depends only on the set of example ids and `subset_seed`: ids are ranked by
SHA-256 of `"<subset_seed>:<id>"` and the first `count` are kept. So the selection

* does not depend on read order, host count or library versions (it can be recomputed in any
  language from the id list),
* is nested: with one seed, the 1 % subset is inside the 5 % subset, which is inside 10 %.

Split files are plain text, one id per line, so subsets can be exchanged with other codebases.
"""

import hashlib
import math
from collections.abc import Iterable

from ddep_jax import fileio


def subset_size(num_examples: int, *, label_fraction: float | None = None,
                label_count: int | None = None) -> int:
  """Number of examples a fraction (rounded half up, at least 1) or a count keeps."""
  if label_fraction is not None and label_count is not None:
    raise ValueError(f'Give label_fraction ({label_fraction}) or label_count ({label_count}), '
                     'not both.')
  if label_count is not None:
    if not 1 <= label_count <= num_examples:
      raise ValueError(f'label_count={label_count} must be in [1, {num_examples}] (the number '
                       'of examples in the split).')
    return int(label_count)
  if label_fraction is not None:
    if not 0.0 < label_fraction <= 1.0:
      raise ValueError(f'label_fraction={label_fraction} must be in (0, 1].')
    return max(1, int(math.floor(label_fraction * num_examples + 0.5)))
  return num_examples


def _rank_key(subset_seed: int, example_id: str) -> bytes:
  return hashlib.sha256(f'{subset_seed}:{example_id}'.encode('utf-8')).digest()


def select_subset(ids: Iterable[str], *, label_fraction: float | None = None,
                  label_count: int | None = None, subset_seed: int = 0) -> list[str]:
  """Returns the sorted ids of the labelled subset (all ids when neither size is given)."""
  ids = [str(i) for i in ids]
  unique = sorted(set(ids))
  if len(unique) != len(ids):
    raise ValueError(f'Example ids must be unique to choose a subset; {len(ids) - len(unique)} '
                     f'duplicates, e.g. {_duplicates(ids)[:5]}.')
  count = subset_size(len(unique), label_fraction=label_fraction, label_count=label_count)
  ranked = sorted(unique, key=lambda i: _rank_key(subset_seed, i))
  return sorted(ranked[:count])


def _duplicates(ids: list[str]) -> list[str]:
  seen, dups = set(), []
  for i in ids:
    if i in seen:
      dups.append(i)
    seen.add(i)
  return dups


def write_split_file(path: str, ids: Iterable[str]) -> None:
  """Writes `ids` sorted, one per line (UTF-8); `path` may be on GCS."""
  ids = sorted(str(i) for i in ids)
  for i in ids:
    if not i or any(c.isspace() for c in i):
      raise ValueError(f'Cannot write id {i!r} to split file {path}: ids must be non-empty and '
                       'contain no whitespace.')
  fileio.write_text(path, ''.join(f'{i}\n' for i in ids))  # Atomic: never half a file.


def id_from_split_line(line: str) -> str:
  """The example id named by one split-file line.

  Accepts a bare id (`aachen_000000_000019`) or, as other codebases' list files have, an
  image path first on the line (`leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png
  gtFine/...`): then the id is the file name without extension and without Cityscapes'
  `_leftImg8bit` suffix.
  """
  token = line.split()[0]
  name = token.rsplit('/', 1)[-1]
  if '/' in token or name.lower().endswith(('.png', '.jpg', '.jpeg')):
    name = name.rsplit('.', 1)[0]
    if name.endswith('_leftImg8bit'):
      name = name[:-len('_leftImg8bit')]
  return name


def read_split_file(path: str) -> list[str]:
  """Reads ids (see `id_from_split_line`); blank lines and `#` comments are skipped."""
  if not fileio.exists(path):
    raise FileNotFoundError(f'Split file {path} does not exist (config input.split_file). It '
                            'should list one example id per line, as written to '
                            '<workdir>/subset_ids.txt.')
  lines = [line.strip() for line in fileio.read_text(path).splitlines()]
  ids = [id_from_split_line(line) for line in lines if line and not line.startswith('#')]
  if not ids:
    raise ValueError(f'Split file {path} lists no ids.')
  dups = _duplicates(ids)
  if dups:
    raise ValueError(f'Split file {path} lists {len(dups)} ids more than once, e.g. {dups[:5]}.')
  return ids
