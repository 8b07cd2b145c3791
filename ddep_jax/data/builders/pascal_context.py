"""Pascal Context from VOC2010 images and PASCAL-in-Detail's `trainval_merged.json`.

Sources, both read in place: `VOCtrainval_03-May-2010.tar` (images at
`VOCdevkit/VOC2010/JPEGImages/<file_name>`) and `trainval_merged.json`, whose
`images` entries carry `file_name`, `height`, `width` and `phase` ('train': 4,998, 'val': 5,105)
and whose `annos_segmentation` entries carry `image_id`, `category_id` and a COCO RLE
`segmentation` ({'size': [h, w], 'counts': compressed string or list of run lengths}).

A mask is painted as the Detail API's `getMask` does: zeros, then every annotation of the image in
file order writes its category id over its pixels. Category ids are then mapped as
MMSegmentation's `pascal_context.py` converter does: the 59 benchmark classes plus background,
sorted by category id, give train ids 0..59 (0 = background); an id outside those 60 (none in
the official file) counts as background, which is how the 59-class benchmark defines it.
Config '60' stores those ids; config '59' drops background: 0 -> 255 (ignore), k -> k - 1.
"""

import collections
import dataclasses
import functools
import json
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddep_jax import constants
from ddep_jax.data.builders import builder_utils

IMAGES_ARCHIVE = 'VOCtrainval_03-May-2010.tar'
ANNOTATIONS = 'trainval_merged.json'
IMAGES_ROOT = 'VOCdevkit/VOC2010/JPEGImages/'
_FILES = {
    IMAGES_ARCHIVE: 'http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar',
    ANNOTATIONS: 'https://codalabuser.blob.core.windows.net/public/trainval_merged.json',
}
_HOMEPAGE = 'https://cs.stanford.edu/~roozbeh/pascal-context/'
_PHASES = {'train': 'train', 'validation': 'val'}

# PASCAL-in-Detail category ids of background + the 59 classes, sorted: index = 60-class id.
SOURCE_CATEGORY_IDS = (
    0, 2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105,
    113, 115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324,
    326, 347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458)
CLASSES_60 = (
    'background', 'aeroplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat',
    'book', 'bottle', 'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth',
    'computer', 'cow', 'cup', 'curtain', 'dog', 'door', 'fence', 'floor', 'flower', 'food',
    'grass', 'ground', 'horse', 'keyboard', 'light', 'motorbike', 'mountain', 'mouse', 'person',
    'plate', 'platform', 'pottedplant', 'road', 'rock', 'sheep', 'shelves', 'sidewalk', 'sign',
    'sky', 'snow', 'sofa', 'table', 'track', 'train', 'tree', 'truck', 'tvmonitor', 'wall',
    'water', 'window', 'wood')
CLASSES_59 = CLASSES_60[1:]
_TRAIN_ID_60 = {category: i for i, category in enumerate(SOURCE_CATEGORY_IDS)}

_CITATION = """\
@inproceedings{mottaghi2014role,
  title={The Role of Context for Object Detection and Semantic Segmentation in the Wild},
  author={Mottaghi, Roozbeh and Chen, Xianjie and Liu, Xiaobai and Cho, Nam-Gyu and Lee,
          Seong-Whan and Fidler, Sanja and Urtasun, Raquel and Yuille, Alan},
  booktitle={CVPR},
  year={2014}
}"""


# ------------------------------------------------------------------------------------------------
# COCO run-length encoding (pycocotools' maskApi.c format), so that pycocotools is not needed.
# ------------------------------------------------------------------------------------------------


