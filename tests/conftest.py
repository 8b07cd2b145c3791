"""Test-session set-up shared by every test module.

Runs before any test imports jax: 8 simulated CPU devices so sharded code is
exercised, a shared compilation cache, and no TFDS metadata look-ups on GCS (tests never touch
the network).
"""

import atexit
import os
import shutil
import tempfile

import xla_flags  # tests/ is on sys.path: pytest.ini's pythonpath.

os.environ.setdefault("XLA_FLAGS", xla_flags.flags())
if xla_flags.FAST_COMPILE not in os.environ["XLA_FLAGS"]:  # `make test` sets only the devices.
  os.environ["XLA_FLAGS"] += " " + xla_flags.FAST_COMPILE
# One persistent XLA compilation cache for the whole session (pytest-xdist workers and the
# trainer subprocesses some tests start inherit it): tests that build the same tiny programs
# compile them once. Created fresh per session, so nothing carries over between CI runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="ddep_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keep TensorFlow off any accelerator and from grabbing all host threads.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from ddep_jax.data import datasets  # noqa: E402

datasets.confine_tensorflow()


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def digit_scenes_dir(tmp_path_factory):
  """A TFDS data_dir with the embedded demo dataset prepared (all three configs), per worker."""
  from ddep_jax.data.builders import digit_scenes  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  digit_scenes.prepare(data_dir)
  return data_dir
