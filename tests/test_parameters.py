"""Merging loaded parameters into a model's, and the one report of what does not fit."""

import numpy as np
import pytest

from ddep_jax import parameters


def test_merge_params_carries_matching_paths_and_keeps_new_head():
  init = {'encoder': {'k': np.zeros((2, 2))}, 'decoder': {'k': np.zeros(3)},
          'head': {'kernel': np.zeros((4, 19))}}
  loaded = {'encoder': {'k': np.ones((2, 2))}, 'decoder': {'k': np.full(3, 5.0)},
            'head': {'kernel': np.ones((4, 3))}}
  merged = parameters.merge_params(init, loaded, ('encoder/.*', 'decoder/.*'))
  np.testing.assert_array_equal(merged['encoder']['k'], np.ones((2, 2)))
  np.testing.assert_array_equal(merged['decoder']['k'], np.full(3, 5.0))
  np.testing.assert_array_equal(merged['head']['kernel'], np.zeros((4, 19)))


def test_merge_params_reports_every_problem_with_paths_and_shapes():
  init = {'encoder': {'a': np.zeros((2, 2)), 'b': np.zeros(3)}}
  loaded = {'encoder': {'a': np.zeros((2, 5)), 'c': np.zeros(1)}}
  with pytest.raises(ValueError) as error:
    parameters.merge_params(init, loaded, ('encoder/.*',))
  message = str(error.value)
  assert 'in model but not in checkpoint: encoder/b' in message
  assert 'in checkpoint but not in model: encoder/c' in message
  assert 'shape mismatch: encoder/a: checkpoint (2, 5) vs model (2, 2)' in message
