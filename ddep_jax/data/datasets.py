"""Dataset registry: short name -> TFDS builder, feature keys, label mapping, #classes.

Every dataset the pipelines read is described by a `DatasetSpec`. Segmentation specs carry a
256-entry lookup table applied in tf.data to the stored mask values:

* a train id in `[0, num_classes)`,
* `IGNORE_LABEL` (255) for values the benchmark ignores (Cityscapes void classes, ADE20K "other"),
* `UNEXPECTED_LABEL` (-1) for values the dataset never stores; the pipeline maps them to 255 too,
  but counts them per example (`num_invalid_label_pixels`) so corrupt masks are noticed.

Names: `cityscapes`, `cityscapes_fine_coarse`, `ade20k`, `pascal_context_59`,
`pascal_context_60`, `voc2012`, `voc2012_images`, `imagenet21k_fall11`, `imagenet21k_winter21`,
`digit_scenes`, `digit_scenes_classification`, `digit_scenes_unlabeled`, and any TFDS image
dataset as `tfds:<name>` (e.g. `tfds:imagenet2012`). Any spec's images can feed denoising
pretraining (paper Table 3 pretrains decoders on the target datasets' own images).
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddep_jax.constants import IGNORE_LABEL
from ddep_jax.data import subsets
from ddep_jax.data.builders import ade20k
from ddep_jax.data.builders import pascal_context
from ddep_jax.data.builders import voc2012

# Marks stored mask values a dataset never uses; mapped to IGNORE_LABEL and counted.
UNEXPECTED_LABEL = -1

TFDS_PREFIX = 'tfds:'

SEGMENTATION = 'segmentation'
CLASSIFICATION = 'classification'
IMAGES = 'images'


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read one dataset.

  Attributes:
    name: the short name used in configs.
    tfds_name: TFDS builder name, with config (`'cityscapes/semantic_segmentation'`).
    kind: `'segmentation'`, `'classification'` or `'images'` (unlabelled).
    image_key: feature holding the RGB image.
    label_key: segmentation mask (`Image(shape=(None, None, 1))`) or `ClassLabel` feature.
    id_key: `Text` feature with a stable example id (subsets, split files, augmentation seeds).
    num_classes: classes of the train ids / class labels; None to read it from the ClassLabel.
    label_table: int32 [256] stored mask value -> train id / 255 / UNEXPECTED_LABEL.
    class_names: names of the train ids, when known.
    crop_size: (height, width) of segmentation training crops (paper §5: 1024 Cityscapes,
      512 ADE20K and Pascal Context).
    train_split, eval_split: default split names.
  """
  name: str
  tfds_name: str
  kind: str
  image_key: str = 'image'
  label_key: str | None = None
  id_key: str | None = 'image_id'
  num_classes: int | None = None
  label_table: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
  class_names: tuple[str, ...] | None = None
  crop_size: tuple[int, int] = (512, 512)
  train_split: str = 'train'
  eval_split: str = 'validation'


def make_label_table(mapping: dict[int, int], expected_values) -> np.ndarray:
  """Builds a 256-entry table: `mapping[v]` for mapped values, 255 for the other expected values.

  Values not in `expected_values` (nor 255, the universal ignore value) map to UNEXPECTED_LABEL.
  """
  table = np.full([256], UNEXPECTED_LABEL, np.int32)
  table[list(expected_values)] = IGNORE_LABEL
  table[IGNORE_LABEL] = IGNORE_LABEL
  for stored, train_id in mapping.items():
    table[stored] = train_id
  return table


def _identity_table(num_classes: int) -> np.ndarray:
  return make_label_table({k: k for k in range(num_classes)}, range(num_classes))


# Cityscapes label ids (cityscapesScripts labels.py) -> the 19 evaluated train ids.
CITYSCAPES_LABEL_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
CITYSCAPES_CLASSES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
    'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train',
    'motorcycle', 'bicycle')

