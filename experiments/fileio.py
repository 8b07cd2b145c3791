"""Small file helpers shared by the experiment tools, for local paths and `gs://` URLs alike.

Local paths use the standard library; any path with a scheme (`gs://...`) goes through
`tf.io.gfile`, imported only then so local use stays free of the TensorFlow start-up cost.
"""

import glob as glob_lib
import json
import os
from typing import Any


def _is_remote(path: str) -> bool:
  return '://' in path


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def join(root: str, *parts: str) -> str:
  """Joins path parts; `gs://` roots keep their `/` separators on every OS."""
  if _is_remote(root):
    return '/'.join([root.rstrip('/')] + [p.strip('/') for p in parts])
  return os.path.join(root, *parts)


def exists(path: str) -> bool:
  return _gfile().exists(path) if _is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if _is_remote(path) else os.path.isdir(path)


def glob(pattern: str) -> list[str]:
  """Sorted matches of a shell-style pattern."""
  matches = _gfile().glob(pattern) if _is_remote(pattern) else glob_lib.glob(pattern)
  return sorted(m.rstrip('/') for m in matches)


def read_json(path: str) -> Any:
  """Parses a JSON file; the error names the file when it is not valid JSON."""
  if _is_remote(path):
    with _gfile().GFile(path, 'r') as f:
      text = f.read()
  else:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); delete or repair the file.') from e


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON, creating parent directories.

  Written to `<path>.tmp` first and renamed over `path`, so a reader never sees half a file.
  """
  text = json.dumps(obj, indent=2, sort_keys=True) + '\n'
  if _is_remote(path):
    gfile = _gfile()
    gfile.makedirs(path.rsplit('/', 1)[0])
    with gfile.GFile(path + '.tmp', 'w') as f:
      f.write(text)
    gfile.rename(path + '.tmp', path, overwrite=True)
    return
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(path + '.tmp', path)
