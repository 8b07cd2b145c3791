"""Segmentation inference protocols, per image: whole image, sliding window, multi-scale and flips.

The prediction of an image is a function of that image alone, as in MMSegmentation's per-image
`slide_inference` / `SegTTAModel` (what the paper's Pascal Context and ADE20K numbers follow):

* each scale resizes the image itself (bilinear, half-pixel centres, no antialiasing; its own
  size times the scale, rounded) and the flip mirrors the image itself;
* sliding windows of `crop_size` every `stride` pixels are laid on the image's own (scaled)
  height and width, the last window flush with its border; an image smaller than the crop along
  an axis is one window along that axis; logits of overlapping windows are averaged;
* where the model needs a multiple of `size_divisor`, the window is padded bottom/right with 0
  (the padding MMSegmentation applies after normalisation) and the logits are cropped back;
* logits are resized back to the image's own size, and the softmax probabilities of all scales
  and flips are averaged.

Batches. Images arrive padded to a common canvas [B, H, W, 3] with their own (height, width) in
`sizes` [B, 2]; pixels outside an image are never read (they are set to 0 first). The model input
of an image (its padded window shape) is a function of the image's own size, so one jitted
program cannot serve every image of a mixed-size batch: `plan` groups the (scale, image) pairs of
a batch into `Unit`s by padded window shape, and `unit_probabilities` runs one unit on the whole
batch (a pure, traceable function; images outside the unit contribute 0), the windows at fixed
shape with per-image offsets. One XLA program per distinct unit, reused across batches: for a
split, at most (number of scales) x (distinct padded window shapes) x (distinct window counts,
rounded up to powers of two; a shape takes the largest count in the batch). Images at least as
large as the crop share the crop's shape; only images smaller than the crop at some scale add
shapes (one per 16-px step of each short side). ADE20K-like split (short side 512, crop 512,
six scales 0.5 ... 1.75): one shape at each scale >= 1 (times its window counts met across
batches: 1, 2, 4, 8 or 16), and at scales 0.5 and 0.75 one per 16-px step of the scaled long
side below 512 (portrait and landscape apart): 54 shapes for aspect ratios from 1:4 to 4:1,
16 for the common ones (512x512, 512x640, 512x683,
512x768, 512x910, 512x1024 and their portraits). A Pascal Context-like split (images of at most
500 px, all smaller than the crop at scales <= 1) can need many more: up to 252 for every
height and width from 100 to 500 px.
Cityscapes (all frames 1024x2048, the halves protocol) is a single program.

`predict_image_probabilities` runs a protocol on ONE image of any size (for prediction tools);
`predict_probabilities` on a batch with concrete sizes.

The paper's protocols (§5.1):
* Cityscapes: full 1024x2048 frames as two 1024x1024 halves, each averaged with its horizontal
  flip, concatenated: `mode='sliding', crop_size=(1024, 1024), stride=(1024, 1024), flip=True`
  (`CITYSCAPES_HALVES`);
* Pascal Context / ADE20K: scales (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) plus flips
  (`MULTI_SCALE_SCALES`).
"""

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PredictFn = Callable[[jax.Array], jax.Array]

MULTI_SCALE_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
CITYSCAPES_HALVES = dict(mode='sliding', crop_size=(1024, 1024), stride=(1024, 1024), flip=True)


# ------------------------------------------------------------------------------------------------
# Geometry (host side, python ints).
# ------------------------------------------------------------------------------------------------


def check_protocol(mode: str, scales: Sequence[float], crop_size, stride) -> None:
  if mode not in ('whole', 'sliding'):
    raise ValueError(f"Unknown inference mode {mode!r}; use 'whole' or 'sliding'.")
  if mode == 'sliding' and (crop_size is None or stride is None):
    raise ValueError("mode='sliding' needs crop_size and stride (e.g. (1024, 1024) for "
                     'the Cityscapes halves protocol).')
  if mode == 'sliding' and min(*crop_size, *stride) <= 0:
    raise ValueError(f'Sliding window needs positive crop and stride, got {crop_size} and '
                     f'{stride}.')
  if not scales:
    raise ValueError('scales must name at least one scale factor, e.g. (1.0,).')


