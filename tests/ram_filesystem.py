"""TensorFlow's in-memory file system (`ram://`) as the non-local file system of the data tests.

The TFDS data is read by tf.data through TensorFlow's own file systems, whose GCS client cannot
be pointed at an emulator (see `gcs_emulator`). `ram://` takes the same `tf.io.gfile` code path
as `gs://` without a local directory or a server, so data read from it proves that nothing on
the way (our input pipeline, TFDS) opens the data_dir with `os.path` or `open()`.

One library limitation needs a test-only work-around: TFDS turns the data_dir into an
`etils.epath.Path` (`tensorflow_datasets.core.utils.file_utils.get_data_dir_and_dataset_dir`,
TFDS 4.9), and epath knows only the `gs://`, `s3://`, `az://` and `hf://` schemes
(`etils.epath.gpath._URI_PREFIXES`): `epath.Path('ram://...')` is a `KeyError` in
`etils.epath.register.make_path`. `epath_knows_ram()` adds `ram://` to those tables for a block,
backed by epath's own `tf.io.gfile` backend, as `etils.epath.testing` swaps backends. On a pod
the data_dir is `gs://`, which epath knows, so the library needs no such change.
"""

import contextlib
import os
import uuid
from unittest import mock

import tensorflow as tf


def unique_root(name: str) -> str:
  """A fresh `ram://` directory: the file system is process-wide, shared by every test."""
  return f'ram://{name}_{uuid.uuid4().hex[:8]}'


def copy_tree(source: str, target: str) -> None:
  """Copies the directory tree `source` (any `tf.io.gfile` path) to `target`."""
  for directory, _, files in tf.io.gfile.walk(source):
    relative = os.path.relpath(directory, source)
    out = target if relative == '.' else f'{target}/{relative}'
    tf.io.gfile.makedirs(out)
    for name in files:
      tf.io.gfile.copy(os.path.join(directory, name), f'{out}/{name}', overwrite=True)


@contextlib.contextmanager
def epath_knows_ram():
  """`etils.epath.Path('ram://...')` works inside the block, through `tf.io.gfile`."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  from etils.epath import register  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  with mock.patch.object(gpath, '_URI_PREFIXES', gpath._URI_PREFIXES + ('ram://',)), \
      mock.patch.object(gpath, '_URI_SCHEMES', gpath._URI_SCHEMES | {'ram'}), \
      mock.patch.dict(gpath._URI_MAP_ROOT, {'ram://': '/ram/'}), \
      mock.patch.dict(gpath._PREFIX_TO_BACKEND, {'ram': backend.tf_backend}), \
      mock.patch.dict(register._URI_PREFIXES_TO_CLS, {'ram://': gpath.PosixGPath}):
    yield
  # pylint: enable=protected-access


@contextlib.contextmanager
def copy_on_ram(local_dir: str, name: str):
  """Yields a `ram://` copy of `local_dir` that epath (so TFDS) can open; deleted after."""
  root = unique_root(name)
  copy_tree(local_dir, root)
  try:
    with epath_knows_ram():
      yield root
  finally:
    tf.io.gfile.rmtree(root)
