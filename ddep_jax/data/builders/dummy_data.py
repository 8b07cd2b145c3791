r"""Writes tiny archives in the real layout of each dataset source, for offline tests and trials.

  python -m ddep_jax.data.builders.dummy_data --out=/tmp/manual

writes, into one directory usable as TFDS `manual_dir`:
  ADEChallengeData2016.zip                   (ddep_ade20k)
  VOCtrainval_11-May-2012.tar                (ddep_voc2012)
  VOCtrainval_03-May-2010.tar, trainval_merged.json   (ddep_pascal_context)
  fall11_whole.tar, winter21_whole.tar.gz    (ddep_imagenet21k; build them with an
                                              Imagenet21kConfig whose num_classes = 3)
  leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip   (TFDS's cityscapes)

Every `write_*` function returns the label maps it wrote (`{split: {image_id: uint8 [H, W]}}`)
so that tests can compare what a builder decodes with what was written. Images are small smooth
random pictures; `corrupt` names examples whose image bytes are written truncated.
"""

import io
import json
import pathlib
import tarfile
import zipfile
from typing import Iterable, Sequence

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from ddep_jax.data.builders import pascal_context

# ------------------------------------------------------------------------------------------------
# Small helpers.
# ------------------------------------------------------------------------------------------------


def _picture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A smooth random RGB picture (compresses well, survives JPEG recognisably)."""
  y, x = np.mgrid[0:height, 0:width]
  channels = [np.sin(x / (3 + 5 * rng.random()) + y / (4 + 6 * rng.random()) + 6 * rng.random())
              for _ in range(3)]
  return ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)


def _blocks(rng: np.random.Generator, height: int, width: int, values: Sequence[int],
            num_blocks: int = 4) -> np.ndarray:
  """A label map of random rectangles drawn from `values` over a `values[0]` background."""
  labels = np.full((height, width), values[0], np.uint8)
  for _ in range(num_blocks):
    top, left = rng.integers(0, height - 2), rng.integers(0, width - 2)
    bottom, right = rng.integers(top + 2, height + 1), rng.integers(left + 2, width + 1)
    labels[top:bottom, left:right] = values[int(rng.integers(len(values)))]
  return labels


def _encode(image: np.ndarray | Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(
      buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _jpeg(array: np.ndarray, truncate: bool = False) -> bytes:
  data = _encode(array, 'JPEG', quality=90)
  return data[:len(data) // 2] if truncate else data


def _palette_png(labels: np.ndarray) -> bytes:
  """A palette ('P') PNG whose indices are `labels`, with the VOC colour map."""
  image = Image.fromarray(labels, mode='P')
  image.putpalette(voc_colour_map())
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  return buffer.getvalue()


def voc_colour_map() -> list[int]:
  """The 256-entry VOC palette (flattened RGB): bits of the index spread over R, G, B."""
  palette = []
  for index in range(256):
    r = g = b = 0
    value = index
    for shift in range(7, -1, -1):
      r |= (value & 1) << shift
      g |= ((value >> 1) & 1) << shift
      b |= ((value >> 2) & 1) << shift
      value >>= 3
    palette += [r, g, b]
  return palette


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  info.mtime = 1_300_000_000
  tar.addfile(info, io.BytesIO(data))


def _size(rng: np.random.Generator) -> tuple[int, int]:
  return int(rng.integers(20, 33)), int(rng.integers(24, 41))


# ------------------------------------------------------------------------------------------------
# Datasets.
# ------------------------------------------------------------------------------------------------


def write_ade20k(out_dir, *, num_train: int = 3, num_validation: int = 2,
                 corrupt: Iterable[str] = (), seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """ADEChallengeData2016.zip: images/ and annotations/ {training,validation}, raw 0..150."""
  rng, corrupt = np.random.default_rng(seed), set(corrupt)
  root = 'ADEChallengeData2016/'
  written = {}
  with zipfile.ZipFile(pathlib.Path(out_dir) / 'ADEChallengeData2016.zip', 'w') as zf:
    zf.writestr(root + 'objectInfo150.txt', 'Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172'
                '\twall\n')
    zf.writestr(root + 'sceneCategories.txt', 'ADE_train_00000001 airport_terminal\n')
    annotations = []
    for split, folder, prefix, count in (('train', 'training', 'ADE_train_', num_train),
                                         ('validation', 'validation', 'ADE_val_', num_validation)):
      written[split] = {}
      for index in range(1, count + 1):
        image_id = f'{prefix}{index:08d}'
        height, width = _size(rng)
        labels = _blocks(rng, height, width, [0, 1, 13, 150, 77])
        zf.writestr(f'{root}images/{folder}/{image_id}.jpg',
                    _jpeg(_picture(rng, height, width), truncate=image_id in corrupt))
        annotations.append((f'{root}annotations/{folder}/{image_id}.png', _encode(labels, 'PNG')))
        written[split][image_id] = labels
    # All annotations after all images, in reverse order: pairing must go by file name.
    for name, data in reversed(annotations):
      zf.writestr(name, data)
  return written


def write_voc2012(out_dir, *, num_train: int = 2, num_validation: int = 2, num_unlabelled: int = 1,
                  corrupt: Iterable[str] = (), seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """VOCtrainval_11-May-2012.tar; also returns `'images'`: every JPEG id (value None)."""
  rng, corrupt = np.random.default_rng(seed), set(corrupt)
  root = 'VOCdevkit/VOC2012/'
  ids = [f'2007_{index:06d}' for index in range(num_train + num_validation + num_unlabelled)]
  split_ids = {'train': ids[:num_train], 'validation': ids[num_train:num_train + num_validation]}
  written = {'train': {}, 'validation': {}, 'images': {image_id: None for image_id in ids}}
  with tarfile.open(pathlib.Path(out_dir) / 'VOCtrainval_11-May-2012.tar', 'w') as tar:
    for image_id in ids:
      height, width = _size(rng)
      _add(tar, f'{root}JPEGImages/{image_id}.jpg',
           _jpeg(_picture(rng, height, width), truncate=image_id in corrupt))
      split = next((s for s, members in split_ids.items() if image_id in members), None)
      if split:
        labels = _blocks(rng, height, width, [0, 15, 20, 255, 1])
        _add(tar, f'{root}SegmentationClass/{image_id}.png', _palette_png(labels))
        _add(tar, f'{root}SegmentationObject/{image_id}.png', _palette_png(labels))
        written[split][image_id] = labels
      _add(tar, f'{root}Annotations/{image_id}.xml', b'<annotation></annotation>')
    for split, name in (('train', 'train.txt'), ('validation', 'val.txt')):
      _add(tar, f'{root}ImageSets/Segmentation/{name}', ''.join(
          f'{image_id}\n' for image_id in split_ids[split]).encode())
    _add(tar, f'{root}ImageSets/Segmentation/trainval.txt', ''.join(
        f'{image_id}\n' for image_id in split_ids['train'] + split_ids['validation']).encode())
  return written


# Category ids painted into the Pascal Context dummy masks: background 0, aeroplane 2, bag 9,
# person 284, wood 458 (the last of the 59), and 1, which is not one of the 59 classes.
PASCAL_CONTEXT_DUMMY_CATEGORIES = (2, 9, 284, 458, 1)


def write_pascal_context(out_dir, *, num_train: int = 2, num_validation: int = 2,
                         corrupt: Iterable[str] = (), seed: int = 0
                         ) -> dict[str, dict[str, np.ndarray]]:
  """VOCtrainval_03-May-2010.tar + trainval_merged.json; returns raw category-id masks.

  Annotations are rectangles painted in file order (later ones cover earlier ones), stored as
  the visible part of each rectangle, alternately with compressed and list RLE counts.
  """
  rng, corrupt = np.random.default_rng(seed), set(corrupt)
  root = 'VOCdevkit/VOC2010/'
  images, annotations, written = [], [], {'train': {}, 'validation': {}}
  phases = ['train'] * num_train + ['val'] * num_validation
  with tarfile.open(pathlib.Path(out_dir) / 'VOCtrainval_03-May-2010.tar', 'w') as tar:
    for index, phase in enumerate(phases):
      file_stem = f'2008_{index:06d}'
      image_id = 2008_000000 + index
      height, width = _size(rng)
      _add(tar, f'{root}JPEGImages/{file_stem}.jpg',
           _jpeg(_picture(rng, height, width), truncate=file_stem in corrupt))
      images.append({'image_id': image_id, 'file_name': f'{file_stem}.jpg', 'height': height,
                     'width': width, 'phase': phase, 'date_captured': '03-May-2010'})
      categories = np.zeros((height, width), np.int32)
      owner = np.full((height, width), -1)
      rects = []
      for k, category in enumerate(PASCAL_CONTEXT_DUMMY_CATEGORIES):
        top, left = rng.integers(0, height - 4), rng.integers(0, width - 4)
        rects.append((category, top, left, rng.integers(top + 3, height + 1),
                      rng.integers(left + 3, width + 1)))
        owner[rects[-1][1]:rects[-1][3], rects[-1][2]:rects[-1][4]] = k
        categories[rects[-1][1]:rects[-1][3], rects[-1][2]:rects[-1][4]] = category
      for k, (category, *_) in enumerate(rects):
        # The Detail file stores whole regions that may overlap; store the full rectangle for
        # even k and only its visible part for odd k, so that both cases are exercised.
        region = np.zeros((height, width), bool)
        top, left, bottom, right = rects[k][1:]
        region[top:bottom, left:right] = True
        if k % 2:
          region &= owner == k
        # Odd k: uncompressed counts, as some COCO-style files have.
        rle = pascal_context.rle_encode(region, compressed=k % 2 == 0)
        annotations.append({'id': len(annotations) + 1, 'image_id': image_id,
                            'category_id': int(category), 'segmentation': rle,
                            'area': int(region.sum()), 'iscrowd': 0, 'parts': [],
                            'bbox': [int(left), int(top), int(right - left), int(bottom - top)]})
      written['train' if phase == 'train' else 'validation'][file_stem] = categories
  data = {'info': {'description': 'dummy PASCAL in Detail'}, 'images': images,
          'annos_segmentation': annotations, 'annos_occlusion': [], 'annos_boundary': [],
          'annos_joints': [], 'parts': [],
          'categories': [{'category_id': c, 'name': f'category_{c}', 'supercategory': 'object',
                          'onlysemantic': 0, 'parts': []}
                         for c in PASCAL_CONTEXT_DUMMY_CATEGORIES]}
  (pathlib.Path(out_dir) / 'trainval_merged.json').write_text(json.dumps(data))
  return written


IMAGENET_DUMMY_SYNSETS = ('n01440764', 'n02084071', 'n15075141')


def write_imagenet21k(out_dir, *, release: str = 'fall11',
                      synsets: Sequence[str] = IMAGENET_DUMMY_SYNSETS, images_per_synset: int = 2,
                      corrupt: Iterable[str] = (), write_synsets_file: bool = False, seed: int = 0
                      ) -> dict[str, str]:
  """fall11_whole.tar or winter21_whole.tar.gz (tar of per-synset tars); returns {id: synset}.

  The first synset's second image is a PNG named .JPEG and its third (if any) a CMYK JPEG,
  as some ImageNet files are.
  """
  rng, corrupt = np.random.default_rng(seed), set(corrupt)
  if release == 'fall11':
    path, mode, prefix = pathlib.Path(out_dir) / 'fall11_whole.tar', 'w', ''
  elif release == 'winter21':
    path, mode, prefix = pathlib.Path(out_dir) / 'winter21_whole.tar.gz', 'w:gz', 'winter21_whole/'
  else:
    raise ValueError(f'release must be fall11 or winter21, got {release!r}.')
  written = {}
  with tarfile.open(path, mode) as outer:
    # Archive order is not sorted order, so labels must not follow it.
    for synset in reversed(synsets):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as inner_tar:
        for index in range(images_per_synset):
          image_id = f'{synset}_{10 + index}'
          picture = _picture(rng, *_size(rng))
          if synset == synsets[0] and index == 1:
            data = _encode(picture, 'PNG')
          elif synset == synsets[0] and index == 2:
            data = _encode(Image.fromarray(picture).convert('CMYK'), 'JPEG')
          else:
            data = _jpeg(picture, truncate=image_id in corrupt)
          _add(inner_tar, f'{image_id}.JPEG', data)
          written[image_id] = synset
      _add(outer, f'{prefix}{synset}.tar', inner.getvalue())
  if write_synsets_file:
    (pathlib.Path(out_dir) / f'{release}_synsets.txt').write_text('\n'.join(synsets) + '\n')
  return written


CITYSCAPES_SIZE = (1024, 2048)  # TFDS's cityscapes builder fixes this shape.
CITYSCAPES_CAR_BOX = np.s_[600:700, 1000:1200]


def write_cityscapes(out_dir, *, cities: Sequence[tuple[str, str]] = (
    ('train', 'aachen'), ('train', 'bochum'), ('val', 'frankfurt'), ('test', 'berlin')),
                     seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip; returns labelIds maps (0..33)."""
  rng = np.random.default_rng(seed)
  height, width = CITYSCAPES_SIZE
  written = {'train': {}, 'validation': {}, 'test': {}}
  out_dir = pathlib.Path(out_dir)
  with zipfile.ZipFile(out_dir / 'leftImg8bit_trainvaltest.zip', 'w') as images, \
       zipfile.ZipFile(out_dir / 'gtFine_trainvaltest.zip', 'w') as labels:
    for archive in (images, labels):
      archive.writestr('README', 'Cityscapes dummy data\n')
      archive.writestr('license.txt', 'dummy\n')
    for split, city in cities:
      image_id = f'{city}_000000_000019'
      image = np.zeros((height, width, 3), np.uint8)
      image[:] = rng.integers(0, 256, 3)
      image[height // 4:height // 2, width // 4:width // 2] = rng.integers(0, 256, 3)
      label_ids = _blocks(rng, height, width, [7, 26, 11, 0, 33, 24])
      label_ids[CITYSCAPES_CAR_BOX] = 26  # A known pixel for tests: a car (raw id 26).
      images.writestr(f'leftImg8bit/{split}/{city}/{image_id}_leftImg8bit.png',
                      _encode(image, 'PNG', compress_level=1))
      labels.writestr(f'gtFine/{split}/{city}/{image_id}_gtFine_labelIds.png',
                      _encode(label_ids, 'PNG', compress_level=1))
      labels.writestr(f'gtFine/{split}/{city}/{image_id}_gtFine_polygons.json',
                      json.dumps({'imgHeight': height, 'imgWidth': width, 'objects': []}))
      written['validation' if split == 'val' else split][image_id] = label_ids
  return written


WRITERS = {
    'ade20k': write_ade20k,
    'voc2012': write_voc2012,
    'pascal_context': write_pascal_context,
    'imagenet21k': lambda out_dir: (write_imagenet21k(out_dir, release='fall11'),
                                    write_imagenet21k(out_dir, release='winter21')),
    'cityscapes': write_cityscapes,
}

FLAGS = flags.FLAGS


FLAG_NAMES = ('out', 'datasets')


def define_flags() -> None:
  """Defines --out and --datasets (`main`'s flags) on the global flags.

  Called only when run as a script (or by a test): importing this module next to other
  command-line tools must not claim global flag names such as --out.
  """
  flags.DEFINE_string('out', None, 'Directory to write the archives into (created).')
  flags.DEFINE_list('datasets', list(WRITERS), f'Which of {list(WRITERS)} to write.')


def main(argv: Sequence[str]) -> None:
  del argv
  unknown = set(FLAGS.datasets) - set(WRITERS)
  if unknown:
    raise app.UsageError(f'Unknown --datasets {sorted(unknown)}; choose from {list(WRITERS)}.')
  out_dir = pathlib.Path(FLAGS.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  for name in FLAGS.datasets:
    WRITERS[name](out_dir)
  print(f'Wrote {", ".join(FLAGS.datasets)} dummy archives to {out_dir}:')
  for path in sorted(out_dir.iterdir()):
    print(f'  {path.name}  ({path.stat().st_size:,} bytes)')


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('out')
  app.run(main)