def scaled_length(length: int, scale: float) -> int:
  """An image side after rescaling by `scale` (MMCV's `int(x * scale + 0.5)`), in float32 like
  the jitted programs, so that host plans and device membership agree."""
  return max(1, int(np.floor(np.float32(length) * np.float32(scale) + np.float32(0.5))))


def window_starts(length: int, crop: int, stride: int) -> list[int]:
  """Start offsets of the sliding windows along one axis (MMSeg's grid).

  `max(length - crop + stride - 1, 0) // stride + 1` windows at multiples of `stride`, the last
  one moved back so that it ends at the border.
  """
  if crop <= 0 or stride <= 0:
    raise ValueError(f'Sliding window needs positive crop and stride, got {crop} and {stride}.')
  num = max(length - crop + stride - 1, 0) // stride + 1
  return sorted({max(min(i * stride + crop, length) - crop, 0) for i in range(num)})


def _round_up(x, multiple):
  return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Unit:
  """One jitted program: the images of a batch at `scale` whose padded window is `window`.

  Attributes:
    scale: the test scale.
    window: (height, width) of the model input, a multiple of the size divisor.
    num_windows: windows per image run (a power of two >= every member image's own count).
  """
  scale: float
  window: tuple[int, int]
  num_windows: int


def _axis_geometry(length: int, crop: int | None, stride: int | None, divisor: int):
  """(padded window length, number of windows) of an image side of `length` pixels."""
  crop_eff = length if crop is None else min(crop, length)
  num = 1 if crop is None else max(length - crop_eff + stride - 1, 0) // stride + 1
  return _round_up(crop_eff, divisor), num


def plan(sizes, *, mode: str = 'whole', scales: Sequence[float] = (1.0,),
         crop_size: Sequence[int] | None = None, stride: Sequence[int] | None = None,
         size_divisor: int = 16) -> list[Unit]:
  """The units that cover every image of `sizes` ([N, 2] own heights and widths; rows with a 0
  are skipped) at every scale, in a fixed order (the same on every host given the same sizes)."""
  check_protocol(mode, scales, crop_size, stride)
  crop = (None, None) if mode == 'whole' else tuple(int(c) for c in crop_size)
  step = (None, None) if mode == 'whole' else tuple(int(s) for s in stride)
  units = []
  for scale in scales:
    counts = {}
    for height, width in np.asarray(sizes).reshape(-1, 2).tolist():
      if height <= 0 or width <= 0:
        continue
      (wh, nh), (ww, nw) = (_axis_geometry(scaled_length(n, scale), crop[a], step[a],
                                           size_divisor) for a, n in enumerate((height, width)))
      counts[(wh, ww)] = max(counts.get((wh, ww), 0), nh * nw)
    units.extend(Unit(float(scale), window, 1 << (count - 1).bit_length())
                 for window, count in sorted(counts.items()))
  return units


# ------------------------------------------------------------------------------------------------
# Per-image array operations (traceable; `n` arguments are traced own sizes).
# ------------------------------------------------------------------------------------------------


