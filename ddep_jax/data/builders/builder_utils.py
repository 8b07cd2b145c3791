"""Pieces shared by the project TFDS builders.

Manual-download checks, the image / label-mask features and their validation, corrupt-example
handling, and random access into uncompressed tar archives. Every builder reads its archives in
place (zip or tar members, no extraction to disk), validates each image by decoding it once, and
either fails with an error naming the example or, when its config sets `skip_corrupt_images`,
skips and counts it.
"""

import dataclasses
import io
import tarfile
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

# Images are stored as JPEG: the sources are JPEG, and re-encoding them would only lose quality.
JPEG_QUALITY = 95


def image_feature() -> tfds.features.Image:
  """RGB image of any size, stored as JPEG."""
  return tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg')


def mask_feature() -> tfds.features.Image:
  """Single-channel uint8 label map of any size, stored as (lossless) PNG."""
  return tfds.features.Image(shape=(None, None, 1), encoding_format='png')


@dataclasses.dataclass(eq=False)
class ManualDataConfig(tfds.core.BuilderConfig):
  """Config of a builder that reads manually downloaded archives.

  Attributes:
    skip_corrupt_images: if True, an example whose image or label map cannot be decoded is
      skipped, logged and counted; if False (default), it stops the build with an error naming it.
  """
  skip_corrupt_images: bool = False


def manual_download_instructions(dataset: str, files: Mapping[str, str], extra: str = '') -> str:
  """The `MANUAL_DOWNLOAD_INSTRUCTIONS` text: which file to fetch from where."""
  lines = [f'{dataset} needs these files, downloaded by hand, in `manual_dir` (by default',
           '<data_dir>/downloads/manual/, or DownloadConfig(manual_dir=...)):']
  lines += [f'  * {name}  <- {url}' for name, url in files.items()]
  lines.append('Put the archives there as downloaded: do not extract them.')
  if extra:
    lines.append(extra)
  return '\n'.join(lines) + '\n'


def require_manual_files(dataset: str, manual_dir: epath.PathLike, files: Mapping[str, str]
                         ) -> dict[str, epath.Path]:
  """Returns `{file name: path}` for the manual files, or raises naming every missing one.

  Args:
    dataset: builder name, for the message.
    manual_dir: the directory the files must be in.
    files: `{file name: download page}`.

  Raises:
    FileNotFoundError: listing the missing files, their download pages and the directory.
  """
  manual_dir = epath.Path(manual_dir)
  paths = {name: manual_dir / name for name in files}
  missing = [name for name, path in paths.items() if not path.exists()]
  if missing:
    listing = '\n'.join(f'  * {name}  <- {files[name]}' for name in missing)
    raise FileNotFoundError(
        f'{dataset}: missing manual download file(s) in {manual_dir}:\n{listing}\n'
        f'Download them and put them in {manual_dir} as they are (do not extract them), or point '
        'DownloadConfig(manual_dir=...) to the directory that holds them.')
  return paths


class CorruptExampleError(ValueError):
  """An image or label map of one example cannot be used."""


