"""Evaluation metrics: confusion matrices, mIoU / mAcc / aAcc, PSNR, top-1.

Segmentation metrics follow MMSegmentation's definitions, so numbers are comparable:
  IoU_c = TP_c / (TP_c + FP_c + FN_c), Acc_c = TP_c / (TP_c + FN_c), aAcc = sum TP / #pixels,
computed from one confusion matrix accumulated over every batch and every host. Classes absent
from both ground truth and predictions have an undefined IoU (NaN) and are left out of the mean,
as in MMSegmentation; pixels labelled `constants.IGNORE_LABEL` never count.

The per-batch functions are pure jnp and run inside the jitted eval step on global arrays, so the
sum over a batch sharded across devices and hosts is done by XLA; the host only adds up the
per-batch matrices (`ConfusionMatrix`).
"""

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

def confusion_matrix(labels: jax.Array, predictions: jax.Array, num_classes: int,
                     valid: jax.Array | None = None) -> jax.Array:
  """Confusion matrix [num_classes (ground truth), num_classes (predicted)] of one batch.

  Args:
    labels: int [B, H, W] train ids; `constants.IGNORE_LABEL` (and anything outside
      [0, num_classes)) is skipped.
    predictions: int [B, H, W] predicted class ids.
    num_classes: K.
    valid: optional bool [B] marking real examples (False for eval padding examples).
  Returns:
    int32 [K, K] counts; rows are ground truth, columns predictions.
  """
  labels = labels.astype(jnp.int32)
  predictions = predictions.astype(jnp.int32)
  keep = (labels >= 0) & (labels < num_classes)
  if valid is not None:
    keep &= valid.reshape((-1,) + (1,) * (labels.ndim - 1))
  index = jnp.where(keep, labels * num_classes + predictions, 0)
  counts = jnp.bincount(index.reshape(-1), weights=keep.reshape(-1).astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray,
                         class_names: Sequence[str] | None = None) -> dict:
  """mIoU, mAcc, aAcc and per-class IoU / accuracy from a [K, K] confusion matrix.

  Returned as plain Python floats (fractions in [0, 1]); per-class values of classes that never
  occur are NaN, as in MMSegmentation.
  """
  confusion = np.asarray(confusion, dtype=np.float64)
  num_classes = confusion.shape[0]
  true_positive = np.diag(confusion)
  ground_truth = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)
  union = ground_truth + predicted - true_positive
  with np.errstate(divide='ignore', invalid='ignore'):
    iou = np.where(union > 0, true_positive / union, np.nan)
    accuracy = np.where(ground_truth > 0, true_positive / ground_truth, np.nan)
  total = confusion.sum()
  names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f'{len(names)} class names given for a {num_classes}-class confusion matrix.')
  return {
      'mIoU': _nanmean(iou),
      'mAcc': _nanmean(accuracy),
      'aAcc': float(true_positive.sum() / total) if total > 0 else float('nan'),
      'per_class_iou': {n: float(v) for n, v in zip(names, iou)},
      'per_class_acc': {n: float(v) for n, v in zip(names, accuracy)},
      'num_pixels': int(total),
  }


def _nanmean(values: np.ndarray) -> float:
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else float('nan')


def format_per_class_table(results: Mapping) -> str:
  """MMSegmentation's per-class results (IoU and Acc per class, %) and summary (aAcc, mIoU, mAcc).

  Aligned Markdown tables; a class that never occurs reads `nan`, as in MMSegmentation.
  """
  rows = [(name, _percent(iou), _percent(results['per_class_acc'][name]))
          for name, iou in results['per_class_iou'].items()]
  summary = [tuple(_percent(results[k]) for k in ('aAcc', 'mIoU', 'mAcc'))]
  return (f"per class results:\n\n{_markdown_table(('Class', 'IoU', 'Acc'), rows)}\n\n"
          f"Summary:\n\n{_markdown_table(('aAcc', 'mIoU', 'mAcc'), summary, names=False)}")


def _percent(value: float) -> str:
  return f'{100 * value:.2f}'


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], names: bool = True
                    ) -> str:
  """Columns padded to their widest cell; numbers right-aligned, a first column of names left."""
  cells = [list(header)] + [list(r) for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

  def line(row):
    return '| ' + ' | '.join(c.ljust(w) if names and i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths))) + ' |'

  rule = '|' + '|'.join(('-' * (w + 1) + ':') if i or not names else (':' + '-' * (w + 1))
                        for i, w in enumerate(widths)) + '|'
  return '\n'.join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


class ConfusionMatrix:
  """Host-side accumulator of per-batch confusion matrices (int64: no overflow on big sets)."""

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self.matrix = np.zeros((num_classes, num_classes), np.int64)

  def update(self, batch_confusion) -> None:
    batch_confusion = np.asarray(jax.device_get(batch_confusion))
    if batch_confusion.shape != self.matrix.shape:
      raise ValueError(f'Confusion matrix of shape {batch_confusion.shape} added to an '
                       f'accumulator of shape {self.matrix.shape}.')
    self.matrix += batch_confusion.astype(np.int64)

  def compute(self, class_names: Sequence[str] | None = None) -> dict:
    return segmentation_metrics(self.matrix, class_names)


def psnr(clean: jax.Array, estimate: jax.Array, data_range: float = 2.0) -> jax.Array:
  """Per-example PSNR in dB; images in [-1, 1] have `data_range` 2."""
  mse = jnp.mean(jnp.square(clean.astype(jnp.float32) - estimate.astype(jnp.float32)),
                 axis=tuple(range(1, clean.ndim)))
  return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-12))


def top1_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example 1.0 / 0.0 for a correct arg-max prediction."""
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
