"""Tests of the helpers shared by the project builders (no TFDS build here)."""

import io
import logging

import numpy as np
from PIL import Image
import pytest

from ddep_jax.data.builders import builder_utils
from ddep_jax.data.builders import dummy_data


def _encode(array, fmt, mode=None):
  buffer = io.BytesIO()
  image = Image.fromarray(array)
  (image.convert(mode) if mode else image).save(buffer, format=fmt)
  return buffer.getvalue()


def _picture():
  picture = np.zeros((6, 10, 3), np.uint8)
  picture[:, 5:] = (200, 40, 10)
  return picture


def test_require_manual_files_names_every_missing_file_and_the_directory(tmp_path):
  (tmp_path / 'present.zip').write_bytes(b'')
  files = {'present.zip': 'http://a', 'missing_1.tar': 'http://b', 'missing_2.json': 'http://c'}
  with pytest.raises(FileNotFoundError) as error:
    builder_utils.require_manual_files('ddep_x', tmp_path, files)
  message = str(error.value)
  for expected in ('missing_1.tar  <- http://b', 'missing_2.json  <- http://c', str(tmp_path),
                   'ddep_x'):
    assert expected in message
  assert 'present.zip' not in message


def test_require_manual_files_returns_paths(tmp_path):
  (tmp_path / 'a.zip').write_bytes(b'')
  paths = builder_utils.require_manual_files('ddep_x', tmp_path, {'a.zip': 'u'})
  assert str(paths['a.zip']) == str(tmp_path / 'a.zip')


def test_rgb_jpeg_passes_through_unchanged():
  data = _encode(_picture(), 'JPEG')
  encoded, size = builder_utils.encode_image(data, example='x')
  assert encoded is data
  assert size == (6, 10)


@pytest.mark.parametrize('fmt,mode', [('PNG', None), ('JPEG', 'CMYK')])
def test_png_and_cmyk_become_rgb_jpeg(fmt, mode):
  encoded, size = builder_utils.encode_image(_encode(_picture(), fmt, mode), example='x')
  with Image.open(io.BytesIO(encoded)) as image:
    assert (image.format, image.mode, image.size) == ('JPEG', 'RGB', (10, 6))
    np.testing.assert_allclose(np.asarray(image)[3, 8], (200, 40, 10), atol=12)
  assert size == (6, 10)


def test_truncated_image_names_the_example():
  data = _encode(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8), 'JPEG')
  with pytest.raises(builder_utils.CorruptExampleError, match=r'img_7 \(a.tar:b.jpg\): .*decode'):
    builder_utils.encode_image(data[:len(data) // 2], example='img_7 (a.tar:b.jpg)')


def test_palette_png_gives_indices_not_colours():
  labels = np.array([[0, 15, 255], [20, 1, 0]], np.uint8)
  mask = builder_utils.decode_label_png(dummy_data._palette_png(labels), example='x')
  assert mask.dtype == np.uint8
  np.testing.assert_array_equal(mask[..., 0], labels)


def test_greyscale_label_values_are_kept():
  labels = np.array([[0, 150], [77, 1]], np.uint8)
  mask = builder_utils.decode_label_png(_encode(labels, 'PNG'), example='x', size=(2, 2))
  np.testing.assert_array_equal(mask[..., 0], labels)


def test_rgb_label_map_is_rejected():
  with pytest.raises(builder_utils.CorruptExampleError, match="y: .*mode 'RGB'"):
    builder_utils.decode_label_png(_encode(np.zeros((2, 2, 3), np.uint8), 'PNG'), example='y')


def test_label_size_mismatch_is_reported():
  with pytest.raises(builder_utils.CorruptExampleError, match='z: .*2x3 .* image is 4x5'):
    builder_utils.decode_label_png(_encode(np.zeros((2, 3), np.uint8), 'PNG'), example='z',
                                   size=(4, 5))


def _loaders():
  def load(key):
    if key == 'bad':
      raise builder_utils.CorruptExampleError('bad: the image does not decode (x).')
    return {'id': key}
  return [(key, lambda key=key: load(key)) for key in ('a', 'bad', 'c')]


def test_generate_checked_raises_naming_the_example_and_the_flag():
  examples = builder_utils.generate_checked(_loaders(), skip_corrupt=False, dataset='ddep_x',
                                            split='train')
  with pytest.raises(builder_utils.CorruptExampleError,
                     match='ddep_x/train: bad: .*skip_corrupt_images=True'):
    list(examples)


def test_generate_checked_skips_and_counts(caplog):
  with caplog.at_level(logging.WARNING):
    examples = list(builder_utils.generate_checked(_loaders(), skip_corrupt=True,
                                                   dataset='ddep_x', split='train'))
  assert [key for key, _ in examples] == ['a', 'c']
  assert 'ddep_x/train: skipped 1 corrupt example(s): bad' in caplog.text


def test_tar_members_random_access(tmp_path):
  written = dummy_data.write_voc2012(tmp_path, num_train=1, num_validation=2, num_unlabelled=0)
  with builder_utils.TarMembers(tmp_path / 'VOCtrainval_11-May-2012.tar') as tar:
    names = tar.names('VOCdevkit/VOC2012/SegmentationClass/', '.png')
    assert [builder_utils.stem(n) for n in names] == sorted(
        list(written['train']) + list(written['validation']))
    assert tar.read('VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt').decode().split() == list(
        written['validation'])
    with pytest.raises(FileNotFoundError, match='nope.jpg is not in .*VOCtrainval'):
      tar.read('nope.jpg')


def test_tar_members_rejects_a_non_tar(tmp_path):
  path = tmp_path / 'broken.tar'
  path.write_text('this is not a tar archive' * 40)
  with pytest.raises(ValueError, match='broken.tar is not a readable'):
    builder_utils.TarMembers(path)


def test_check_pairs_names_unpaired_files():
  with pytest.raises(ValueError, match=r"without annotation \(1\): \['b'\].*without image \(1\): "
                                       r"\['c'\]"):
    builder_utils.check_pairs(['x/a.jpg', 'x/b.jpg'], ['y/a.png', 'y/c.png'], where='w')
