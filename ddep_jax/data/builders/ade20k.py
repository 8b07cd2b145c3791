"""ADE20K (SceneParsing 150 classes) from the official `ADEChallengeData2016.zip`.

The zip holds `ADEChallengeData2016/images/{training,validation}/ADE_*.jpg` and
`ADEChallengeData2016/annotations/{training,validation}/ADE_*.png` (greyscale, 0 = "other",
1..150 = classes). Examples are read from the zip in place. Masks keep the raw values 0..150;
the input pipeline maps them to train ids (0 -> 255 ignore, k -> k - 1).

This is the benchmark annotation used by the paper (and MMSegmentation); TFDS's
`scene_parse150` is a different, instance-derived annotation.
"""

import functools
import re
import zipfile

import tensorflow as tf
import tensorflow_datasets as tfds

from ddep_jax.data.builders import builder_utils

ARCHIVE = 'ADEChallengeData2016.zip'
_URL = 'http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip'
_HOMEPAGE = 'http://sceneparsing.csail.mit.edu/'
_SPLITS = {'train': 'training', 'validation': 'validation'}
# Matches with or without the top-level `ADEChallengeData2016/` folder.
_MEMBER_RE = re.compile(r'(?:^|/)(images|annotations)/(training|validation)/([^/]+)\.(jpg|png)$')
# objectInfo150 order, as MMSegmentation's ADE20KDataset: stored mask value k+1 is CLASSES[k].
CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass',
    'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain',
    'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug',
    'field', 'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub',
    'railing', 'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers', 'counter',
    'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs',
    'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench',
    'countertop', 'stove', 'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar',
    'arcade machine', 'hovel', 'bus', 'towel', 'light', 'truck', 'tower', 'chandelier', 'awning',
    'streetlight', 'booth', 'television receiver', 'airplane', 'dirt track', 'apparel', 'pole',
    'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van',
    'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool',
    'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven',
    'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake',
    'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light',
    'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board',
    'shower', 'radiator', 'glass', 'clock', 'flag')

_CITATION = """\
@inproceedings{zhou2017scene,
  title={Scene Parsing through ADE20K Dataset},
  author={Zhou, Bolei and Zhao, Hang and Puig, Xavier and Fidler, Sanja and Barriuso, Adela and
          Torralba, Antonio},
  booktitle={CVPR},
  year={2017}
}"""


class Ade20k(tfds.core.GeneratorBasedBuilder):
  """ADE20K SceneParsing (150 classes), raw annotation values 0..150."""

  name = 'ddep_ade20k'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      builder_utils.ManualDataConfig(name='default', description='All 150-class annotations.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = builder_utils.manual_download_instructions(
      'ddep_ade20k', {ARCHIVE: _URL}, extra=f'Dataset page: {_HOMEPAGE}')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=('ADE20K scene parsing benchmark (SceneParsing, 150 classes): 20,210 train '
                     'and 2,000 validation images; masks hold 0 = other and 1..150 = classes.'),
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
    paths = builder_utils.require_manual_files(self.name, dl_manager.manual_dir, {ARCHIVE: _URL})
    return {split: self._generate_examples(paths[ARCHIVE], split) for split in _SPLITS}

  def _generate_examples(self, archive, split: str):
    folder = _SPLITS[split]
    with tf.io.gfile.GFile(str(archive), 'rb') as f, zipfile.ZipFile(f) as zf:
      images, labels = {}, {}
      for name in zf.namelist():
        match = _MEMBER_RE.search(name)
        if match and match.group(2) == folder:
          kind, image_id, ext = match.group(1), match.group(3), match.group(4)
          if (kind, ext) == ('images', 'jpg'):
            images[image_id] = name
          elif (kind, ext) == ('annotations', 'png'):
            labels[image_id] = name
      if not images:
        raise ValueError(f'{archive}: no images/{folder}/*.jpg inside; expected the original '
                         f'{ARCHIVE} from {_URL}.')
      builder_utils.check_pairs(list(images.values()), list(labels.values()),
                                where=f'{archive} ({folder})')
      loaders = ((image_id, functools.partial(_load, zf, images[image_id], labels[image_id],
                                              image_id))
                 for image_id in sorted(images))
      yield from builder_utils.generate_checked(
          loaders, skip_corrupt=self.builder_config.skip_corrupt_images, dataset=self.name,
          split=split)


def _load(zf: zipfile.ZipFile, image_name: str, label_name: str, image_id: str) -> dict:
  where = f'{image_id} ({ARCHIVE}:{image_name})'
  try:
    image_data, label_data = zf.read(image_name), zf.read(label_name)
  except zipfile.BadZipFile as e:  # A member failing its CRC check.
    raise builder_utils.CorruptExampleError(f'{where}: {e}.') from e
  image, size = builder_utils.encode_image(image_data, example=where)
  mask = builder_utils.decode_label_png(label_data, example=where, size=size)
  return {'image': image, 'segmentation_mask': mask, 'image_id': image_id}
