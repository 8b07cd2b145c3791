"""Shared pieces of every experiment config.

`get_base_config()` assembles the full config from the defaults each module owns (model,
input, objectives, optimizer, sharding, initialization, the train step and the loop): it sets
no default of its own. Experiment files start from it and change what their experiment
changes. `parse_arg` reads the `:k=v,...` argument of a config file (big_vision style), so
`configs/x.py:init=ddep,runlocal=True` picks a variant.
"""

import ast
from typing import Any

import ml_collections

from ddep_jax import evaluate
from ddep_jax import initialization
from ddep_jax import models
from ddep_jax import objectives
from ddep_jax import optimizer
from ddep_jax import performance
from ddep_jax import sharding
from ddep_jax import train
from ddep_jax import train_step
from ddep_jax.data import input_pipeline


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'k1=v1,k2=v2' into a ConfigDict over `defaults`; unknown keys are errors.

  Values are Python literals where they parse as one (`3`, `0.05`, `True`, `None`, `(0.9,0.95)`)
  and strings otherwise; a value's type must match its default's unless the default is None.
  Tuples are written with `+` instead of commas: `gamma_range=0.9+0.95`. Keys whose default is a
  string take the text as written, `+` included (`npz=/ckpt/R50+ViT-B_16.npz`).
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(','):
    if not item:
      continue
    if '=' not in item:
      raise ValueError(f'Config argument {item!r} is not of the form key=value (in {arg!r}).')
    key, value = item.split('=', 1)
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r} (in {arg!r}); known: '
                       f'{sorted(defaults)}.')
    result[key] = _parse_value(value, defaults[key], key)
  return result


def _parse_value(text: str, default: Any, key: str) -> Any:
  if isinstance(default, str):
    return text  # Paths and names: file names such as R50+ViT-B_16.npz contain '+'.
  if '+' in text:
    return tuple(_parse_value(t, None, key) for t in text.split('+'))
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(default, bool) and not isinstance(value, bool):
    raise ValueError(f'Config argument {key}={text!r}: expected True or False.')
  if isinstance(default, (int, float)) and not isinstance(default, bool):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
      raise ValueError(f'Config argument {key}={text!r}: expected a number.')
    if isinstance(default, float):
      value = float(value)
  return value


def eval_config(dataset: str, split: str, *, batch_size: int,
                **fields) -> ml_collections.ConfigDict:
  """One entry of `config.evals`: `evaluate.default_eval_config()` with `fields` set.

  `fields` are eval input fields (`resize`, `data_dir`, ...) and the inference protocol:
  `mode` ('whole' | 'sliding'), `scales`, `flip`, `crop_size`, `stride`, and `every_steps`
  (None: only the final evaluation). A misspelt one is an error (the default is locked).
  """
  c = evaluate.default_eval_config()
  c.dataset = dataset
  c.split = split
  c.batch_size = batch_size
  for key, value in fields.items():
    c[key] = value
  return c


def get_base_config() -> ml_collections.ConfigDict:
  """Every field a run has, with defaults; experiment configs override them."""
  config = train_step.default_config()           # task, seed
  config.model = models.default_config()
  config.input = input_pipeline.default_config()
  config.update(objectives.default_config())      # denoising, classification_loss, class_weights
  config.update(optimizer.default_config())       # optimizer, lr, wd, ..., schedule
  config.update(sharding.default_config())        # mesh, sharding_rules, distributed
  config.update(performance.default_config())     # peak_tflops_per_device (for train/mfu)
  config.update(initialization.default_config())  # init_from (stage chaining, pretrained weights)
  config.update(train.default_config())           # num_classes, evals, total_steps, ...
  return config