# Class names follow each builder's own id order (`CLASSES` in `ddep_jax.data.builders`), so
# per-class results are labelled by the ids the masks hold.
# ADEChallengeData2016 (objectInfo150 order); stored value k+1 is class k, 0 ("other") ignored.
ADE20K_CLASSES = ade20k.CLASSES
VOC_CLASSES = voc2012.CLASSES
# Pascal Context as MMSegmentation orders it (alphabetical after background; the builder maps
# PASCAL-in-Detail's sorted category ids to these); the 59-class set drops background.
PASCAL_CONTEXT_60_CLASSES = pascal_context.CLASSES_60
PASCAL_CONTEXT_59_CLASSES = pascal_context.CLASSES_59

DIGIT_SCENES_CLASSES = ('background',) + tuple(str(d) for d in range(10))
# The same scenes as foreground / background: every digit is one class.
DIGIT_SCENES_FOREGROUND_CLASSES = ('background', 'digit')

_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec, *, overwrite: bool = False) -> DatasetSpec:
  """Adds `spec` to the registry (e.g. a project-specific segmentation dataset)."""
  if spec.kind not in (SEGMENTATION, CLASSIFICATION, IMAGES):
    raise ValueError(f'DatasetSpec {spec.name!r}: kind must be one of '
                     f'{(SEGMENTATION, CLASSIFICATION, IMAGES)}, got {spec.kind!r}.')
  if spec.kind == SEGMENTATION:
    if spec.label_key is None or spec.num_classes is None or spec.label_table is None:
      raise ValueError(f'Segmentation DatasetSpec {spec.name!r} needs label_key, num_classes '
                       'and label_table.')
    table = np.asarray(spec.label_table)
    if table.shape != (256,) or not np.all(
        (table == UNEXPECTED_LABEL) | (table == IGNORE_LABEL)
        | ((table >= 0) & (table < spec.num_classes))):
      raise ValueError(f'DatasetSpec {spec.name!r}: label_table must have 256 entries, each a '
                       f'train id in [0, {spec.num_classes}), {IGNORE_LABEL} or '
                       f'{UNEXPECTED_LABEL}.')
  if spec.name in _REGISTRY and not overwrite:
    raise ValueError(f'Dataset {spec.name!r} is already registered; pass overwrite=True.')
  _REGISTRY[spec.name] = spec
  return spec


def unregister_dataset(name: str) -> None:
  _REGISTRY.pop(name, None)


def registered_names() -> list[str]:
  return sorted(_REGISTRY)


def get_spec(name: str) -> DatasetSpec:
  """Returns the spec of a registered name, or a generic image spec for `tfds:<name>`."""
  if name.startswith(TFDS_PREFIX):
    tfds_name = name[len(TFDS_PREFIX):]
    if not tfds_name:
      raise ValueError(f'Dataset {name!r}: give a TFDS name after {TFDS_PREFIX!r}, '
                       'e.g. "tfds:imagenet2012".')
    # Generic TFDS image datasets: 'image' for denoising, 'label' when classifying. There is
    # no portable id feature, so augmentation seeds fall back to TFDS's own example ids.
    return DatasetSpec(name=name, tfds_name=tfds_name, kind=CLASSIFICATION, image_key='image',
                       label_key='label', id_key=None)
  if name not in _REGISTRY:
    raise ValueError(f'Unknown dataset {name!r}. Known: {registered_names()}, or '
                     f'"{TFDS_PREFIX}<tfds name>" for any TFDS image dataset.')
  return _REGISTRY[name]