def _resize_axis(x: jax.Array, axis: int, n_in, n_out, out_len: int) -> jax.Array:
  """Bilinear resize of the first `n_in` entries along `axis` to `n_out` entries, in an axis of
  static length `out_len` (zero beyond `n_out`); the weights of `jax.image.resize(...,
  'bilinear', antialias=False)` on the image alone (half-pixel centres, edge taps renormalised)."""
  n_in_f = jnp.asarray(n_in, jnp.float32)
  inv_scale = 1.0 / (jnp.asarray(n_out, jnp.float32) / n_in_f)
  sample = (jnp.arange(out_len, dtype=jnp.float32) + 0.5) * inv_scale - 0.5
  left = jnp.floor(sample)
  w_right = sample - left
  w_left = 1.0 - w_right
  left = left.astype(jnp.int32)
  w_left = jnp.where(left >= 0, w_left, 0.0)
  w_right = jnp.where(left + 1 <= n_in - 1, w_right, 0.0)
  total = w_left + w_right
  inside = jnp.arange(out_len) < n_out
  w_left = jnp.where(inside, w_left / total, 0.0)
  w_right = jnp.where(inside, w_right / total, 0.0)
  last = x.shape[axis] - 1
  shape = [1] * x.ndim
  shape[axis] = out_len
  a = jnp.take(x, jnp.clip(left, 0, last), axis=axis)
  b = jnp.take(x, jnp.clip(left + 1, 0, last), axis=axis)
  return a * w_left.reshape(shape) + b * w_right.reshape(shape)


def _resize_image(x: jax.Array, size_in, size_out, out_hw: tuple[int, int]) -> jax.Array:
  """[H, W, C] holding an image of `size_in` at its top left -> [*out_hw, C] holding it resized
  to `size_out` (zeros elsewhere)."""
  x = _resize_axis(x, 0, size_in[0], size_out[0], out_hw[0])
  return _resize_axis(x, 1, size_in[1], size_out[1], out_hw[1])


def _flip_image(x: jax.Array, width) -> jax.Array:
  """Mirrors the first `width` columns of [H, W, C] (the image itself, not the canvas)."""
  cols = jnp.arange(x.shape[1])
  return jnp.take(x, jnp.where(cols < width, width - 1 - cols, cols), axis=1)


def _inside(size, hw: tuple[int, int]) -> jax.Array:
  """[H, W, 1] mask of the pixels of an image of own `size` in an [H, W] canvas."""
  rows = jnp.arange(hw[0])[:, None] < size[0]
  return (rows & (jnp.arange(hw[1])[None, :] < size[1]))[..., None]


