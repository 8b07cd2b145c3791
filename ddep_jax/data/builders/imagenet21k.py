"""ImageNet-21k (full ImageNet) from the official tar of per-synset tars.

Releases (configs):
  * `fall11`: `fall11_whole.tar` (1.31 TB, 21,841 synsets, ~14.2M images), members
    `n01440764.tar`, ... at the top level, like ImageNet-2012's train tar.
  * `winter21`: `winter21_whole.tar.gz` (19,167 synsets; the people synsets of fall11 removed),
    members `winter21_whole/n01440764.tar`, ...

Reading: one sequential pass over the archive in tar stream mode, each per-synset tar streamed in
turn from inside it: nothing is extracted to disk and memory stays at one image, so the 1.3 TB
file may also live on GCS. Each image is decoded once to validate it; CMYK JPEGs and PNG/GIF
files named .JPEG are converted to RGB JPEG.

Class indices: `label` is the synset's index in the *sorted* list of the release's synsets, so
indices depend only on the release, not on archive order. The list comes from
`<manual_dir>/<release>_synsets.txt` (one WordNet id per line, any order) when that file exists;
otherwise it is read from the archive's member names first (for the uncompressed fall11 tar
this only seeks from header to header; for winter21's .tar.gz it means decompressing the whole
file once more, so writing the synsets file is worth it). The number of synsets must match the
release. `synset` keeps the WordNet id; labels are used by supervised encoder pretraining and
ignored by denoising pretraining.
"""

import dataclasses
import functools
import re
import tarfile
from typing import Sequence

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from ddep_jax.data.builders import builder_utils

_URL_PAGE = 'https://image-net.org/download-images (registration required)'
_URLS = {
    'fall11_whole.tar': _URL_PAGE,
    'winter21_whole.tar.gz': 'https://image-net.org/data/winter21_whole.tar.gz (after registering)',
}
_HOMEPAGE = 'https://image-net.org/'
_SYNSET_TAR_RE = re.compile(r'(?:^|/)(n\d{8})\.tar$')
_SYNSET_RE = re.compile(r'^n\d{8}$')

_CITATION = """\
@inproceedings{deng2009imagenet,
  title={ImageNet: A large-scale hierarchical image database},
  author={Deng, Jia and Dong, Wei and Socher, Richard and Li, Li-Jia and Li, Kai and
          Fei-Fei, Li},
  booktitle={CVPR},
  year={2009}
}"""


@dataclasses.dataclass(eq=False)
class Imagenet21kConfig(builder_utils.ManualDataConfig):
  """Attributes.

  archive: file name of the release's tar of per-synset tars in `manual_dir`.
  num_classes: number of synsets of the release; the archive (or synsets file) must match it.
  synsets_file: optional file in `manual_dir` listing the release's synsets, one per line.
  """
  archive: str = 'fall11_whole.tar'
  num_classes: int = 21841
  synsets_file: str = 'fall11_synsets.txt'


