"""Pascal VOC 2012 from the official `VOCtrainval_11-May-2012.tar`, read in place.

Config `segmentation`: the 1,464 train / 1,449 val images of
`VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt` with their `SegmentationClass` palette
PNGs (palette indices 0..20, 255 = object boundary / ignore).
Config `images`: every image of `JPEGImages` (17,125), unlabelled, for denoising pretraining
(paper Table 3 pretrains the decoder on Pascal VOC images for Pascal Context).
"""

import dataclasses
import functools

import tensorflow_datasets as tfds

from ddep_jax.data.builders import builder_utils

ARCHIVE = 'VOCtrainval_11-May-2012.tar'
ROOT = 'VOCdevkit/VOC2012/'
_URL = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar'
_HOMEPAGE = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/'
_SPLIT_FILES = {'train': 'train.txt', 'validation': 'val.txt'}

CLASSES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
           'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
           'sheep', 'sofa', 'train', 'tvmonitor')

_CITATION = """\
@misc{pascal-voc-2012,
  author = {Everingham, M. and Van~Gool, L. and Williams, C. K. I. and Winn, J. and
            Zisserman, A.},
  title = {The {PASCAL} {V}isual {O}bject {C}lasses {C}hallenge 2012 {(VOC2012)} {R}esults},
  howpublished = {http://www.pascal-network.org/challenges/VOC/voc2012/workshop/index.html}
}"""


@dataclasses.dataclass(eq=False)
class Voc2012Config(builder_utils.ManualDataConfig):
  """Attributes: segmentation: labelled segmentation splits (True) or all images (False)."""
  segmentation: bool = True


class Voc2012(tfds.core.GeneratorBasedBuilder):
  """Pascal VOC 2012: segmentation splits, or all images for denoising pretraining."""

  name = 'ddep_voc2012'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      Voc2012Config(name='segmentation', segmentation=True,
                    description='Segmentation train (1,464) / val (1,449), 21 classes + 255.'),
      Voc2012Config(name='images', segmentation=False,
                    description='All 17,125 JPEG images, unlabelled, as one train split.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = builder_utils.manual_download_instructions(
      'ddep_voc2012', {ARCHIVE: _URL}, extra=f'Dataset page: {_HOMEPAGE}')

  def _info(self) -> tfds.core.DatasetInfo:
    features = {'image': builder_utils.image_feature(), 'image_id': tfds.features.Text()}
    if self.builder_config.segmentation:
      features['segmentation_mask'] = builder_utils.mask_feature()
    return tfds.core.DatasetInfo(
        builder=self,
        description=('PASCAL VOC 2012. Segmentation masks hold class indices 0..20 '
                     '(0 = background) and 255 on object boundaries (ignore).'),
        features=tfds.features.FeaturesDict(features),
        supervised_keys=(('image', 'segmentation_mask') if self.builder_config.segmentation
                         else None),
        homepage=_HOMEPAGE,
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    path = builder_utils.require_manual_files(self.name, dl_manager.manual_dir,
                                              {ARCHIVE: _URL})[ARCHIVE]
    if self.builder_config.segmentation:
      return {split: self._generate_examples(path, split) for split in _SPLIT_FILES}
    return {'train': self._generate_examples(path, 'train')}

  def _generate_examples(self, archive, split: str):
    with builder_utils.TarMembers(archive) as tar:
      if self.builder_config.segmentation:
        list_file = f'{ROOT}ImageSets/Segmentation/{_SPLIT_FILES[split]}'
        image_ids = sorted(set(tar.read(list_file).decode().split()))
      else:
        image_ids = [builder_utils.stem(n) for n in tar.names(f'{ROOT}JPEGImages/', '.jpg')]
      if not image_ids:
        raise ValueError(f'{archive}: no images found under {ROOT}; expected the original '
                         f'{ARCHIVE} from {_URL}.')
      loaders = ((image_id, functools.partial(self._load, tar, image_id))
                 for image_id in image_ids)
      yield from builder_utils.generate_checked(
          loaders, skip_corrupt=self.builder_config.skip_corrupt_images, dataset=self.name,
          split=split)

  def _load(self, tar: builder_utils.TarMembers, image_id: str) -> dict:
    image_name = f'{ROOT}JPEGImages/{image_id}.jpg'
    where = f'{image_id} ({ARCHIVE}:{image_name})'
    image, size = builder_utils.encode_image(tar.read(image_name), example=where)
    example = {'image': image, 'image_id': image_id}
    if self.builder_config.segmentation:
      label_data = tar.read(f'{ROOT}SegmentationClass/{image_id}.png')
      example['segmentation_mask'] = builder_utils.decode_label_png(label_data, example=where,
                                                                    size=size)
    return example
