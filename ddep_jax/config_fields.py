"""The two ways the library reads a config section, so that a typo is an error, not a default.

* A section of the run's config (`config.input`, `config.denoising`, `config.init_from`, ...)
  comes whole from its owner's locked `default_config()`: `check_fields` refuses one that lacks
  a field (no second default in the reading code) or holds one the owner does not know.
* An entry that is partial by design (a `config.schedule` entry, big_vision style; an entry of
  `config.evals`) is completed by `fill` from its owner's locked per-entry default, the one
  place its defaults live; a key that default lacks is refused.

A leaf module (it imports nothing of the project), so that data, objectives and the loop share it.
"""

from collections.abc import Mapping

import ml_collections


def check_fields(config, defaults: ml_collections.ConfigDict, where: str, owner: str, *,
                 exact: bool) -> None:
  """Raises when `config` has a field `defaults` lack (if `exact`) or lacks one of theirs.

  An unknown field is reported first: a misspelt field is also a missing one, and its own
  name is what the user has to fix.
  """
  unknown = sorted(k for k in config if k not in defaults) if exact else []
  if unknown:
    raise ValueError(f'{where} has unknown field(s) {unknown}; misspelt? Its fields are those '
                     f'of {owner}: {sorted(defaults)}.')
  missing = sorted(k for k in defaults if k not in config)
  if missing:
    raise ValueError(f'{where} has no field(s) {missing}. Build it from {owner}, which holds '
                     'every field with its default (configs.common starts from it), and set '
                     'only what differs.')


def fill(entry: Mapping, defaults: ml_collections.ConfigDict, where: str, owner: str) -> dict:
  """`defaults` (a locked per-entry default) with the keys of `entry` set; unknown keys raise."""
  unknown = sorted(k for k in entry if k not in defaults)
  if unknown:
    raise ValueError(f'{where} has unknown key(s) {unknown}; misspelt? The known keys are '
                     f'{sorted(defaults)}, with defaults in {owner}.')
  return {**defaults.to_dict(), **{k: entry[k] for k in entry}}
