"""Fixtures for the model tests: parameters without running (slow to compile) `model.init`."""

import jax
import numpy as np
import pytest


def _random_params(module, *args, seed=0, **kwargs):
  """Random parameters with the shapes `module.init` would give, drawn in numpy.

  `jax.eval_shape` traces the module once without compiling anything, which keeps these tests
  fast on a loaded 2-core CPU; values are N(0, 1/fan_in) for kernels and N(1, 0.1) for norm
  scales so that activations stay well scaled.
  """
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))['params']
  rng = np.random.default_rng(seed)

  def draw(path, spec):
    name = path[-1].key
    if name == 'kernel':
      return (rng.normal(size=spec.shape) / np.sqrt(np.prod(spec.shape[:-1]))).astype(np.float32)
    if name == 'scale':
      return (1.0 + 0.1 * rng.normal(size=spec.shape)).astype(np.float32)
    return (0.1 * rng.normal(size=spec.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(name='random_params')
def random_params_fixture():
  return _random_params