def rle_decode(rle: Mapping) -> np.ndarray:
  """Decodes a COCO RLE `{'size': [h, w], 'counts': str | bytes | list}` to a uint8 [h, w] mask.

  Runs alternate 0s and 1s, starting with 0s, over the pixels in column-major order.
  """
  height, width = (int(v) for v in rle['size'])
  counts = rle['counts']
  if isinstance(counts, (str, bytes)):
    counts = _counts_from_string(counts.encode('ascii') if isinstance(counts, str) else counts)
  counts = np.asarray(counts, dtype=np.int64)
  if (counts < 0).any() or counts.sum() != height * width:
    raise ValueError(f'RLE counts sum to {counts.sum()} (min {counts.min(initial=0)}) but the '
                     f'mask has {height}x{width} = {height * width} pixels.')
  values = (np.arange(len(counts)) % 2).astype(np.uint8)
  return np.repeat(values, counts).reshape(width, height).T


def rle_encode(mask: np.ndarray, compressed: bool = True) -> dict:
  """Encodes a binary [h, w] mask as a COCO RLE (`counts` as a compressed string or a list)."""
  flat = np.asarray(mask, dtype=bool).T.reshape(-1)  # Column-major.
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
  if flat.size and flat[0]:
    counts = [0] + counts  # Runs start with 0s.
  return {'size': [int(mask.shape[0]), int(mask.shape[1])],
          'counts': _counts_to_string(counts) if compressed else counts}


def _counts_from_string(data: bytes) -> list[int]:
  # Each count is stored in 5-bit groups (0x20 = "more groups follow", 0x10 of the last group =
  # sign), offset by 48 to be printable; from the 4th count on, as the difference to the count two
  # before.
  counts, position = [], 0
  while position < len(data):
    value, shift, more = 0, 0, True
    while more:
      if position >= len(data):
        raise ValueError('RLE counts string ends in the middle of a number.')
      group = data[position] - 48
      value |= (group & 0x1f) << shift
      more = bool(group & 0x20)
      position += 1
      shift += 5
      if not more and group & 0x10:
        value |= -1 << shift
    if len(counts) > 2:
      value += counts[-2]
    counts.append(value)
  return counts


def _counts_to_string(counts: Sequence[int]) -> str:
  chars = []
  for i, count in enumerate(counts):
    value = count - counts[i - 2] if i > 2 else count
    more = True
    while more:
      group = value & 0x1f
      value >>= 5
      more = value != -1 if group & 0x10 else value != 0
      chars.append(chr((group | (0x20 if more else 0)) + 48))
  return ''.join(chars)


# ------------------------------------------------------------------------------------------------
# Masks.
# ------------------------------------------------------------------------------------------------


def paint_mask(annotations: Sequence[Mapping], height: int, width: int, *, example: str
               ) -> np.ndarray:
  """The 60-class train-id mask (uint8 [h, w], 0 = background) of one image's annotations."""
  mask = np.zeros((height, width), np.uint8)
  for annotation in annotations:
    try:
      region = rle_decode(annotation['segmentation'])
    except (KeyError, TypeError, ValueError) as e:
      raise builder_utils.CorruptExampleError(
          f'{example}: annotation {annotation.get("id")} has an unreadable RLE '
          f'segmentation ({e}).') from e
    if region.shape != (height, width):
      raise builder_utils.CorruptExampleError(
          f'{example}: annotation {annotation.get("id")} is {region.shape[0]}x'
          f'{region.shape[1]} but the image is {height}x{width}.')
    mask[region.astype(bool)] = _TRAIN_ID_60.get(int(annotation['category_id']), 0)
  return mask


def to_59_classes(mask_60: np.ndarray) -> np.ndarray:
  """60-class ids -> 59-class ids: background 0 -> 255 (ignore), k -> k - 1."""
  return np.where(mask_60 == 0, constants.IGNORE_LABEL,
                  mask_60.astype(np.int32) - 1).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Builder.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class PascalContextConfig(builder_utils.ManualDataConfig):
  """Attributes: num_classes: 60 (background is class 0) or 59 (background is ignored, 255)."""
  num_classes: int = 59


