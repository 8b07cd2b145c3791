"""Tests for ddep_jax.data.subsets: label-efficient subset selection and split files."""

import hashlib
import random

import pytest

from ddep_jax.data import subsets

IDS = [f'ADE_train_{i:08d}' for i in range(1, 201)]


def test_subset_size_matches_the_paper_protocols():
  assert subsets.subset_size(4998, label_fraction=0.01) == 50  # Pascal Context 1 %.
  assert subsets.subset_size(20210, label_fraction=0.01) == 202  # ADE20K 1 %.
  assert subsets.subset_size(20210, label_fraction=0.05) == 1011  # 1010.5 rounds half up.
  assert subsets.subset_size(2975, label_count=372) == 372  # Cityscapes 1/8.
  assert subsets.subset_size(2975, label_fraction=1.0) == 2975
  assert subsets.subset_size(7) == 7
  assert subsets.subset_size(10, label_fraction=0.01) == 1  # Never empty.


@pytest.mark.parametrize('kwargs, match', [
    (dict(label_fraction=0.1, label_count=3), 'not both'),
    (dict(label_fraction=0.0), r'must be in \(0, 1\]'),
    (dict(label_count=201), r'must be in \[1, 200\]'),
])
def test_subset_size_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    subsets.subset_size(200, **kwargs)


def test_select_subset_is_the_ids_with_smallest_seeded_hash():
  chosen = subsets.select_subset(IDS, label_fraction=0.05, subset_seed=3)
  want = sorted(IDS, key=lambda i: hashlib.sha256(f'3:{i}'.encode()).digest())[:10]
  assert chosen == sorted(want)


def test_select_subset_ignores_order_and_nests_fractions():
  shuffled = list(IDS)
  random.Random(0).shuffle(shuffled)
  for seed in (0, 1):
    by_fraction = {f: subsets.select_subset(IDS, label_fraction=f, subset_seed=seed)
                   for f in (0.01, 0.05, 0.1, 0.2)}
    assert by_fraction[0.05] == subsets.select_subset(shuffled, label_fraction=0.05,
                                                      subset_seed=seed)
    assert [len(v) for v in by_fraction.values()] == [2, 10, 20, 40]
    assert set(by_fraction[0.01]) < set(by_fraction[0.05]) < set(by_fraction[0.1])
    assert set(by_fraction[0.1]) < set(by_fraction[0.2])
  assert (subsets.select_subset(IDS, label_count=20, subset_seed=0)
          != subsets.select_subset(IDS, label_count=20, subset_seed=1))
  assert subsets.select_subset(IDS) == sorted(IDS)


def test_select_subset_rejects_duplicate_ids():
  with pytest.raises(ValueError, match='unique.*ADE_train_00000001'):
    subsets.select_subset(IDS + IDS[:1], label_count=3)


def test_split_file_round_trip(tmp_path):
  path = str(tmp_path / 'sub' / 'ids.txt')
  subsets.write_split_file(path, ['b_2', 'a_1'])
  assert open(path).read() == 'a_1\nb_2\n'
  assert subsets.read_split_file(path) == ['a_1', 'b_2']


def test_read_split_file_accepts_other_codebases_list_files(tmp_path):
  path = tmp_path / 'list.txt'
  path.write_text(
      '# Cityscapes 1/30 subset\n'
      'leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png '
      'gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png\n'
      '\n'
      'JPEGImages/2007_000032.jpg\n'
      'ADE_train_00000003\n')
  assert subsets.read_split_file(str(path)) == ['aachen_000000_000019', '2007_000032',
                                                'ADE_train_00000003']


def test_read_split_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.txt.*split_file'):
    subsets.read_split_file(str(tmp_path / 'missing.txt'))
  dup = tmp_path / 'dup.txt'
  dup.write_text('a\nb\na\n')
  with pytest.raises(ValueError, match=r"dup.txt lists 1 ids more than once, e.g. \['a'\]"):
    subsets.read_split_file(str(dup))
  with pytest.raises(ValueError, match='whitespace'):
    subsets.write_split_file(str(tmp_path / 'bad.txt'), ['a b'])
