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
of an image (its padded window) is a function of the image's own size, so one jitted program
cannot serve every image of a mixed-size batch: `inference_plan.plan` groups the (scale, image)
pairs of a batch into `Unit`s by (window shape, window grid, canvas), and `unit_probabilities`
runs one unit (a pure, traceable function), the windows at fixed shape with per-image offsets.
The scale is not part of a program (each member's own size at the scale is an argument), so
scales share programs.

Memory and compute follow the unit's members, not the batch: `unit_probabilities` loops over the
images of the batch one at a time and skips those outside the unit (`lax.cond`: no model call),
adding each member's probabilities to the sums (in place where they are donated). So a program
holds, besides its arguments and the probability sums [B, H, W, K], one image's buffers: the
rescaled image and its window sums at the unit's canvas (the grid's extent, less than one stride
beyond the member's own scaled size per axis), and its probabilities at the batch canvas; the
model sees at most two windows per call (larger grids loop), whatever the scale and the batch.
The evaluator runs
the programs under `jax.shard_map`, each device looping over its own images. With ADE20K's 150
classes at scale 1.75 one image's window sums are up to 1194x1876x150 float32 (1.3 GB): the
largest program of the ADE20K 6-scale + flip protocol at batch 4 on one device needs 7.3 GB,
where running the unit on the whole batch needed 21.5 GB (docs/performance.md). The model's
batch is the same for every batch size, so an image's probabilities do not depend on what else
is in its batch or on the number of devices (XLA's CPU matmuls, for one, round differently with
their number of rows).

Programs: one per distinct unit of the split, reused across batches and scales; how many an
ADE20K- or Pascal Context-like split compiles: `ddep_jax.inference_plan`.

`predict_image_probabilities` runs a protocol on ONE image of any size (for prediction tools);
`predict_probabilities` on a batch with concrete sizes.

The paper's protocols (§5.1):
* Cityscapes: full 1024x2048 frames as two 1024x1024 halves, each averaged with its horizontal
  flip, concatenated: `mode='sliding', crop_size=(1024, 1024), stride=(1024, 1024), flip=True`
  (`CITYSCAPES_HALVES`);
* Pascal Context / ADE20K: scales (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) plus flips
  (`MULTI_SCALE_SCALES`).
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddep_jax import inference_plan

PredictFn = Callable[[jax.Array], jax.Array]

MULTI_SCALE_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
CITYSCAPES_HALVES = dict(mode='sliding', crop_size=(1024, 1024), stride=(1024, 1024), flip=True)


# ------------------------------------------------------------------------------------------------
# Per-image array operations (traceable; `n` arguments are traced own sizes).
# ------------------------------------------------------------------------------------------------


def _resize_axis(x: jax.Array, axis: int, n_in, n_out, out_len: int) -> jax.Array:
  """Bilinear resize of the first `n_in` entries along `axis` to `n_out` entries, in an axis of
  static length `out_len` (zero beyond `n_out`); the weights of `jax.image.resize(...,
  'bilinear', antialias=False)` on the image alone (half-pixel centres, edge taps renormalised).
  Sizes of 0 (images outside the program) give zeros."""
  n_in_f = jnp.asarray(jnp.maximum(n_in, 1), jnp.float32)
  inv_scale = 1.0 / (jnp.asarray(jnp.maximum(n_out, 1), jnp.float32) / n_in_f)
  sample = (jnp.arange(out_len, dtype=jnp.float32) + 0.5) * inv_scale - 0.5
  left = jnp.floor(sample)
  w_right = sample - left
  w_left = 1.0 - w_right
  left = left.astype(jnp.int32)
  w_left = jnp.where(left >= 0, w_left, 0.0)
  w_right = jnp.where(left + 1 <= n_in - 1, w_right, 0.0)
  total = w_left + w_right
  inside = (jnp.arange(out_len) < n_out) & (total > 0)
  w_left = jnp.where(inside, w_left / jnp.where(inside, total, 1.0), 0.0)
  w_right = jnp.where(inside, w_right / jnp.where(inside, total, 1.0), 0.0)
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


def _fit(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """[H, W, C] cut or zero-padded bottom/right to [*hw, C] (the image sits at the top left)."""
  x = x[:hw[0], :hw[1]]
  return jnp.pad(x, ((0, hw[0] - x.shape[0]), (0, hw[1] - x.shape[1]), (0, 0)))


def _flip_image(x: jax.Array, width) -> jax.Array:
  """Mirrors the first `width` columns of [H, W, C] (the image itself, not the canvas)."""
  cols = jnp.arange(x.shape[1])
  return jnp.take(x, jnp.where(cols < width, width - 1 - cols, cols), axis=1)


def _inside(size, hw: tuple[int, int]) -> jax.Array:
  """[H, W, 1] mask of the pixels of an image of own `size` in an [H, W] canvas."""
  rows = jnp.arange(hw[0])[:, None] < size[0]
  return (rows & (jnp.arange(hw[1])[None, :] < size[1]))[..., None]


# Windows per model call: a grid of at most this many (Cityscapes' two halves) is one call;
# larger grids loop over groups, so the model's batch (and its activations and logits) stays
# this many windows whatever the scale.
_WINDOWS_PER_CALL = 2


def _windows_per_call(unit: inference_plan.Unit) -> int:
  per_call = _WINDOWS_PER_CALL if unit.num_windows % _WINDOWS_PER_CALL == 0 else 1
  return min(per_call, unit.num_windows)


def _window_logits(predict_fn: PredictFn, x: jax.Array, size: jax.Array, unit: inference_plan.Unit,
                   crop_size, stride, num_classes: int) -> jax.Array:
  """Averaged window logits [*unit.canvas, K] of ONE image x [*unit.canvas, C] of own `size`
  (at the scale of the unit).

  The image runs the unit's grid of windows of shape `unit.window`, at most `_WINDOWS_PER_CALL`
  of them in one model batch; window pixels beyond the image's own crop add nothing.
  """
  wh, ww = unit.window
  size = jnp.maximum(size, 1)
  if crop_size is None:  # Whole image: one window from the top left.
    crop_h, crop_w = size[0], size[1]
    stride_h = stride_w = 1
  else:
    crop_h, crop_w = jnp.minimum(crop_size[0], size[0]), jnp.minimum(crop_size[1], size[1])
    stride_h, stride_w = int(stride[0]), int(stride[1])
  num_w = unit.grid[1]
  in_window = ((jnp.arange(wh)[:, None] < crop_h) & (jnp.arange(ww)[None, :] < crop_w))[..., None]

  def offsets(k):  # Window k, row-major over the grid (MMSeg's order).
    top = jnp.maximum(jnp.minimum((k // num_w) * stride_h + crop_h, size[0]) - crop_h, 0)
    left = jnp.maximum(jnp.minimum((k % num_w) * stride_w + crop_w, size[1]) - crop_w, 0)
    return top, left

  def add(acc, value, k):
    top, left = offsets(k)
    region = jax.lax.dynamic_slice(acc, (top, left, 0), value.shape)
    return jax.lax.dynamic_update_slice(acc, region + value, (top, left, 0))

  per_call = _windows_per_call(unit)

  def group_logits(group):  # [per_call, wh, ww, K] of windows group * per_call + i.
    # MMSeg pads a window after normalisation: 0.
    windows = [jnp.where(in_window, jax.lax.dynamic_slice(
        x, (*offsets(group * per_call + i), 0), (wh, ww, x.shape[-1])), 0.0)
               for i in range(per_call)]
    return predict_fn(jnp.stack(windows)).astype(jnp.float32)

  def add_group(group, logits, sums):
    total, count = sums
    for i in range(per_call):  # In window order, as MMSeg's loop adds them.
      total = add(total, jnp.where(in_window, logits[i], 0.0), group * per_call + i)
      count = add(count, jnp.where(in_window, 1.0, 0.0), group * per_call + i)
    return total, count

  zeros = (jnp.zeros((*unit.canvas, num_classes), jnp.float32),
           jnp.zeros((*unit.canvas, 1), jnp.float32))
  num_calls = unit.num_windows // per_call
  if num_calls == 1:
    total, count = add_group(0, group_logits(0), zeros)
  else:  # The model appears once in the program, in the loop body.
    total, count = jax.lax.fori_loop(0, num_calls, lambda g, sums: add_group(
        g, group_logits(g), sums), zeros)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def _image_probabilities(predict_fn: PredictFn, image: jax.Array, size, scaled_size,
                         unit: inference_plan.Unit, *, crop_size, stride, flip: bool,
                         num_classes: int) -> jax.Array:
  """Summed softmax probabilities [H, W, K] of ONE member image [H, W, C] of own `size`, at
  the unit's scale (where its size is `scaled_size`), and of its flip; 0 outside the image."""
  canvas = image.shape[:2]
  inside = _inside(size, canvas)
  x = jnp.where(inside, image, 0.0)
  if unit.rescale:
    x = _resize_image(x, size, scaled_size, unit.canvas)
  else:  # The image fits the unit's canvas.
    x = _fit(x, unit.canvas)
  total = 0.0
  for flipped in ((False, True) if flip else (False,)):
    xi = _flip_image(x, scaled_size[1]) if flipped else x
    logits = _window_logits(predict_fn, xi, scaled_size, unit, crop_size, stride, num_classes)
    if flipped:
      logits = _flip_image(logits, scaled_size[1])
    if unit.rescale:
      logits = _resize_image(logits, scaled_size, size, canvas)
    else:
      logits = _fit(logits, canvas)
    total = total + jnp.where(inside, jax.nn.softmax(logits, axis=-1), 0.0)
  return total


def unit_probabilities(predict_fn: PredictFn, images: jax.Array, sizes: jax.Array,
                       scaled_sizes: jax.Array, unit: inference_plan.Unit, *, mode: str = 'whole',
                       flip: bool = False, crop_size: Sequence[int] | None = None,
                       stride: Sequence[int] | None = None,
                       probability_sums: jax.Array | None = None) -> jax.Array:
  """`probability_sums` plus the summed softmax probabilities of `unit` (and its flip) per image.

  Pure and traceable in `images` (float32 [B, H, W, 3] canvas), `sizes` (int [B, 2], own height
  and width; 0 for padding examples), `scaled_sizes` (int [B, 2], a member's own size at the
  scale of this call, 0 for every image outside the unit: `plan` gives them) and
  `probability_sums` (float32 [B, H, W, K]; None: zeros). Returns [B, H, W, K]: images outside
  the unit, and pixels outside each image, get nothing added.

  The images are run one at a time (a loop over the batch), and an image outside the unit is
  skipped (`lax.cond`: no model call, its sums passed on), so memory and compute follow the
  unit's members, not the batch: one image's window sums at the unit's canvas and its
  probabilities at the batch canvas are held at a time, whatever the batch size. Donate
  `probability_sums` to update it in place. For a batch sharded over devices, call this inside
  `jax.shard_map` (as `evaluate` does), so that each device loops over its own images; under
  plain `jax.jit` the loop would gather the batch.
  """
  sizes = jnp.asarray(sizes, jnp.int32)
  scaled_sizes = jnp.asarray(scaled_sizes, jnp.int32)
  geometry = dict(crop_size=None if mode == 'whole' else tuple(int(c) for c in crop_size),
                  stride=stride, flip=flip)
  if probability_sums is None:
    # The sums need the model's number of classes before the loop runs it. jit caches the
    # model's trace, so this trace (at the loop's window batch) is the only one.
    predict_fn = jax.jit(predict_fn)
    windows = jax.ShapeDtypeStruct((_windows_per_call(unit), *unit.window, images.shape[-1]),
                                   jnp.float32)
    probability_sums = jnp.zeros((*images.shape[:3], jax.eval_shape(predict_fn, windows).shape[-1]),
                                 jnp.float32)
  geometry['num_classes'] = probability_sums.shape[-1]

  def add_image(i, sums):
    def add_member(own):
      return own + _image_probabilities(predict_fn, images[i], sizes[i], scaled_sizes[i], unit,
                                        **geometry)
    own = jax.lax.dynamic_index_in_dim(sums, i, keepdims=False)
    own = jax.lax.cond(jnp.all(scaled_sizes[i] > 0), add_member, lambda own: own, own)
    return jax.lax.dynamic_update_index_in_dim(sums, own, i, 0)

  return jax.lax.fori_loop(0, images.shape[0], add_image, probability_sums)


# Compiled per (predict_fn, unit, protocol, shapes); inlined when called inside another jit.
_jitted_unit_probabilities = jax.jit(
    unit_probabilities, static_argnums=(0, 4),
    static_argnames=('mode', 'flip', 'crop_size', 'stride'),
    donate_argnames=('probability_sums',))


def predict_probabilities(predict_fn: PredictFn, images: jax.Array, sizes=None, *,
                          mode: str = 'whole', scales: Sequence[float] = (1.0,),
                          flip: bool = False, crop_size: Sequence[int] | None = None,
                          stride: Sequence[int] | None = None, size_divisor: int = 16,
                          window_step: int | None = None) -> jax.Array:
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
    window_step: see `plan` (None: `size_divisor`, MMSegmentation's padding).

  Returns:
    The averaged probabilities; 0 outside each image and for images of size 0. Each program
    runs the images of its unit one at a time (`unit_probabilities`).
  """
  inference_plan.check_protocol(mode, scales, crop_size, stride)
  if sizes is None:
    sizes = np.broadcast_to(np.asarray(images.shape[1:3], np.int32), (images.shape[0], 2))
  sizes = np.asarray(sizes, np.int32)
  protocol = dict(mode=mode, flip=flip, crop_size=None if crop_size is None else tuple(crop_size),
                  stride=None if stride is None else tuple(stride))
  calls = inference_plan.plan(sizes, mode=mode, scales=scales, crop_size=crop_size, stride=stride,
               size_divisor=size_divisor, window_step=window_step)
  if not calls:
    raise ValueError(f'No image to predict: every size in {sizes.tolist()} has a 0.')
  total = None  # The first unit makes it (with the model's number of classes).
  for unit, scaled_sizes in calls:
    total = _jitted_unit_probabilities(predict_fn, images, sizes, scaled_sizes, unit,
                                       probability_sums=total, **protocol)
  return total / num_predictions(scales, flip)


def num_predictions(scales: Sequence[float], flip: bool) -> int:
  """Predictions averaged per image: one per scale, twice with flips."""
  return len(scales) * (2 if flip else 1)


def predict_image_probabilities(predict_fn: PredictFn, image, *, mode: str = 'whole',
                                scales: Sequence[float] = (1.0,), flip: bool = False,
                                crop_size: Sequence[int] | None = None,
                                stride: Sequence[int] | None = None,
                                size_divisor: int = 16,
                                window_step: int | None = None) -> jax.Array:
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
                               size_divisor=size_divisor, window_step=window_step)[0]