for _spec in [
    DatasetSpec(
        name='cityscapes', tfds_name='cityscapes/semantic_segmentation', kind=SEGMENTATION,
        image_key='image_left', label_key='segmentation_label', num_classes=19,
        label_table=make_label_table(CITYSCAPES_LABEL_ID_TO_TRAIN_ID, range(34)),
        class_names=CITYSCAPES_CLASSES, crop_size=(1024, 1024)),
    DatasetSpec(
        name='ade20k', tfds_name='ddep_ade20k', kind=SEGMENTATION,
        label_key='segmentation_mask', num_classes=150,
        label_table=make_label_table({k: k - 1 for k in range(1, 151)}, range(151)),
        class_names=ADE20K_CLASSES),
    DatasetSpec(
        name='pascal_context_59', tfds_name='ddep_pascal_context/59', kind=SEGMENTATION,
        label_key='segmentation_mask', num_classes=59, label_table=_identity_table(59),
        class_names=PASCAL_CONTEXT_59_CLASSES),
    DatasetSpec(
        name='pascal_context_60', tfds_name='ddep_pascal_context/60', kind=SEGMENTATION,
        label_key='segmentation_mask', num_classes=60, label_table=_identity_table(60),
        class_names=PASCAL_CONTEXT_60_CLASSES),
    DatasetSpec(
        name='voc2012', tfds_name='ddep_voc2012/segmentation', kind=SEGMENTATION,
        label_key='segmentation_mask', num_classes=21, label_table=_identity_table(21),
        class_names=VOC_CLASSES),
    DatasetSpec(name='voc2012_images', tfds_name='ddep_voc2012/images', kind=IMAGES),
    # Cityscapes fine + coarse images for denoising pretraining (paper Table 3): TFDS's
    # `semantic_segmentation_extra` adds leftImg8bit_trainextra.zip (split 'train_extra').
    DatasetSpec(name='cityscapes_fine_coarse', tfds_name='cityscapes/semantic_segmentation_extra',
                kind=IMAGES, image_key='image_left'),
    DatasetSpec(name='imagenet21k_fall11', tfds_name='ddep_imagenet21k/fall11',
                kind=CLASSIFICATION, label_key='label', num_classes=21841),
    DatasetSpec(name='imagenet21k_winter21', tfds_name='ddep_imagenet21k/winter21',
                kind=CLASSIFICATION, label_key='label', num_classes=19167),
    DatasetSpec(
        name='digit_scenes', tfds_name='ddep_digit_scenes/segmentation', kind=SEGMENTATION,
        label_key='segmentation_mask', num_classes=11, label_table=_identity_table(11),
        class_names=DIGIT_SCENES_CLASSES, crop_size=(32, 32)),
    DatasetSpec(
        name='digit_scenes_foreground', tfds_name='ddep_digit_scenes/segmentation',
        kind=SEGMENTATION, label_key='segmentation_mask', num_classes=2,
        label_table=make_label_table({0: 0, **{d: 1 for d in range(1, 11)}}, range(11)),
        class_names=DIGIT_SCENES_FOREGROUND_CLASSES, crop_size=(32, 32)),
    DatasetSpec(name='digit_scenes_classification', tfds_name='ddep_digit_scenes/classification',
                kind=CLASSIFICATION, label_key='label', num_classes=10,
                class_names=DIGIT_SCENES_CLASSES[1:]),
    DatasetSpec(name='digit_scenes_unlabeled', tfds_name='ddep_digit_scenes/unlabeled',
                kind=IMAGES),
]:
  register_dataset(_spec)
del _spec


# ------------------------------------------------------------------------------------------
# Opening builders, with errors that say what to run.
# ------------------------------------------------------------------------------------------


class DatasetNotPreparedError(FileNotFoundError):
  """The TFDS dataset is not prepared in the data_dir looked in."""


def disable_tfds_gcs() -> None:
  """Stops TFDS from looking up dataset metadata on GCS (no network at run time)."""
  from tensorflow_datasets.core.utils import gcs_utils  # pylint: disable=g-import-not-at-top
  gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access


def confine_tensorflow() -> None:
  """The start of every command line: TensorFlow only feeds data.

  Keeps it off the accelerators, which belong to JAX, and away from GCS metadata look-ups (no
  network is assumed).
  """
  tf.config.set_visible_devices([], 'GPU')
  disable_tfds_gcs()


def _resolved_data_dir(data_dir: str | None) -> str:
  if data_dir:
    return os.fspath(data_dir)
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def _build_command(tfds_name: str, data_dir: str) -> str:
  imports = ' --imports=ddep_jax.data.builders' if tfds_name.startswith('ddep_') else ''
  return (f'tfds build {tfds_name}{imports} --data_dir={data_dir} '
          '--manual_dir=<folder with the downloaded files>')


