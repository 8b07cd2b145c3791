"""Pure TensorFlow preprocessing for the input pipelines (runs on the host, inside tf.data).

Every random choice comes from stateless ops seeded per example (`example_seed`), so a batch is a
function of (seed, epoch, example id) alone: a resumed run sees exactly the augmentations of an
uninterrupted one, whatever the host count.

Images leave here as float32 in [-1, 1] (what vision_transformer's ImageNet-21k checkpoints
expect); segmentation labels as int32 train ids with 255 = ignore.
"""

import tensorflow as tf

from ddep_jax import constants
from ddep_jax.data import datasets

# Pad value of images in raw [0, 255] units (black, as MMSegmentation pads), i.e. -1 after
# `normalize_image`. Padded pixels carry label 255, so the loss ignores them anyway.
IMAGE_PAD_VALUE = 0.0
# Margin, in crop_and_resize's normalised coordinates, keeping the last resampled row/column
# inside the source image: float32 rounding could otherwise put that sample just past the edge,
# where it would read the extrapolation value. 1e-6 is ~16 float32 ulps of 1.0 (rounding errors
# grow with the image size, and so does the margin in pixels); it shifts samples by at most
# 1e-6 * (size - 1) pixels.
_EDGE_MARGIN = 1e-6


def normalize_image(image: tf.Tensor) -> tf.Tensor:
  """[0, 255] -> float32 [-1, 1]."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


def to_rgb(image: tf.Tensor) -> tf.Tensor:
  """Repeats a single-channel image to 3 channels; 3-channel images pass through."""
  if image.shape[-1] == 1:
    return tf.image.grayscale_to_rgb(image)
  return image


# ------------------------------------------------------------------------------------------
# Seeds.
# ------------------------------------------------------------------------------------------


def example_seed(seed: int | tf.Tensor, epoch: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
  """Stateless seed [2] int64 of one example in one epoch; `key` is its id string."""
  key_hash = tf.strings.to_hash_bucket_fast(key, 2**63 - 1)  # Stable (FarmHash) across hosts.
  base = tf.stack([tf.cast(seed, tf.int64), tf.constant(0x5EED, tf.int64)])
  per_epoch = tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))
  return tf.random.experimental.stateless_fold_in(per_epoch, key_hash)


# ------------------------------------------------------------------------------------------
# Labels.
# ------------------------------------------------------------------------------------------


def map_labels(mask: tf.Tensor, label_table) -> tf.Tensor:
  """Stored mask values -> train ids via the 256-entry table of `datasets`.

  Args:
    mask: integer [H, W] or [H, W, 1] stored values; -1 marks crop padding.
    label_table: int32 [256] (train id, 255, or UNEXPECTED_LABEL).

  Returns:
    int32 [H, W] train ids; padding and values the dataset never uses become 255 (ignore).
  """
  mask = _squeeze_channel(tf.cast(mask, tf.int32))
  mapped = tf.gather(tf.constant(label_table, tf.int32), tf.clip_by_value(mask, 0, 255))
  return tf.where((mask < 0) | (mapped == datasets.UNEXPECTED_LABEL), constants.IGNORE_LABEL,
                  mapped)


def count_unexpected_labels(mask: tf.Tensor, label_table) -> tf.Tensor:
  """Number of pixels (int32) holding stored values the dataset never uses (padding excluded)."""
  # A histogram of the stored values (bin 256 collects the -1 padding) is cheaper than a
  # per-pixel table lookup on full-size masks.
  values = tf.reshape(tf.cast(mask, tf.int32), [-1])
  counts = tf.math.bincount(tf.where(values < 0, 256, values), minlength=257, maxlength=257)
  unexpected = tf.constant(label_table, tf.int32) == datasets.UNEXPECTED_LABEL
  return tf.reduce_sum(tf.where(unexpected, counts[:256], 0))


def _squeeze_channel(mask: tf.Tensor) -> tf.Tensor:
  return mask[..., 0] if mask.shape.rank == 3 else mask


# ------------------------------------------------------------------------------------------
# Geometry.
# ------------------------------------------------------------------------------------------


def _maybe_flip(x: tf.Tensor, flip) -> tf.Tensor:
  """Left-right flip of [H, W, C] when `flip` (a bool tensor) is true."""
  return tf.cond(tf.convert_to_tensor(flip), lambda: tf.reverse(x, axis=[1]), lambda: x)


def _window_box(start, count, scaled):
  """Normalised crop_and_resize coordinates of rows start..start+count-1 of a rescaled axis.

  The rescaled axis of length `scaled` maps onto the source axis (length H) with aligned
  corners, so sample `i` of the rescaled axis reads source position i * (H-1)/(scaled-1),
  always inside the source for 0 <= i < scaled.
  """
  start, count = tf.cast(start, tf.float32), tf.cast(count, tf.float32)
  denom = tf.maximum(tf.cast(scaled, tf.float32) - 1.0, 1.0)
  margin = tf.where(count > 1.0, _EDGE_MARGIN, 0.0)  # A single sample sits at `start` exactly.
  return start / denom, (start + count - 1.0) / denom - margin


def rescale_crop_flip(image: tf.Tensor, mask: tf.Tensor, *, scale, offset, crop_size,
                      flip) -> tuple[tf.Tensor, tf.Tensor]:
  """Rescales image and mask together, crops `crop_size` at `offset`, pads, flips.

  Equivalent to: resize both by `scale` (image bilinear, mask nearest, aligned corners), take the
  window at `offset` (rescaled coordinates), pad what lies beyond the rescaled image at the
  bottom/right (image IMAGE_PAD_VALUE, mask -1), then flip left-right -- but resamples only the
  pixels of the window.

  Args:
    image: [H, W, C] uint8 or float in [0, 255].
    mask: [H, W, 1] integer stored mask values.
    scale: scalar float, the rescale factor.
    offset: int32 [2], top-left of the window in the rescaled image; in
      [0, max(rescaled - crop, 0)].
    crop_size: (height, width).
    flip: scalar bool.

  Returns:
    (float32 [h, w, C] image in [0, 255] units, int32 [h, w, 1] mask with -1 in the padding).
  """
  crop_h, crop_w = crop_size
  in_hw = tf.shape(image)[:2]
  scaled_hw = rescaled_size(in_hw, scale)
  offset = tf.cast(offset, tf.int32)
  valid_hw = tf.minimum(tf.constant([crop_h, crop_w]), scaled_hw - offset)
  y1, y2 = _window_box(offset[0], valid_hw[0], scaled_hw[0])
  x1, x2 = _window_box(offset[1], valid_hw[1], scaled_hw[1])
  boxes = tf.stack([y1, x1, y2, x2])[None]
  image_crop = tf.image.crop_and_resize(image[None], boxes, [0], valid_hw, method='bilinear',
                                        extrapolation_value=IMAGE_PAD_VALUE)[0]
  mask_crop = tf.image.crop_and_resize(tf.cast(mask, tf.float32)[None], boxes, [0], valid_hw,
                                       method='nearest', extrapolation_value=-1.0)[0]
  pad = [[0, crop_h - valid_hw[0]], [0, crop_w - valid_hw[1]], [0, 0]]
  image_crop = tf.pad(image_crop, pad, constant_values=IMAGE_PAD_VALUE)
  mask_crop = tf.pad(tf.cast(tf.round(mask_crop), tf.int32), pad, constant_values=-1)
  image_crop = tf.ensure_shape(_maybe_flip(image_crop, flip), [crop_h, crop_w, image.shape[-1]])
  mask_crop = tf.ensure_shape(_maybe_flip(mask_crop, flip), [crop_h, crop_w, 1])
  return image_crop, mask_crop


def rescaled_size(size_hw: tf.Tensor, scale) -> tf.Tensor:
  """round(size * scale), at least 1, int32 [2]."""
  scaled = tf.round(tf.cast(size_hw, tf.float32) * tf.cast(scale, tf.float32))
  return tf.maximum(tf.cast(scaled, tf.int32), 1)


def reference_scale(size_hw: tf.Tensor, reference_size) -> tf.Tensor:
  """Factor taking an image to MMSegmentation's keep-ratio `scale=(long, short)`.

  The largest size with long side <= `long` and short side <= `short` (the larger number of the
  pair bounds the long side, as in mmcv's `rescale_size`): (2048, 512) gives a short side of 512
  unless that would make the long side exceed 2048.
  """
  size = tf.cast(size_hw, tf.float32)
  long_side, short_side = float(max(reference_size)), float(min(reference_size))
  return tf.minimum(long_side / tf.reduce_max(size), short_side / tf.reduce_min(size))


def random_rescale_crop_flip(image, mask, seed, *, crop_size, scale_range, flip=True,
                             reference_size=None):
  """Segmentation train augmentation: random rescale, random crop (padded), random flip.

  The scale is uniform in `scale_range` (MMSegmentation's ratio_range, default 0.5-2.0), the
  window uniform over the rescaled image, flip with probability 1/2 (paper §5). The ratio is
  relative to the stored image, or with `reference_size=(long, short)` to that keep-ratio
  scale (`reference_scale`), as MMSegmentation's RandomResize(scale=(2048, 512)) is, so that
  training sees objects at the scale evaluation resizes them to.
  """
  scale_seed, offset_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=3))
  scale = tf.random.stateless_uniform([], scale_seed, minval=scale_range[0],
                                      maxval=scale_range[1])
  if reference_size is not None:
    scale *= reference_scale(tf.shape(image)[:2], reference_size)
  scaled_hw = rescaled_size(tf.shape(image)[:2], scale)
  max_offset = tf.maximum(scaled_hw - tf.constant(crop_size), 0)
  u = tf.random.stateless_uniform([2], offset_seed)
  offset = tf.minimum(tf.cast(u * tf.cast(max_offset + 1, tf.float32), tf.int32), max_offset)
  do_flip = flip & (tf.random.stateless_uniform([], flip_seed) < 0.5)
  return rescale_crop_flip(image, mask, scale=scale, offset=offset, crop_size=crop_size,
                           flip=do_flip)


def inception_crop_flip(image, seed, *, crop_size, area_range=(0.05, 1.0),
                        aspect_ratio_range=(3 / 4, 4 / 3), flip=True):
  """Inception-style crop (random area and aspect ratio) resized to `crop_size`, random flip.

  Used for denoising pretraining (224x224, paper §5) and supervised encoder pretraining.
  Returns float32 [h, w, C] in [0, 255] units.
  """
  box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      seed=box_seed, min_object_covered=0.0, aspect_ratio_range=aspect_ratio_range,
      area_range=area_range, max_attempts=10, use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, size)
  crop = tf.image.resize(crop, crop_size, method='bilinear')
  do_flip = flip & (tf.random.stateless_uniform([], flip_seed) < 0.5)
  return tf.ensure_shape(_maybe_flip(crop, do_flip), [*crop_size, image.shape[-1]])


# ------------------------------------------------------------------------------------------
# Evaluation.
# ------------------------------------------------------------------------------------------


def eval_size(size_hw: tf.Tensor, resize) -> tf.Tensor:
  """Image size after the eval resize: None keeps it, an int sets the short side, (h, w) fixes."""
  size_hw = tf.cast(size_hw, tf.int32)
  if resize is None:
    return size_hw
  if isinstance(resize, int):
    size = tf.cast(size_hw, tf.float64)
    scaled = tf.round(size * float(resize) / tf.reduce_min(size))
    return tf.maximum(tf.cast(scaled, tf.int32), 1)
  return tf.constant([int(resize[0]), int(resize[1])], tf.int32)


def resize_image_and_mask(image, mask, size_hw):
  """Resizes image (bilinear, float32 out) and mask (nearest) to `size_hw`."""
  image = tf.image.resize(image, size_hw, method='bilinear')
  if mask is not None:
    mask = tf.image.resize(mask, size_hw, method='nearest')
  return image, mask


def pad_to_size(image, labels, size_hw):
  """Pads image (IMAGE_PAD_VALUE) and labels [H, W] (255) at the bottom/right to `size_hw`."""
  hw = tf.shape(image)[:2]
  pad_hw = tf.constant(size_hw, tf.int32) - hw
  image = tf.pad(image, [[0, pad_hw[0]], [0, pad_hw[1]], [0, 0]],
                 constant_values=IMAGE_PAD_VALUE)
  image = tf.ensure_shape(image, [*size_hw, image.shape[-1]])
  if labels is not None:
    labels = tf.pad(labels, [[0, pad_hw[0]], [0, pad_hw[1]]],
                    constant_values=constants.IGNORE_LABEL)
    labels = tf.ensure_shape(labels, list(size_hw))
  return image, labels


def resize_small_central_crop(image, size: int):
  """Resizes the short side to `size` and takes the central size x size crop."""
  hw = eval_size(tf.shape(image)[:2], int(size))
  image = tf.image.resize(image, hw, method='bilinear')
  top, left = (hw[0] - size) // 2, (hw[1] - size) // 2
  return tf.ensure_shape(image[top:top + size, left:left + size], [size, size, image.shape[-1]])


_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def encoded_image_size(encoded: tf.Tensor) -> tf.Tensor:
  """(height, width) int32 of an encoded image, from the JPEG/PNG header when possible."""

  def png_size():
    # IHDR: width and height as big-endian uint32 at bytes 16..24.
    b = tf.cast(tf.io.decode_raw(tf.strings.substr(encoded, 16, 8), tf.uint8), tf.int32)
    width = ((b[0] * 256 + b[1]) * 256 + b[2]) * 256 + b[3]
    height = ((b[4] * 256 + b[5]) * 256 + b[6]) * 256 + b[7]
    return tf.stack([height, width])

  def decoded_size():
    return tf.shape(tf.io.decode_image(encoded, expand_animations=False))[:2]

  is_png = tf.equal(tf.strings.substr(encoded, 0, 8), _PNG_SIGNATURE)
  return tf.case([(tf.io.is_jpeg(encoded), lambda: tf.io.extract_jpeg_shape(encoded)[:2]),
                  (is_png, png_size)], default=decoded_size)
