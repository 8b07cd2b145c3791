"""Segmentation metrics against hand-computed confusion matrices."""

import jax.numpy as jnp
import numpy as np
import pytest

from ddep_jax import evaluate
from ddep_jax import metrics


def test_confusion_matrix_counts_and_ignores_255_and_padding_examples():
  labels = np.array([[[0, 1], [2, 255]],
                     [[1, 1], [0, 0]]])
  predictions = np.array([[[0, 2], [2, 1]],
                          [[0, 0], [0, 0]]])
  valid = np.array([True, False])  # The second example only pads the batch.
  conf = np.asarray(metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(predictions), 3,
                                             valid=jnp.asarray(valid)))
  expected = np.zeros((3, 3), np.int64)
  expected[0, 0] = 1   # (gt 0, pred 0)
  expected[1, 2] = 1   # (gt 1, pred 2)
  expected[2, 2] = 1   # (gt 2, pred 2); the 255 pixel is skipped.
  np.testing.assert_array_equal(conf, expected)


def test_metrics_match_hand_computation():
  # Rows: ground truth, columns: prediction.
  conf = np.array([[50, 2, 3],
                   [4, 30, 6],
                   [0, 0, 0]])  # Class 2 never occurs in ground truth but is predicted 9 times.
  results = metrics.segmentation_metrics(conf, class_names=['road', 'car', 'sky'])
  iou_road = 50 / (55 + 54 - 50)
  iou_car = 30 / (40 + 32 - 30)
  iou_sky = 0 / (0 + 9 - 0)
  assert results['per_class_iou']['road'] == pytest.approx(iou_road)
  assert results['per_class_iou']['car'] == pytest.approx(iou_car)
  assert results['per_class_iou']['sky'] == pytest.approx(iou_sky)
  assert results['mIoU'] == pytest.approx((iou_road + iou_car + iou_sky) / 3)
  # Accuracy of a class without ground truth is undefined and left out of mAcc.
  assert np.isnan(results['per_class_acc']['sky'])
  assert results['mAcc'] == pytest.approx((50 / 55 + 30 / 40) / 2)
  assert results['aAcc'] == pytest.approx(80 / 95)
  assert results['num_pixels'] == 95


def test_class_absent_everywhere_is_excluded_from_miou():
  conf = np.array([[5, 0], [0, 0]])
  results = metrics.segmentation_metrics(conf)
  assert np.isnan(results['per_class_iou']['1'])
  assert results['mIoU'] == pytest.approx(1.0)


def test_accumulator_equals_metrics_of_concatenated_batches():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, size=(6, 5, 7))
  labels[labels == 3] = 255
  predictions = rng.integers(0, 3, size=(6, 5, 7))
  accumulator = metrics.ConfusionMatrix(3)
  for i in range(0, 6, 2):
    accumulator.update(metrics.confusion_matrix(labels[i:i + 2], predictions[i:i + 2], 3))
  whole = metrics.confusion_matrix(labels, predictions, 3)
  np.testing.assert_array_equal(accumulator.matrix, np.asarray(whole))
  # And against a plain numpy count.
  keep = labels != 255
  expected = np.zeros((3, 3), np.int64)
  np.add.at(expected, (labels[keep], predictions[keep]), 1)
  np.testing.assert_array_equal(accumulator.matrix, expected)


def test_psnr_and_top1():
  clean = jnp.zeros((2, 4, 4, 3))
  estimate = jnp.stack([jnp.full((4, 4, 3), 0.1), jnp.full((4, 4, 3), 0.2)])
  np.testing.assert_allclose(metrics.psnr(clean, estimate),
                             [10 * np.log10(4 / 0.01), 10 * np.log10(4 / 0.04)], rtol=1e-5)
  logits = jnp.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
  np.testing.assert_array_equal(metrics.top1_correct(logits, jnp.array([1, 1, 1])), [1, 0, 1])


def test_per_class_table_is_mmsegmentations():
  results = metrics.segmentation_metrics(np.array([[3, 1, 0], [0, 4, 0], [0, 0, 0]]),
                                         ['road', 'sidewalk', 'traffic light'])
  assert metrics.format_per_class_table(results).split('\n') == [
      'per class results:', '',
      '| Class         |   IoU |    Acc |',
      '|:--------------|------:|-------:|',
      '| road          | 75.00 |  75.00 |',  # 3 / (4 + 3 - 3), 3 / 4.
      '| sidewalk      | 80.00 | 100.00 |',  # 4 / (4 + 5 - 4), 4 / 4.
      '| traffic light |   nan |    nan |',  # Never occurs.
      '', 'Summary:', '',
      '|  aAcc |  mIoU |  mAcc |',
      '|------:|------:|------:|',
      '| 87.50 | 77.50 | 87.50 |']  # 7 / 8; means over the two classes that occur.


def test_invalid_label_pixels_count_real_examples_only():
  batch = {'num_invalid_label_pixels': np.array([3, 0, 5, 7], np.int32),
           'valid': np.array([True, True, True, False])}  # The last one only pads the batch.
  assert evaluate.invalid_label_pixels(batch) == 8
  assert evaluate.invalid_label_pixels({'image': np.zeros(2)}) == 0  # Not a segmentation batch.
  assert evaluate.sum_over_processes(2**40 + 3) == 2**40 + 3  # One process: the count itself.