def load_builder(spec: DatasetSpec, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Returns the prepared TFDS builder of `spec`; a clear error when it is not prepared."""
  disable_tfds_gcs()
  if spec.tfds_name.startswith('ddep_'):
    # Registers the project builders; a prepared dataset also loads from its files without them.
    try:
      import ddep_jax.data.builders  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      pass
  where = _resolved_data_dir(data_dir)
  try:
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotPreparedError(
        f'Dataset {spec.name!r} (TFDS {spec.tfds_name!r}) is neither prepared in data_dir '
        f'{where!r} nor a known TFDS builder. Prepare it with:\n  '
        f'{_build_command(spec.tfds_name, where)}\nor set config data_dir to the folder that '
        f'holds it. (TFDS said: {e})') from None
  if not builder.is_prepared():
    instructions = (getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None) or '').strip()
    manual = f'\nFiles to download first:\n{instructions}' if instructions else ''
    raise DatasetNotPreparedError(
        f'Dataset {spec.name!r} (TFDS {spec.tfds_name!r}) is not prepared in data_dir '
        f'{where!r} (looked for {builder.data_dir}). Prepare it with:\n  '
        f'{_build_command(spec.tfds_name, where)}{manual}')
  return builder


def check_features(spec: DatasetSpec, builder: tfds.core.DatasetBuilder, keys) -> None:
  """Raises if a feature key of `spec` is missing from the prepared dataset."""
  features = builder.info.features
  for key in keys:
    if key is not None and key not in features:
      raise ValueError(f'Dataset {spec.name!r} (TFDS {spec.tfds_name!r}) has no feature '
                       f'{key!r}; it has {sorted(features.keys())}.')


def label_feature(spec: DatasetSpec, builder: tfds.core.DatasetBuilder):
  """The label feature connector of the prepared dataset, or None."""
  features = builder.info.features
  return features[spec.label_key] if spec.label_key and spec.label_key in features else None


def num_classes_of(spec: DatasetSpec, builder: tfds.core.DatasetBuilder) -> int | None:
  """Number of classes: the spec's, else the ClassLabel's of the prepared dataset."""
  if spec.num_classes is not None:
    return spec.num_classes
  feature = label_feature(spec, builder)
  if isinstance(feature, tfds.features.ClassLabel):
    return feature.num_classes
  return None


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset."""
  name: str
  tfds_name: str
  kind: str
  num_classes: int | None
  class_names: tuple[str, ...] | None
  splits: dict[str, int]  # split name -> number of examples
  split_dict: tfds.core.SplitDict | None = dataclasses.field(default=None, compare=False,
                                                             repr=False)

  def split_size(self, split: str) -> int:
    """Examples in `split`, which may be sliced or combined ('train[:10%]', 'train+validation')."""
    if split in self.splits:
      return self.splits[split]
    if self.split_dict is None:
      raise ValueError(f'Unknown split {split!r} of {self.name!r}; it has {sorted(self.splits)}.')
    return self.split_dict[split].num_examples

  def train_size(self, input_config) -> int:
    """Examples per epoch of a train input config: its split, or its labelled subset."""
    if input_config.split_file:
      return len(subsets.read_split_file(input_config.split_file))
    return subsets.subset_size(self.split_size(input_config.split),
                               label_fraction=input_config.label_fraction,
                               label_count=input_config.label_count)


def dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
  """Number of classes, class names (if known) and split sizes of a prepared dataset."""
  spec = get_spec(name)
  builder = load_builder(spec, data_dir)
  class_names = spec.class_names
  kind = spec.kind
  feature = label_feature(spec, builder)
  if class_names is None and isinstance(feature, tfds.features.ClassLabel):
    class_names = tuple(feature.names)
  if name.startswith(TFDS_PREFIX) and not isinstance(feature, tfds.features.ClassLabel):
    kind = IMAGES
  return DatasetInfo(
      name=name, tfds_name=spec.tfds_name, kind=kind,
      num_classes=num_classes_of(spec, builder) if kind != IMAGES else None,
      class_names=class_names if kind != IMAGES else None,
      splits={k: v.num_examples for k, v in builder.info.splits.items()},
      split_dict=builder.info.splits)
