"""Inference protocols: sliding window, multi-scale and flips against plain inference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddep_jax import inference
from ddep_jax import inference_plan

_KERNEL = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32)


def _pointwise_model(images):
  """A per-pixel linear model: translation-equivariant with no spatial context."""
  return images @ _KERNEL


def _context_model(images):
  """A model whose output depends on global context (the image mean), unlike a window."""
  return images @ _KERNEL + jnp.mean(images, axis=(1, 2), keepdims=True) @ _KERNEL * 3.0


def _images(shape=(2, 40, 72, 3), seed=1):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, size=shape), jnp.float32)


def test_window_starts_follow_mmseg_grid():
  assert inference_plan.window_starts(2048, 1024, 1024) == [0, 1024]
  assert inference_plan.window_starts(512, 512, 341) == [0]
  # 683-wide ADE20K image, 512 crop, 341 stride: windows at 0 and flush right at 171.
  assert inference_plan.window_starts(683, 512, 341) == [0, 171]
  assert inference_plan.window_starts(1100, 512, 341) == [0, 341, 588]


def test_sliding_window_equals_whole_for_pointwise_model():
  images = _images()
  whole = inference.predict_probabilities(_pointwise_model, images)
  sliding = inference.predict_probabilities(_pointwise_model, images, mode='sliding',
                                            crop_size=(32, 32), stride=(16, 21))
  np.testing.assert_allclose(sliding, whole, atol=1e-6)


def test_sliding_window_really_crops_windows():
  # With a context-dependent model the windows see different context: results must differ,
  # which shows the windows are real crops rather than the whole image.
  images = _images()
  whole = inference.predict_probabilities(_context_model, images)
  sliding = inference.predict_probabilities(_context_model, images, mode='sliding',
                                            crop_size=(32, 32), stride=(16, 16))
  assert float(jnp.max(jnp.abs(whole - sliding))) > 1e-3


def test_sliding_average_of_overlaps_by_hand():
  # A model returning the window's mean as class-1 logit: overlapping windows average theirs.
  def mean_model(x):
    mean = jnp.broadcast_to(jnp.mean(x, axis=(1, 2, 3), keepdims=True), x.shape[:3] + (1,))
    return jnp.concatenate([jnp.zeros_like(mean), mean], axis=-1)
  images = jnp.concatenate([jnp.zeros((1, 16, 16, 3)), jnp.ones((1, 16, 16, 3))], axis=2)
  probs = inference.predict_probabilities(mean_model, images, mode='sliding', crop_size=(16, 16),
                                          stride=(16, 8), size_divisor=16)
  # Windows at columns 0, 8, 16 with means 0, 0.5, 1.
  np.testing.assert_allclose(probs[0, 0, :, 1],
                             jax.nn.sigmoid(jnp.array([0.0] * 8 + [0.25] * 8 + [0.75] * 8
                                                      + [1.0] * 8)), atol=1e-6)


def test_cityscapes_halves_protocol_matches_hand_assembly():
  images = _images((1, 32, 64, 3))
  probs = inference.predict_probabilities(_context_model, images, mode='sliding',
                                          crop_size=(32, 32), stride=(32, 32), flip=True)
  def half(x):
    p = jax.nn.softmax(_context_model(x), -1)
    q = jax.nn.softmax(_context_model(x[:, :, ::-1]), -1)[:, :, ::-1]
    return (p + q) / 2
  expected = jnp.concatenate([half(images[:, :, :32]), half(images[:, :, 32:])], axis=2)
  np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_flip_and_multiscale_equal_plain_on_constant_image():
  images = jnp.full((1, 32, 48, 3), 0.3)
  plain = inference.predict_probabilities(_pointwise_model, images)
  tta = inference.predict_probabilities(_pointwise_model, images,
                                        scales=inference.MULTI_SCALE_SCALES, flip=True)
  np.testing.assert_allclose(tta, plain, atol=1e-6)


def test_multiscale_averages_softmax_of_each_scale():
  images = _images((1, 32, 32, 3))
  got = inference.predict_probabilities(_pointwise_model, images, scales=(0.5, 1.0))
  small = jax.image.resize(images, (1, 16, 16, 3), 'bilinear', antialias=False)
  up = jax.image.resize(_pointwise_model(small), (1, 32, 32, 5), 'bilinear', antialias=False)
  expected = (jax.nn.softmax(up, -1) + jax.nn.softmax(_pointwise_model(images), -1)) / 2
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_whole_pads_to_size_divisor_with_zeros_and_crops_back():
  seen = []
  def model(x):
    seen.append(x.shape)
    # Class 0's logit is the input's sum over the image's pixel count: 0-padding keeps it.
    total = jnp.sum(x, axis=(1, 2, 3)) / (20 * 36 * 3)
    return jnp.zeros(x.shape[:3] + (2,)).at[..., 0].set(total[:, None, None])
  images = _images((1, 20, 36, 3))
  probs = inference.predict_probabilities(model, images, size_divisor=16)
  assert seen == [(1, 32, 48, 3)]
  assert probs.shape == (1, 20, 36, 2)
  np.testing.assert_allclose(probs[..., 0], jax.nn.sigmoid(jnp.mean(images)), atol=1e-6)


def test_bad_protocol_errors():
  with pytest.raises(ValueError, match='crop_size and stride'):
    inference.predict_probabilities(_pointwise_model, _images(), mode='sliding')
  with pytest.raises(ValueError, match='Unknown inference mode'):
    inference.predict_probabilities(_pointwise_model, _images(), mode='tiles')


# -- per-image inference ------------------------------------------------------------------------
# A deterministic small model in pure jax: a fixed random 3x3 convolution ('SAME', so borders and
# padding matter) plus a term of the input's global mean (so the whole model input matters).

_CONV = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3, 3, 4)) / 3, jnp.float32)


def _conv_model(images):
  local = jax.lax.conv_general_dilated(images, _CONV, (1, 1), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return local + 2.0 * jnp.mean(images, axis=(1, 2), keepdims=True) @ _CONV[1, 1]


_SIZES = ((13, 21), (24, 17), (9, 12))
_DIVISOR = 8
_PROTOCOLS = {
    'whole': dict(mode='whole'),
    'sliding': dict(mode='sliding', crop_size=(16, 16), stride=(11, 11)),
    'multiscale_flip': dict(mode='sliding', crop_size=(16, 16), stride=(11, 11),
                            scales=(0.75, 1.25), flip=True),
}


def _random_images(sizes=_SIZES, seed=3):
  rng = np.random.default_rng(seed)
  return [rng.uniform(-1, 1, (h, w, 3)).astype(np.float32) for h, w in sizes]


def _canvas(images, pad_value=-1.0):
  """Images at the top left of one canvas, padded as the eval pipeline pads them (-1)."""
  height = max(x.shape[0] for x in images)
  width = max(x.shape[1] for x in images)
  canvas = np.full((len(images), height, width, 3), pad_value, np.float32)
  for i, x in enumerate(images):
    canvas[i, :x.shape[0], :x.shape[1]] = x
  return canvas, np.array([x.shape[:2] for x in images], np.int32)


def _plain_reference(model, image, *, mode='whole', scales=(1.0,), flip=False, crop_size=None,
                     stride=None, size_divisor=_DIVISOR):
  """MMSegmentation's per-image protocol, one image at a time, written plainly (numpy loops)."""
  height, width = image.shape[:2]

  def logits_of(x):  # slide_inference / whole inference on one image [h, w, 3]
    h, w = x.shape[:2]
    if mode == 'whole':
      crop_h, crop_w, stride_h, stride_w = h, w, 1, 1
    else:
      crop_h, crop_w = min(crop_size[0], h), min(crop_size[1], w)
      stride_h, stride_w = stride
    total, count = None, np.zeros((h, w, 1))
    for i in range(max(h - crop_h + stride_h - 1, 0) // stride_h + 1):
      for j in range(max(w - crop_w + stride_w - 1, 0) // stride_w + 1):
        y2, x2 = min(i * stride_h + crop_h, h), min(j * stride_w + crop_w, w)
        y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
        window = x[y1:y2, x1:x2]
        pad = (-window.shape[0] % size_divisor, -window.shape[1] % size_divisor)
        window = np.pad(window, ((0, pad[0]), (0, pad[1]), (0, 0)))  # 0 after normalisation
        out = np.asarray(model(jnp.asarray(window[None])))[0, :y2 - y1, :x2 - x1]
        if total is None:
          total = np.zeros((h, w, out.shape[-1]))
        total[y1:y2, x1:x2] += out
        count[y1:y2, x1:x2] += 1
    return total / count

  probabilities = []
  for scale in scales:
    size = (int(np.floor(height * scale + 0.5)), int(np.floor(width * scale + 0.5)))
    scaled = np.asarray(jax.image.resize(image, (*size, 3), 'bilinear', antialias=False))
    for flipped in ((False, True) if flip else (False,)):
      logits = logits_of(scaled[:, ::-1] if flipped else scaled)
      logits = logits[:, ::-1] if flipped else logits
      logits = np.asarray(jax.image.resize(logits, (height, width, logits.shape[-1]),
                                           'bilinear', antialias=False))
      e = np.exp(logits - logits.max(-1, keepdims=True))
      probabilities.append(e / e.sum(-1, keepdims=True))
  return np.mean(probabilities, axis=0)


@pytest.mark.parametrize('protocol', sorted(_PROTOCOLS))
def test_image_alone_equals_image_in_batch_with_a_larger_one(protocol):
  small, large = _random_images(((13, 18), (24, 29)))
  alone = inference.predict_image_probabilities(_conv_model, small, size_divisor=_DIVISOR,
                                                **_PROTOCOLS[protocol])
  canvas, sizes = _canvas([small, large])
  in_batch = inference.predict_probabilities(_conv_model, canvas, sizes, size_divisor=_DIVISOR,
                                             **_PROTOCOLS[protocol])
  np.testing.assert_allclose(in_batch[0, :13, :18], alone, atol=2e-6)
  assert float(jnp.max(jnp.abs(in_batch[0, 13:]))) == 0.0  # Nothing outside the image.
  if protocol == 'whole':  # The model sees context: the canvas would change the prediction.
    canvas_alone = inference.predict_probabilities(_conv_model, canvas[:1], None,
                                                   size_divisor=_DIVISOR, **_PROTOCOLS[protocol])
    assert float(jnp.max(jnp.abs(canvas_alone[0, :13, :18] - alone))) > 1e-3


@pytest.mark.parametrize('protocol', sorted(_PROTOCOLS))
def test_probabilities_equal_plain_per_image_reference(protocol):
  # Multi-scale + flip: two images (each size at each scale is a program to compile).
  images = _random_images(_SIZES[:2] if protocol == 'multiscale_flip' else _SIZES)
  canvas, sizes = _canvas(images)
  got = inference.predict_probabilities(_conv_model, canvas, sizes, size_divisor=_DIVISOR,
                                        **_PROTOCOLS[protocol])
  for i, image in enumerate(images):
    expected = _plain_reference(_conv_model, image, **_PROTOCOLS[protocol])
    h, w = image.shape[:2]
    np.testing.assert_allclose(got[i, :h, :w], expected, atol=1e-5, err_msg=f'image {i}')
    assert float(jnp.sum(jnp.abs(got[i, h:])) + jnp.sum(jnp.abs(got[i, :, w:]))) == 0.0


def test_plan_groups_images_by_window_grid_and_canvas():
  # 512 crop, stride 341, scale 1 and 0.5: ADE20K-like 512x683 and 683x512 images.
  calls = inference_plan.plan([[512, 683], [683, 512], [512, 512], [0, 0]], mode='sliding',
                         scales=(0.5, 1.0), crop_size=(512, 512), stride=(341, 341))
  unit = inference_plan.Unit
  assert [(u, s.tolist()) for u, s in calls] == [
      (unit((256, 256), (1, 1), (256, 256), True), [[0, 0], [0, 0], [256, 256], [0, 0]]),
      # 256x342 -> padded to 352.
      (unit((256, 352), (1, 1), (256, 352), True), [[256, 342], [0, 0], [0, 0], [0, 0]]),
      (unit((352, 256), (1, 1), (352, 256), True), [[0, 0], [342, 256], [0, 0], [0, 0]]),
      # Scale 1: one window, and two along the 683 side (the canvas holds 341 + 512).
      (unit((512, 512), (1, 1), (512, 512), False), [[0, 0], [0, 0], [512, 512], [0, 0]]),
      (unit((512, 512), (1, 2), (512, 853), False), [[512, 683], [0, 0], [0, 0], [0, 0]]),
      (unit((512, 512), (2, 1), (853, 512), False), [[0, 0], [683, 512], [0, 0], [0, 0]]),
  ]


def test_window_step_pads_small_windows_only_and_shares_programs():
  sizes = [[300, 410], [310, 400], [700, 900]]
  exact = inference_plan.programs(sizes, mode='sliding', crop_size=(512, 512), stride=(341, 341))
  coarse = inference_plan.programs(sizes, mode='sliding', crop_size=(512, 512), stride=(341, 341),
                              window_step=128)
  assert {u.window for u in exact} == {(304, 416), (320, 400), (512, 512)}
  # Both small images share one 384x512 program (the crop caps the rounding); large ones keep it.
  assert {u.window for u in coarse} == {(384, 512), (512, 512)}
  with pytest.raises(ValueError, match='multiple of the size divisor'):
    inference_plan.plan(sizes, window_step=24)


def test_coarse_window_step_equals_zero_padding_to_that_step():
  # With window_step=16 (divisor 8) the model sees the image padded with 0 to a multiple of 16:
  # the plain reference at size_divisor 16 is the same computation.
  image = _random_images(((13, 21),))[0]
  got = inference.predict_image_probabilities(_conv_model, image, size_divisor=8, window_step=16)
  expected = _plain_reference(_conv_model, image, size_divisor=16)
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_images_outside_the_unit_are_skipped():
  # A 13x21 member (a 1x2 grid of 16x16 windows) among three images of other units, NaN
  # everywhere, as is the member's canvas beyond its own size: the model runs on the member's
  # windows only, the others' sums pass through untouched, and the member gets what it gets alone.
  windows = []

  def counting_model(x):
    jax.debug.callback(functools.partial(windows.append, x.shape[0]))  # On the host, per call.
    return _conv_model(x)

  protocol = dict(mode='sliding', crop_size=(16, 16), stride=(11, 11))
  sizes = np.array([(13, 21), (24, 17), (9, 12), (24, 24)], np.int32)
  images = np.full((4, 24, 24, 3), np.nan, np.float32)
  images[0, :13, :21] = _random_images(((13, 21),))[0]
  calls = inference_plan.plan(sizes, size_divisor=_DIVISOR, **protocol)
  (unit, scaled_sizes), = [(unit, scaled) for unit, scaled in calls if scaled[0, 0]]
  assert scaled_sizes[1:].tolist() == [[0, 0]] * 3
  run = jax.jit(inference.unit_probabilities, static_argnums=(0, 4),
                static_argnames=('mode', 'flip', 'crop_size', 'stride'))
  before = jnp.asarray(np.random.default_rng(4).uniform(size=(4, 24, 24, 4)), jnp.float32)
  after = run(counting_model, images, sizes, scaled_sizes, unit, probability_sums=before,
              flip=True, **protocol)
  jax.effects_barrier()
  assert windows == [2, 2]  # The member's two windows, and their flips; nothing else ran.
  np.testing.assert_array_equal(after[1:], before[1:])
  alone = run(_conv_model, images[:1], sizes[:1], scaled_sizes[:1], unit,
              probability_sums=before[:1], flip=True, **protocol)
  np.testing.assert_array_equal(after[:1], alone)
  assert np.all(np.isfinite(after))
