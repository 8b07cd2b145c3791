"""Segmentation inference protocols: whole image, sliding window, multi-scale and flips.

All functions are pure and traceable: they take `predict_fn(images) -> logits` (images float32
[B, H, W, 3] in [-1, 1], logits [B, H, W, K]) and return per-pixel class probabilities
[B, H, W, K] at the input resolution, so they run inside one jitted eval step.

Conventions follow MMSegmentation, which is what segmentation papers report with:
* sliding window: windows of `crop_size` every `stride`, the last window flush with the image
  border; logits of overlapping windows are averaged (MMSeg `slide_inference`);
* test-time augmentation: softmax probabilities are averaged over scales and flips
  (MMSeg `SegTTAModel`); each scaled prediction is resized back bilinearly before averaging.

The paper's protocols (§5.1):
* Cityscapes: full 1024×2048 frames as two 1024×1024 halves, each averaged with its horizontal
  flip, concatenated: `mode='sliding', crop_size=(1024, 1024), stride=(1024, 1024), flip=True`
  (`CITYSCAPES_HALVES`);
* Pascal Context / ADE20K: scales (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) plus flips
  (`MULTI_SCALE_SCALES`).
"""

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

PredictFn = Callable[[jax.Array], jax.Array]

MULTI_SCALE_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
CITYSCAPES_HALVES = dict(mode='sliding', crop_size=(1024, 1024), stride=(1024, 1024), flip=True)


def _pad_to_multiple(images: jax.Array, multiple: int) -> jax.Array:
  """Zero-pads (0 = mid-grey in [-1, 1]) bottom/right so H and W are multiples of `multiple`."""
  height, width = images.shape[1:3]
  pad_h = -height % multiple
  pad_w = -width % multiple
  if pad_h == 0 and pad_w == 0:
    return images
  return jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))


def whole_logits(predict_fn: PredictFn, images: jax.Array, *, size_divisor: int = 16) -> jax.Array:
  """Logits of the whole image, padded to a multiple of `size_divisor` and cropped back."""
  height, width = images.shape[1:3]
  logits = predict_fn(_pad_to_multiple(images, size_divisor))
  return logits[:, :height, :width]


def window_starts(length: int, crop: int, stride: int) -> list[int]:
  """Start offsets of the sliding windows along one axis (MMSeg's grid).

  `max(length - crop + stride - 1, 0) // stride + 1` windows at multiples of `stride`, the last
  one moved back so that it ends at the border.
  """
  if crop <= 0 or stride <= 0:
    raise ValueError(f'Sliding window needs positive crop and stride, got {crop} and {stride}.')
  num = max(length - crop + stride - 1, 0) // stride + 1
  return sorted({max(min(i * stride + crop, length) - crop, 0) for i in range(num)})


def sliding_window_logits(predict_fn: PredictFn, images: jax.Array, *,
                          crop_size: Sequence[int], stride: Sequence[int],
                          size_divisor: int = 16) -> jax.Array:
  """Averaged logits of overlapping `crop_size` windows every `stride` pixels.

  Windows are stacked into one batch so the model runs once; an image smaller than the crop is
  handled as a whole image (padded to `size_divisor`).
  """
  batch, height, width, _ = images.shape
  crop_h, crop_w = (min(int(crop_size[0]), height), min(int(crop_size[1]), width))
  tops = window_starts(height, crop_h, int(stride[0]))
  lefts = window_starts(width, crop_w, int(stride[1]))
  windows = [images[:, t:t + crop_h, l:l + crop_w] for t in tops for l in lefts]
  stacked = jnp.concatenate(windows, axis=0)
  logits = whole_logits(predict_fn, stacked, size_divisor=size_divisor)
  num_classes = logits.shape[-1]
  total = jnp.zeros((batch, height, width, num_classes), jnp.float32)
  count = jnp.zeros((1, height, width, 1), jnp.float32)
  for i, (t, l) in enumerate((t, l) for t in tops for l in lefts):
    window_logits = logits[i * batch:(i + 1) * batch].astype(jnp.float32)
    total = total.at[:, t:t + crop_h, l:l + crop_w].add(window_logits)
    count = count.at[:, t:t + crop_h, l:l + crop_w].add(1.0)
  return total / count


def predict_probabilities(predict_fn: PredictFn, images: jax.Array, *, mode: str = 'whole',
                          scales: Sequence[float] = (1.0,), flip: bool = False,
                          crop_size: Sequence[int] | None = None,
                          stride: Sequence[int] | None = None,
                          size_divisor: int = 16) -> jax.Array:
  """Class probabilities [B, H, W, K] under the configured inference protocol.

  Args:
    predict_fn: images -> logits.
    images: float32 [B, H, W, 3].
    mode: 'whole' or 'sliding'.
    scales: image scale factors; probabilities are averaged over them (multi-scale testing).
    flip: also average the horizontally flipped prediction.
    crop_size, stride: sliding-window geometry (at each scale), required for mode='sliding'.
    size_divisor: the model's input granularity (16 for the TransUNet, 32 for the R50 U-Net).
  """
  if mode not in ('whole', 'sliding'):
    raise ValueError(f"Unknown inference mode {mode!r}; use 'whole' or 'sliding'.")
  if mode == 'sliding' and (crop_size is None or stride is None):
    raise ValueError("mode='sliding' needs crop_size and stride (e.g. (1024, 1024) for "
                     'the Cityscapes halves protocol).')
  if not scales:
    raise ValueError('scales must name at least one scale factor, e.g. (1.0,).')

  def logits_at_full_size(x):
    if mode == 'whole':
      return whole_logits(predict_fn, x, size_divisor=size_divisor)
    return sliding_window_logits(predict_fn, x, crop_size=crop_size, stride=stride,
                                 size_divisor=size_divisor)

  batch, height, width, _ = images.shape
  probabilities = 0.0
  num_predictions = 0
  for scale in scales:
    scaled_hw = (max(1, int(math.floor(height * scale + 0.5))),
                 max(1, int(math.floor(width * scale + 0.5))))
    scaled = images
    if scaled_hw != (height, width):
      scaled = jax.image.resize(images, (batch, *scaled_hw, images.shape[-1]), 'bilinear',
                                antialias=False)
    variants = [(scaled, False)] + ([(scaled[:, :, ::-1], True)] if flip else [])
    for x, flipped in variants:
      logits = logits_at_full_size(x).astype(jnp.float32)
      if flipped:
        logits = logits[:, :, ::-1]
      if scaled_hw != (height, width):
        logits = jax.image.resize(logits, (batch, height, width, logits.shape[-1]), 'bilinear',
                                  antialias=False)
      probabilities = probabilities + jax.nn.softmax(logits, axis=-1)
      num_predictions += 1
  return probabilities / num_predictions