class PascalContext(tfds.core.GeneratorBasedBuilder):
  """Pascal Context semantic segmentation, 59 or 60 classes, masks in train ids."""

  name = 'ddep_pascal_context'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      PascalContextConfig(name='59', num_classes=59,
                          description='59 classes (ids 0..58); background is 255 (ignore).'),
      PascalContextConfig(name='60', num_classes=60,
                          description='60 classes (ids 0..59); 0 is background.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = builder_utils.manual_download_instructions(
      'ddep_pascal_context', _FILES,
      extra=f'Dataset pages: {_HOMEPAGE} and https://sites.google.com/view/pasd/home')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=('Pascal Context (VOC2010 images, PASCAL-in-Detail annotations): 4,998 train '
                     'and 5,105 validation images; masks hold train ids.'),
        features=tfds.features.FeaturesDict({
            'image': builder_utils.image_feature(),
            'segmentation_mask': builder_utils.mask_feature(),
            'image_id': tfds.features.Text(),
        }),
        supervised_keys=('image', 'segmentation_mask'),
        homepage=_HOMEPAGE,
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    if self.builder_config.num_classes not in (59, 60):
      raise ValueError(f'num_classes must be 59 or 60, got {self.builder_config.num_classes}.')
    paths = builder_utils.require_manual_files(self.name, dl_manager.manual_dir, _FILES)
    images, annotations = _read_annotations(paths[ANNOTATIONS])
    return {split: self._generate_examples(paths[IMAGES_ARCHIVE], images[phase], annotations,
                                           split)
            for split, phase in _PHASES.items()}

  def _generate_examples(self, archive, images: Sequence[Mapping],
                         annotations: Mapping[int, list], split: str):
    with builder_utils.TarMembers(archive) as tar:
      loaders = []
      for image in sorted(images, key=lambda image: image['file_name']):
        image_id = builder_utils.stem(image['file_name'])
        loaders.append((image_id, functools.partial(
            self._load, tar, image, annotations.get(image['image_id'], []), image_id)))
      yield from builder_utils.generate_checked(
          loaders, skip_corrupt=self.builder_config.skip_corrupt_images, dataset=self.name,
          split=split)

  def _load(self, tar: builder_utils.TarMembers, image: Mapping, annotations: list,
            image_id: str) -> dict:
    name = IMAGES_ROOT + image['file_name']
    where = f'{image_id} ({IMAGES_ARCHIVE}:{name})'
    data, (height, width) = builder_utils.encode_image(tar.read(name), example=where)
    if (height, width) != (image['height'], image['width']):
      raise builder_utils.CorruptExampleError(
          f'{where}: the image is {height}x{width} but {ANNOTATIONS} says '
          f'{image["height"]}x{image["width"]}.')
    mask = paint_mask(annotations, height, width, example=where)
    if self.builder_config.num_classes == 59:
      mask = to_59_classes(mask)
    return {'image': data, 'segmentation_mask': mask[..., None], 'image_id': image_id}


def _read_annotations(path) -> tuple[dict[str, list], dict[int, list]]:
  """Returns ({phase: [image entries]}, {image_id: [annotations in file order]})."""
  with tf.io.gfile.GFile(str(path), 'r') as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON ({e}); download {ANNOTATIONS} again.') from e
  missing = [key for key in ('images', 'annos_segmentation') if key not in data]
  if missing:
    raise ValueError(f'{path} lacks the key(s) {missing}; expected PASCAL-in-Detail\'s '
                     f'{ANNOTATIONS} from {_FILES[ANNOTATIONS]}.')
  images = collections.defaultdict(list)
  for image in data['images']:
    images[image['phase']].append(image)
  for phase in _PHASES.values():
    if not images[phase]:
      raise ValueError(f'{path} has no images with phase {phase!r}.')
  annotations = collections.defaultdict(list)
  for annotation in data['annos_segmentation']:
    annotations[annotation['image_id']].append(annotation)
  return images, annotations