class Imagenet21k(tfds.core.GeneratorBasedBuilder):
  """ImageNet-21k, every image in one `train` split, labelled by sorted synset index."""

  name = 'ddep_imagenet21k'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      Imagenet21kConfig(name='fall11', archive='fall11_whole.tar', num_classes=21841,
                        synsets_file='fall11_synsets.txt',
                        description='Fall 2011 release: 21,841 synsets, ~14.2M images.'),
      Imagenet21kConfig(name='winter21', archive='winter21_whole.tar.gz', num_classes=19167,
                        synsets_file='winter21_synsets.txt',
                        description='Winter 2021 release: 19,167 synsets.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = builder_utils.manual_download_instructions(
      'ddep_imagenet21k', {f'{name} (config {name.split("_")[0]})': url
                           for name, url in _URLS.items()},
      extra=('Optionally also <release>_synsets.txt (one WordNet id per line) to skip the pass '
             'that lists the synsets in the archive.'))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=('Full ImageNet (ImageNet-21k), all images in `train`; label = index of the '
                     'synset in sorted synset order.'),
        features=tfds.features.FeaturesDict({
            'image': builder_utils.image_feature(),
            'label': tfds.features.ClassLabel(num_classes=self.builder_config.num_classes),
            'synset': tfds.features.Text(),
            'image_id': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage=_HOMEPAGE,
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    archive = builder_utils.require_manual_files(
        self.name, dl_manager.manual_dir,
        {config.archive: _URLS.get(config.archive, _URL_PAGE)})[config.archive]
    synsets = self._synsets(dl_manager.manual_dir, archive)
    # Names are known only now (stanford_dogs / image_folder in TFDS do the same).
    self.info.features['label'].names = synsets
    return {'train': self._generate_examples(archive, synsets)}

  def _synsets(self, manual_dir: epath.Path, archive: epath.Path) -> list[str]:
    """The release's synsets, sorted; checked against `num_classes`."""
    config = self.builder_config
    listing = manual_dir / config.synsets_file
    if listing.exists():
      synsets = listing.read_text().split()
      bad = [s for s in synsets if not _SYNSET_RE.match(s)]
      if bad:
        raise ValueError(f'{listing}: expected one WordNet id (n + 8 digits) per line, got '
                         f'{bad[:5]}.')
      source = str(listing)
    else:
      logging.info('%s not found: listing the synsets of %s first.', listing, archive)
      if not archive.name.endswith('.tar'):
        logging.warning('Listing %s means decompressing it once; put %s in %s to skip that.',
                        archive, config.synsets_file, manual_dir)
      synsets = [match.group(1)
                 for name, _ in tfds.download.iter_archive(archive, tfds.download.ExtractMethod.TAR)
                 if (match := _SYNSET_TAR_RE.search(name))]
      source = str(archive)
    if len(set(synsets)) != len(synsets):
      raise ValueError(f'{source}: synsets listed more than once.')
    if len(synsets) != config.num_classes:
      raise ValueError(
          f'{source}: found {len(synsets)} synsets but the {config.name!r} release has '
          f'{config.num_classes}. Check that {config.archive} is complete and is the '
          f'{config.name} release, or build with an Imagenet21kConfig whose num_classes matches.')
    return sorted(synsets)

  def _generate_examples(self, archive: epath.Path, synsets: Sequence[str]):
    label = {synset: i for i, synset in enumerate(synsets)}
    yield from builder_utils.generate_checked(
        self._loaders(archive, label), skip_corrupt=self.builder_config.skip_corrupt_images,
        dataset=self.name, split='train')

  def _loaders(self, archive: epath.Path, label: dict[str, int]):
    """(image id, loader) for every image, streaming the outer and then each inner tar."""
    for name, synset_tar in tfds.download.iter_archive(archive,
                                                       tfds.download.ExtractMethod.TAR_STREAM):
      match = _SYNSET_TAR_RE.search(name)
      if not match:
        logging.warning('%s: ignoring %s (not a per-synset tar).', archive, name)
        continue
      synset = match.group(1)
      if synset not in label:
        raise ValueError(f'{archive}: {name} holds synset {synset}, which is not in the synset '
                         f'list ({self.builder_config.synsets_file}).')
      try:
        for image_name, fobj in tfds.download.iter_archive(
            synset_tar, tfds.download.ExtractMethod.TAR_STREAM):
          image_id = builder_utils.stem(image_name)
          yield image_id, functools.partial(
              _load, fobj, image_id, synset, label[synset], f'{archive.name}:{name}:{image_name}')
      except (tarfile.TarError, EOFError) as e:
        raise ValueError(f'{archive}: cannot read {name} ({e}).') from e


def _load(fobj, image_id: str, synset: str, label: int, where: str) -> dict:
  image, _ = builder_utils.encode_image(fobj.read(), example=f'{image_id} ({where})')
  return {'image': image, 'label': label, 'synset': synset, 'image_id': image_id}