def encode_image(data: bytes, *, example: str) -> tuple[bytes, tuple[int, int]]:
  """Validates an image by decoding it; returns (JPEG bytes, (height, width)).

  RGB and greyscale JPEGs are returned unchanged; anything else TensorFlow's JPEG decoder may not
  read (CMYK JPEGs, PNG/GIF files named .JPEG, as found in ImageNet) is converted to RGB JPEG.

  Raises:
    CorruptExampleError: naming `example` when the bytes do not decode.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      height, width = image.height, image.width
      if image.format == 'JPEG' and image.mode in ('RGB', 'L'):
        return data, (height, width)
      converted = image.convert('RGB')
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise CorruptExampleError(f'{example}: the image does not decode ({e}).') from e
  buffer = io.BytesIO()
  converted.save(buffer, format='JPEG', quality=JPEG_QUALITY)
  return buffer.getvalue(), (height, width)


def decode_label_png(data: bytes, *, example: str, size: tuple[int, int] | None = None
                     ) -> np.ndarray:
  """Decodes a single-channel label PNG to uint8 [H, W, 1] with the stored values.

  Palette PNGs (VOC) give their palette indices, greyscale PNGs (ADE20K) their values.

  Args:
    data: the PNG bytes.
    example: name of the example, for errors.
    size: expected (height, width), i.e. the image's.

  Raises:
    CorruptExampleError: if the PNG does not decode, is not single-channel 8 bit, or its size
      differs from `size`.
  """
  try:
    with Image.open(io.BytesIO(data)) as label:
      label.load()
      mode = label.mode
      values = np.asarray(label) if mode in ('P', 'L') else None
  except (OSError, SyntaxError, ValueError) as e:
    raise CorruptExampleError(f'{example}: the label map does not decode ({e}).') from e
  if values is None:
    raise CorruptExampleError(
        f'{example}: the label map has PIL mode {mode!r}; expected a single-channel 8-bit '
        "PNG (mode 'P' palette indices or 'L' greyscale) holding class indices.")
  if size is not None and values.shape != tuple(size):
    raise CorruptExampleError(
        f'{example}: the label map is {values.shape[0]}x{values.shape[1]} (HxW) but the image '
        f'is {size[0]}x{size[1]}.')
  return values.astype(np.uint8)[..., None]


def generate_checked(loaders: Iterable[tuple[str, Callable[[], dict]]], *, skip_corrupt: bool,
                     dataset: str, split: str) -> Iterator[tuple[str, dict]]:
  """Yields `(key, example)`, loading each example with its loader in order.

  A loader raising `CorruptExampleError` stops the build, or, with `skip_corrupt`, the example is
  skipped, logged and counted (the count is logged at the end of the split).
  """
  skipped = []
  for key, load in loaders:
    try:
      example = load()
    except CorruptExampleError as e:
      if not skip_corrupt:
        raise CorruptExampleError(
            f'{dataset}/{split}: {e} Replace the file, or build with a config that sets '
            'skip_corrupt_images=True to skip such examples.') from e
      skipped.append(key)
      logging.warning('%s/%s: skipping corrupt example: %s', dataset, split, e)
      continue
    yield key, example
  if skipped:
    logging.warning('%s/%s: skipped %d corrupt example(s): %s', dataset, split, len(skipped),
                    ', '.join(skipped))


class TarMembers:
  """Random access to the files of an uncompressed tar, read in place (no extraction).

  Opening reads only the member headers (seeking past the data), so a multi-GB tar such as VOC's
  is indexed in seconds; `read` then seeks to one member.
  """

  def __init__(self, path: epath.PathLike):
    self.path = epath.Path(path)
    self._file = tf.io.gfile.GFile(str(self.path), 'rb')
    try:
      self._tar = tarfile.open(fileobj=self._file, mode='r:')
      members = self._tar.getmembers()
    except (tarfile.TarError, EOFError) as e:
      self._file.close()
      raise ValueError(f'{self.path} is not a readable (uncompressed) tar archive ({e}). '
                       'Download it again.') from e
    self.members = {_normalise(m.name): m for m in members if m.isfile()}

  def names(self, prefix: str, suffix: str = '') -> list[str]:
    """Sorted member names that start with `prefix` and end with `suffix`."""
    return sorted(n for n in self.members if n.startswith(prefix) and n.endswith(suffix))

  def read(self, name: str) -> bytes:
    """The bytes of member `name`."""
    if name not in self.members:
      raise FileNotFoundError(f'{name} is not in {self.path}; is this the right archive?')
    return self._tar.extractfile(self.members[name]).read()

  def close(self):
    self._tar.close()
    self._file.close()

  def __enter__(self) -> 'TarMembers':
    return self

  def __exit__(self, *exc):
    self.close()


def _normalise(name: str) -> str:
  return name[2:] if name.startswith('./') else name


def stem(name: str) -> str:
  """'a/b/ADE_train_00000001.jpg' -> 'ADE_train_00000001'."""
  return name.rsplit('/', 1)[-1].rsplit('.', 1)[0]


def check_pairs(images: Sequence[str], labels: Sequence[str], *, where: str) -> None:
  """Raises if image and label file stems do not pair one to one."""
  image_stems, label_stems = set(map(stem, images)), set(map(stem, labels))
  if image_stems != label_stems:
    no_label = sorted(image_stems - label_stems)
    no_image = sorted(label_stems - image_stems)
    raise ValueError(
        f'{where}: images and annotations do not pair by file name. Images without annotation '
        f'({len(no_label)}): {no_label[:10]}; annotations without image ({len(no_image)}): '
        f'{no_image[:10]}. The archive is incomplete or not the original one.')
