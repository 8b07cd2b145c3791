"""Tests of the dummy-archive writer's command line and of its VOC palette."""

import tarfile
import zipfile

from absl import app
from absl import flags
import pytest

from ddep_jax.data.builders import dummy_data


@pytest.fixture
def parse_flags():
  """Defines and parses `dummy_data.main`'s flags, and removes them afterwards."""
  dummy_data.define_flags()
  def _parse(*argv):
    flags.FLAGS(['dummy_data', *argv])
  yield _parse
  flags.FLAGS.unparse_flags()
  for name in dummy_data.FLAG_NAMES:
    delattr(flags.FLAGS, name)


def test_main_writes_the_real_file_names(tmp_path, parse_flags, capsys):
  out = tmp_path / 'manual'
  parse_flags(f'--out={out}', '--datasets=ade20k,pascal_context,imagenet21k')
  dummy_data.main([])
  assert sorted(p.name for p in out.iterdir()) == [
      'ADEChallengeData2016.zip', 'VOCtrainval_03-May-2010.tar', 'fall11_whole.tar',
      'trainval_merged.json', 'winter21_whole.tar.gz']
  with zipfile.ZipFile(out / 'ADEChallengeData2016.zip') as zf:
    assert 'ADEChallengeData2016/images/training/ADE_train_00000001.jpg' in zf.namelist()
    assert 'ADEChallengeData2016/annotations/validation/ADE_val_00000002.png' in zf.namelist()
  with tarfile.open(out / 'winter21_whole.tar.gz') as tar:
    assert tar.getnames() == ['winter21_whole/n15075141.tar', 'winter21_whole/n02084071.tar',
                              'winter21_whole/n01440764.tar']
  assert 'ADEChallengeData2016.zip' in capsys.readouterr().out


def test_main_rejects_unknown_dataset(tmp_path, parse_flags):
  parse_flags(f'--out={tmp_path}', '--datasets=ade20k,coco')
  with pytest.raises(app.UsageError, match=r"Unknown --datasets \['coco'\]"):
    dummy_data.main([])


def test_voc_colour_map_known_entries():
  palette = dummy_data.voc_colour_map()
  colour = lambda index: tuple(palette[3 * index:3 * index + 3])
  assert colour(0) == (0, 0, 0)
  assert colour(1) == (128, 0, 0)  # aeroplane
  assert colour(15) == (192, 128, 128)  # person
  assert colour(255) == (224, 224, 192)  # boundary
