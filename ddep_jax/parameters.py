"""Parameter trees: '/'-joined path names, and putting loaded parameters into a model's.

`merge_params` is the one place where parameters from elsewhere (an earlier stage's Orbax
checkpoint, an ImageNet-21k `.npz`, a timm state dict, a checkpoint to evaluate) meet the
parameters a model expects, and `check_fits` the one report of what does not fit (big_vision's
`merge_params`): every path in the checkpoint but not in the model, in the model but not in the
checkpoint, and every shape mismatch with both shapes, all in one error.
"""

import re
from typing import Any, Iterable, Mapping, Sequence

import flax
import numpy as np


class ParamsMismatchError(ValueError):
  """Parameters do not fit a model; `paths` holds every offending parameter path."""

  def __init__(self, message: str, paths: Sequence[str]):
    super().__init__(message)
    self.paths = tuple(paths)


def flatten(tree: Mapping) -> dict[str, Any]:
  """`{'encoder/embedding/kernel': leaf, ...}` of a nested dict (or FrozenDict)."""
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def unflatten(flat: Mapping[str, Any]) -> dict:
  """The nested dict of a `flatten` result."""
  return flax.traverse_util.unflatten_dict(dict(flat), sep='/')


def matching_paths(params: Mapping, patterns: Iterable[str]) -> list[str]:
  """The paths of `params` that one of the regexes `patterns` matches in full."""
  regexes = [re.compile(p) for p in patterns]
  return [k for k in flatten(params) if any(r.fullmatch(k) for r in regexes)]


def check_fits(model_params: Mapping, loaded: Mapping, patterns: Sequence[str] = ('.*',), *,
               source: str = 'checkpoint', hint: str = '') -> None:
  """Raises ParamsMismatchError unless the paths matching `patterns` fit the model.

  Every model path that a pattern matches must be in `loaded` with the model's shape, and every
  path of `loaded` that a pattern matches must be in the model. Leaves may be arrays or
  `jax.ShapeDtypeStruct`s (only shapes are read).

  Args:
    model_params: the model's parameters (or their shapes): the contract.
    loaded: parameters to put in.
    patterns: regexes of the paths to check, matched in full ('.*': all of them).
    source: what `loaded` is called in the error ('checkpoint', 'params').
    hint: a line appended to the error, saying what to check.
  """
  model_flat, loaded_flat = flatten(model_params), flatten(loaded)
  regexes = [re.compile(p) for p in patterns]
  wanted = [k for k in model_flat if any(r.fullmatch(k) for r in regexes)]
  offered = [k for k in loaded_flat if any(r.fullmatch(k) for r in regexes)]
  extra = sorted(k for k in offered if k not in model_flat)
  missing = sorted(k for k in wanted if k not in loaded_flat)
  mismatched = sorted(k for k in wanted if k in loaded_flat and
                      np.shape(loaded_flat[k]) != np.shape(model_flat[k]))
  lines = [f'in {source} but not in model: {k} {np.shape(loaded_flat[k])}' for k in extra]
  lines += [f'in model but not in {source}: {k} {np.shape(model_flat[k])}' for k in missing]
  lines += [f'shape mismatch: {k}: {source} {np.shape(loaded_flat[k])} vs model '
            f'{np.shape(model_flat[k])}' for k in mismatched]
  if patterns and not wanted:
    lines.append(f'the patterns {list(patterns)} match no model parameter')
  if lines:
    message = f'The {source} does not fit the model:\n  ' + '\n  '.join(lines)
    raise ParamsMismatchError(message + (f'\n{hint}' if hint else ''),
                              extra + missing + mismatched)


def merge_params(init_params: Mapping, loaded: Mapping, patterns: Sequence[str] = ('.*',), *,
                 source: str = 'checkpoint', hint: str = '') -> dict:
  """Returns `init_params` with every path matching `patterns` taken from `loaded`.

  Matching paths must fit (`check_fits`: all problems in one error); every other path keeps its
  fresh initialisation (e.g. a new segmentation head). Loaded leaves come back as host numpy
  arrays in the model's dtype, for the caller to place on its mesh; the others are returned as
  they are (possibly sharded device arrays, or `jax.ShapeDtypeStruct`s).
  """
  check_fits(init_params, loaded, patterns, source=source, hint=hint)
  merged = flatten(init_params)
  loaded_flat = flatten(loaded)
  for k in matching_paths(init_params, patterns):
    merged[k] = np.asarray(loaded_flat[k], dtype=merged[k].dtype)
  return unflatten(merged)