def _window_logits(predict_fn: PredictFn, x: jax.Array, sizes: jax.Array, unit: Unit,
                   crop_size, stride) -> jax.Array:
  """Averaged window logits [B, H, W, K] of the images x [B, H, W, C] of own `sizes`.

  Every image runs `unit.num_windows` windows of shape `unit.window` (window-major in one model
  batch); windows beyond an image's own count, and window pixels beyond its own crop, add nothing.
  """
  batch, height, width, _ = x.shape
  wh, ww = unit.window
  if crop_size is None:  # Whole image: one window from the top left.
    crop_h, crop_w = sizes[:, 0], sizes[:, 1]
    stride_h = stride_w = 1
  else:
    crop_h, crop_w = jnp.minimum(crop_size[0], sizes[:, 0]), jnp.minimum(crop_size[1], sizes[:, 1])
    stride_h, stride_w = int(stride[0]), int(stride[1])
  num_h = jnp.maximum(sizes[:, 0] - crop_h + stride_h - 1, 0) // stride_h + 1
  num_w = jnp.maximum(sizes[:, 1] - crop_w + stride_w - 1, 0) // stride_w + 1
  if crop_size is None:
    num_h = num_w = jnp.ones_like(num_h)
  # Room for windows that reach past the canvas (divisor padding), so slices never shift.
  x = jnp.pad(x, ((0, 0), (0, wh), (0, ww), (0, 0)))
  in_window = ((jnp.arange(wh)[None, :, None] < crop_h[:, None, None])
               & (jnp.arange(ww)[None, None, :] < crop_w[:, None, None]))[..., None]
  # Window k of every image, [num_windows, B]: row-major over the image's own grid.
  k = jnp.arange(unit.num_windows)[:, None]
  valid = k < num_h * num_w
  top = jnp.maximum(jnp.minimum((k // num_w) * stride_h + crop_h, sizes[:, 0]) - crop_h, 0)
  left = jnp.maximum(jnp.minimum((k % num_w) * stride_w + crop_w, sizes[:, 1]) - crop_w, 0)
  top, left = jnp.where(valid, top, 0), jnp.where(valid, left, 0)

  def crop(image, t, l):
    return jax.lax.dynamic_slice(image, (t, l, 0), (wh, ww, image.shape[-1]))

  # MMSeg pads a window after normalisation: 0. Stacked window-major, one model batch.
  windows = [jnp.where(in_window, jax.vmap(crop)(x, top[i], left[i]), 0.0)
             for i in range(unit.num_windows)]
  logits = predict_fn(jnp.concatenate(windows, axis=0)).astype(jnp.float32)
  logits = logits.reshape(unit.num_windows, batch, wh, ww, logits.shape[-1])
  total = jnp.zeros((batch, height + wh, width + ww, logits.shape[-1]), jnp.float32)
  count = jnp.zeros((batch, height + wh, width + ww, 1), jnp.float32)

  def add(acc, value, t, l):
    region = jax.lax.dynamic_slice(acc, (t, l, 0), value.shape)
    return jax.lax.dynamic_update_slice(acc, region + value, (t, l, 0))

  def add_window(index, sums):  # In window order, as MMSeg's loop adds them.
    total, count = sums
    keep = in_window & valid[index][:, None, None, None]
    total = jax.vmap(add)(total, jnp.where(keep, logits[index], 0.0), top[index], left[index])
    count = jax.vmap(add)(count, jnp.where(keep, 1.0, 0.0), top[index], left[index])
    return total, count

  total, count = jax.lax.fori_loop(0, unit.num_windows, add_window, (total, count))
  total, count = total[:, :height, :width], count[:, :height, :width]
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def unit_probabilities(predict_fn: PredictFn, images: jax.Array, sizes: jax.Array, unit: Unit,
                       *, mode: str = 'whole', flip: bool = False,
                       crop_size: Sequence[int] | None = None,
                       stride: Sequence[int] | None = None, size_divisor: int = 16) -> jax.Array:
  """Summed softmax probabilities [B, H, W, K] of `unit` (and its flip) per image.

  Pure and traceable in `images` (float32 [B, H, W, 3] canvas) and `sizes` (int [B, 2], own
  height and width; 0 for padding examples). Images whose padded window at `unit.scale` is not
  `unit.window`, and pixels outside each image, get 0.
  """
  height, width = images.shape[1:3]
  sizes = jnp.asarray(sizes, jnp.int32)
  crop = None if mode == 'whole' else tuple(int(c) for c in crop_size)
  canvas = (height, width)
  if unit.scale == 1.0:
    scaled_sizes, scaled_canvas = sizes, canvas
  else:
    scaled_sizes = jnp.maximum(jnp.floor(sizes * unit.scale + 0.5).astype(jnp.int32), 1)
    scaled_canvas = tuple(scaled_length(n, unit.scale) for n in canvas)
  # Members: valid images whose own padded window at this scale is the unit's (`plan`).
  member = jnp.all(sizes > 0, axis=-1)
  for a in (0, 1):
    own = scaled_sizes[:, a] if crop is None else jnp.minimum(scaled_sizes[:, a], crop[a])
    member &= _round_up(own, size_divisor) == unit.window[a]
  x = jnp.where(jax.vmap(_inside, in_axes=(0, None))(sizes, canvas), images, 0.0)
  if unit.scale != 1.0:
    x = jax.vmap(_resize_image, in_axes=(0, 0, 0, None))(x, sizes, scaled_sizes, scaled_canvas)
  total = 0.0
  for flipped in ((False, True) if flip else (False,)):
    xi = jax.vmap(_flip_image)(x, scaled_sizes[:, 1]) if flipped else x
    logits = _window_logits(predict_fn, xi, scaled_sizes, unit, crop, stride)
    if flipped:
      logits = jax.vmap(_flip_image)(logits, scaled_sizes[:, 1])
    if unit.scale != 1.0:
      logits = jax.vmap(_resize_image, in_axes=(0, 0, 0, None))(logits, scaled_sizes, sizes,
                                                                  canvas)
    keep = jax.vmap(_inside, in_axes=(0, None))(sizes, canvas) & member[:, None, None, None]
    total = total + jnp.where(keep, jax.nn.softmax(logits, axis=-1), 0.0)
  return total


# Compiled per (predict_fn, unit, protocol, shapes); inlined when called inside another jit.
_jitted_unit_probabilities = jax.jit(
    unit_probabilities, static_argnums=(0, 3),
    static_argnames=('mode', 'flip', 'crop_size', 'stride', 'size_divisor'))


def predict_probabilities(predict_fn: PredictFn, images: jax.Array, sizes=None, *,
                          mode: str = 'whole', scales: Sequence[float] = (1.0,),
                          flip: bool = False, crop_size: Sequence[int] | None = None,
                          stride: Sequence[int] | None = None,
                          size_divisor: int = 16) -> jax.Array:
  """Class probabilities [B, H, W, K] of each image under the inference protocol.

  Args:
    predict_fn: images -> logits.
    images: float32 [B, H, W, 3], each image at the top left of the canvas.
    sizes: [B, 2] own (height, width) of each image, concrete (numpy): the plan of programs
      depends on it. None: every image fills the canvas. Inside `jax.jit`, use `plan` and
      `unit_probabilities` (the sizes traced, the plan computed outside).
    mode: 'whole' or 'sliding'.
    scales: image scale factors; probabilities are averaged over them (multi-scale testing).
    flip: also average the horizontally flipped prediction.
    crop_size, stride: sliding-window geometry (at each scale), required for mode='sliding'.
    size_divisor: the model's input granularity (16 for the TransUNet, 32 for the R50 U-Net).

  Returns:
    The averaged probabilities; 0 outside each image and for images of size 0.
  """
  check_protocol(mode, scales, crop_size, stride)
  if sizes is None:
    sizes = np.broadcast_to(np.asarray(images.shape[1:3], np.int32), (images.shape[0], 2))
  sizes = np.asarray(sizes, np.int32)
  protocol = dict(mode=mode, flip=flip, crop_size=None if crop_size is None else tuple(crop_size),
                  stride=None if stride is None else tuple(stride), size_divisor=size_divisor)
  total = 0.0
  for unit in plan(sizes, mode=mode, scales=scales, crop_size=crop_size, stride=stride,
                   size_divisor=size_divisor):
    total = total + _jitted_unit_probabilities(predict_fn, images, sizes, unit, **protocol)
  return total / num_predictions(scales, flip)


def num_predictions(scales: Sequence[float], flip: bool) -> int:
  """Predictions averaged per image: one per scale, twice with flips."""
  return len(scales) * (2 if flip else 1)


def predict_image_probabilities(predict_fn: PredictFn, image, *, mode: str = 'whole',
                                scales: Sequence[float] = (1.0,), flip: bool = False,
                                crop_size: Sequence[int] | None = None,
                                stride: Sequence[int] | None = None,
                                size_divisor: int = 16) -> jax.Array:
  """Class probabilities [H, W, K] of ONE image [H, W, 3] of any size (normalised to [-1, 1])
  under the protocol (arguments as `predict_probabilities`), e.g. for a prediction tool::

    probs = inference.predict_image_probabilities(
        lambda x: model.apply({'params': params}, x, train=False)[0], image,
        mode='sliding', crop_size=(512, 512), stride=(341, 341), flip=True,
        scales=inference.MULTI_SCALE_SCALES)
    labels = probs.argmax(-1)

  Each distinct padded window shape traces the model once (wrap `predict_fn` in `jax.jit`).
  """
  image = jnp.asarray(image, jnp.float32)
  if image.ndim != 3:
    raise ValueError(f'Expected one image [H, W, C], got shape {image.shape}.')
  return predict_probabilities(predict_fn, image[None], None, mode=mode, scales=scales,
                               flip=flip, crop_size=crop_size, stride=stride,
                               size_divisor=size_divisor)[0]
