"""File helpers for every path a user can pass: local paths and `gs://` (or any scheme) URLs alike.

Local paths use the standard library. Object-store URLs (`gs://`, `s3://`, `az://`) go through
`etils.epath`, the layer Orbax writes checkpoints with, so one setting moves both: with TensorFlow
installed epath uses `tf.io.gfile` (the default), with `EPATH_USE_TF=false` it uses fsspec
(`gcsfs` for `gs://`, which honours `STORAGE_EMULATOR_HOST`; the GCS tests run so, against a local
emulator, since TensorFlow's GCS client has no endpoint setting). Any other scheme (`ram://`,
`hdfs://`) goes through `tf.io.gfile`, which epath does not handle. Both are imported only on
first use, so local use stays free of the TensorFlow start-up cost.

Atomic writes: a file is written to `<path>.tmp` and renamed over `path` (atomic on POSIX file
systems). On object stores (`gs://`, `s3://`) a rename is a copy plus a delete and not atomic, but
a single upload is: the final name is written directly there.
"""

import glob as glob_lib
import json
import os
from typing import Any


_OBJECT_STORES = ('gs://', 's3://', 'az://')


def is_remote(path: str) -> bool:
  return '://' in path


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


class _EpathFiles:
  """The `tf.io.gfile` calls this module makes, on `etils.epath` (for object-store URLs)."""

  @staticmethod
  def _path(path: str):
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(path)

  def exists(self, path: str) -> bool:
    return self._path(path).exists()

  def isdir(self, path: str) -> bool:
    return self._path(path).is_dir()

  def makedirs(self, path: str) -> None:
    self._path(path).mkdir(parents=True, exist_ok=True)

  def listdir(self, path: str) -> list[str]:
    return [child.name for child in self._path(path).iterdir()]

  def glob(self, pattern: str) -> list[str]:
    # epath globs below a directory: split off the longest prefix without wildcards.
    parts = pattern.split('/')
    fixed = next(i for i, part in enumerate(parts + ['*']) if any(c in part for c in '*?['))
    if fixed == len(parts):
      return [pattern] if self.exists(pattern) else []
    root = '/'.join(parts[:fixed])
    return [str(p) for p in self._path(root).glob('/'.join(parts[fixed:]))]

  def rename(self, source: str, target: str, overwrite: bool = False) -> None:
    del overwrite  # Used for directories only, whose target never exists.
    self._path(source).rename(target)

  def GFile(self, path: str, mode: str):  # pylint: disable=invalid-name
    return self._path(path).open(mode)


def _files(path: str):
  """The file API for a URL: epath for object stores, `tf.io.gfile` for other schemes."""
  return _EpathFiles() if path.startswith(_OBJECT_STORES) else _gfile()


def join(root: str, *parts: str) -> str:
  """Joins path parts; `gs://` roots keep their `/` separators on every OS."""
  if is_remote(root):
    return '/'.join([root.rstrip('/')] + [p.strip('/') for p in parts])
  return os.path.join(root, *parts)


def exists(path: str) -> bool:
  return _files(path).exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _files(path).isdir(path) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  if is_remote(path):
    return _files(path).exists(path) and not _files(path).isdir(path)
  return os.path.isfile(path)


def abspath(path: str) -> str:
  """A local path made absolute; URLs are absolute already and come back unchanged."""
  return path if is_remote(path) else os.path.abspath(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    _files(path).makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def dirname(path: str) -> str:
  """The parent directory; a URL's root (`gs://bucket`) is its own parent, as `/` is."""
  if not is_remote(path):
    return os.path.dirname(path)
  scheme, rest = path.split('://', 1)
  return f'{scheme}://{rest.rstrip("/").rsplit("/", 1)[0]}'


def listdir(path: str) -> list[str]:
  """Sorted names of the entries of a directory (no trailing `/` on sub-directories)."""
  names = _files(path).listdir(path) if is_remote(path) else os.listdir(path)
  return sorted(n.rstrip('/') for n in names)


def rename(source: str, target: str) -> None:
  """Renames a file or directory; on object stores a copy of every object plus a delete."""
  if is_remote(source):
    _files(source).rename(source, target)
  else:
    os.rename(source, target)


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    with _files(path).GFile(path, 'rb') as f:
      return f.read()
  with open(path, 'rb') as f:
    return f.read()


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` so that a reader never sees half a file, creating parent directories.

  Serialise into `io.BytesIO` first: writers that seek or tell (zip, `np.savez`) cannot write to
  GCS files directly.
  """
  parent = dirname(path)
  if parent:
    makedirs(parent)
  if path.startswith(_OBJECT_STORES):
    with _files(path).GFile(path, 'wb') as f:
      f.write(data)
  elif is_remote(path):
    with _files(path).GFile(path + '.tmp', 'wb') as f:
      f.write(data)
    _files(path).rename(path + '.tmp', path, overwrite=True)
  else:
    with open(path + '.tmp', 'wb') as f:
      f.write(data)
    os.replace(path + '.tmp', path)


def glob(pattern: str, recursive: bool = False) -> list[str]:
  """Sorted matches of a shell-style pattern; with `recursive`, `**` matches any depth locally.

  On object stores (epath) `**` always matches any depth; `tf.io.gfile` treats it as `*`.
  """
  if is_remote(pattern):
    matches = _files(pattern).glob(pattern)
  else:
    matches = glob_lib.glob(pattern, recursive=recursive)
  return sorted(m.rstrip('/') for m in matches)


def read_text(path: str) -> str:
  if is_remote(path):
    with _files(path).GFile(path, 'r') as f:
      return f.read()
  with open(path, encoding='utf-8') as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Writes `text` as UTF-8 with `write_bytes` (never half a file)."""
  write_bytes(path, text.encode('utf-8'))


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
