"""File helpers for every path a user can pass: local paths and `gs://` (or any scheme) URLs alike.

Local paths use the standard library; any path with a scheme (`gs://...`, `ram://...`) goes
through `tf.io.gfile`, imported only then so local use stays free of the TensorFlow start-up cost.

Atomic writes: a file is written to `<path>.tmp` and renamed over `path` (atomic on POSIX file
systems). On object stores (`gs://`, `s3://`) a rename is a copy plus a delete and not atomic, but
a single upload is: the final name is written directly there.
"""

import glob as glob_lib
import json
import os
from typing import Any


_OBJECT_STORES = ('gs://', 's3://')


def is_remote(path: str) -> bool:
  return '://' in path


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def join(root: str, *parts: str) -> str:
  """Joins path parts; `gs://` roots keep their `/` separators on every OS."""
  if is_remote(root):
    return '/'.join([root.rstrip('/')] + [p.strip('/') for p in parts])
  return os.path.join(root, *parts)


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def dirname(path: str) -> str:
  return path.rstrip('/').rsplit('/', 1)[0] if is_remote(path) else os.path.dirname(path)


def listdir(path: str) -> list[str]:
  """Sorted names of the entries of a directory (no trailing `/` on sub-directories)."""
  names = _gfile().listdir(path) if is_remote(path) else os.listdir(path)
  return sorted(n.rstrip('/') for n in names)


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    with _gfile().GFile(path, 'rb') as f:
      return f.read()
  with open(path, 'rb') as f:
    return f.read()


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` in one piece (a single upload on object stores), creating parent directories.

  Serialise into `io.BytesIO` first: writers that seek or tell (zip, `np.savez`) cannot write to
  GCS files directly.
  """
  parent = dirname(path)
  if parent:
    makedirs(parent)
  if is_remote(path):
    with _gfile().GFile(path, 'wb') as f:
      f.write(data)
  else:
    with open(path, 'wb') as f:
      f.write(data)


def glob(pattern: str) -> list[str]:
  """Sorted matches of a shell-style pattern."""
  matches = _gfile().glob(pattern) if is_remote(pattern) else glob_lib.glob(pattern)
  return sorted(m.rstrip('/') for m in matches)


def read_text(path: str) -> str:
  if is_remote(path):
    with _gfile().GFile(path, 'r') as f:
      return f.read()
  with open(path, encoding='utf-8') as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Writes `text` so that a reader never sees half a file, creating parent directories."""
  parent = dirname(path)
  if parent:
    makedirs(parent)
  if path.startswith(_OBJECT_STORES):
    with _gfile().GFile(path, 'w') as f:
      f.write(text)
  elif is_remote(path):
    with _gfile().GFile(path + '.tmp', 'w') as f:
      f.write(text)
    _gfile().rename(path + '.tmp', path, overwrite=True)
  else:
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(path + '.tmp', path)


def read_json(path: str) -> Any:
  """Parses a JSON file; the error names the file when it is not valid JSON."""
  text = read_text(path)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); delete or repair the file.') from e


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented, key-sorted JSON with `write_text`."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=True) + '\n')
