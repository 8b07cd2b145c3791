"""Which programs per-image inference runs: the host-side geometry of `ddep_jax.inference`.

An image's model input (its padded window) is a function of its own size, so `plan` groups the
(scale, image) pairs of a batch into `Unit`s by (window shape, window grid, canvas), one jitted
program each (`inference.unit_probabilities`), the same on every host given the same sizes.
Python ints and numpy only: nothing here is traced.

Programs: one per distinct unit of the split, reused across batches and scales; Cityscapes (all
frames 1024x2048, the halves protocol) is one. With 512x512 windows at stride 341 and the six
scales 0.5 ... 1.75 (counted with `programs`): an ADE20K-like split (short side 512, long side
512 ... 2048, portrait and landscape) compiles 105 (35 for the common sizes 512x512, 512x640,
512x683, 512x768, 512x910, 512x1024 and their portraits); images smaller than the crop at some
scale need one program per distinct padded window, so a Pascal Context-like split (every size up
to 500 px) compiles 1535 with MMSegmentation's padding. `window_step` (default: the size
divisor) rounds those windows up further, padding them with more zeros after normalisation
(a change for any model whose output depends on its whole input), and bounds their number at
(crop / window_step)^2: see docs/performance.md for the counts and throughput measured with
experiments/benchmarks/eval_protocols_benchmark.py.
"""

import dataclasses
from typing import Sequence

import numpy as np


def check_protocol(mode: str, scales: Sequence[float], crop_size, stride) -> None:
  """Raises on a protocol `plan` cannot lay out, saying what to set."""
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
  """One jitted program: images whose windows at some scale have one shape and one grid.

  The scale is not part of the program (the own sizes at the scale are an argument), so images
  at different scales share a program when their window, grid and canvas agree.

  Attributes:
    window: (height, width) of the model input: an image's own crop (the crop size, or the whole
      image where it is smaller) rounded up to the window step.
    grid: (rows, columns) of the windows of every member image.
    canvas: (height, width) that holds a member at its scale, `(grid - 1) * stride + window` per
      axis: every window, the last one flush with the member's border, lies inside it.
    rescale: whether the scale differs from 1 (at 1 the image is read as it is).
  """
  window: tuple[int, int]
  grid: tuple[int, int]
  canvas: tuple[int, int]
  rescale: bool

  @property
  def num_windows(self) -> int:
    return self.grid[0] * self.grid[1]


def _axis_geometry(length: int, crop: int | None, stride: int | None, divisor: int, step: int):
  """(padded window, number of windows, canvas) along an image side of `length` pixels."""
  if crop is None:  # Whole image: one window, the image itself.
    window = _round_up(length, step)
    return window, 1, window
  num = max(length - min(crop, length) + stride - 1, 0) // stride + 1
  # Sides at least as large as the crop all use the crop (padded to the divisor only): the step
  # coarsens only the windows of smaller images, never beyond that.
  window = min(_round_up(min(crop, length), step), _round_up(crop, divisor))
  return window, num, (num - 1) * stride + window


def _window_step(size_divisor: int, window_step: int | None) -> int:
  step = size_divisor if window_step is None else int(window_step)
  if step <= 0 or step % size_divisor:
    raise ValueError(f'window_step must be a positive multiple of the size divisor '
                     f'{size_divisor}, got {window_step}.')
  return step


def plan(sizes, *, mode: str = 'whole', scales: Sequence[float] = (1.0,),
         crop_size: Sequence[int] | None = None, stride: Sequence[int] | None = None,
         size_divisor: int = 16, window_step: int | None = None) -> list[tuple[Unit, np.ndarray]]:
  """The program calls that cover every image of `sizes` at every scale.

  Args:
    sizes: [N, 2] own heights and widths (rows with a 0 are padding and skipped).
    window_step: granularity of the window sides of images smaller than the crop (and of whole
      images); None: `size_divisor`, MMSegmentation's padding. A coarser step pads such windows
      with more zeros (after normalisation) so that fewer distinct programs are compiled.
    The rest as `predict_probabilities`.

  Returns:
    [(unit, scaled_sizes)], one entry per call, in a fixed order (the same on every host given
    the same sizes): `scaled_sizes` [N, 2] int32 holds each member's own size at the scale and
    0 for every other image.
  """
  check_protocol(mode, scales, crop_size, stride)
  step = _window_step(size_divisor, window_step)
  crop = (None, None) if mode == 'whole' else tuple(int(c) for c in crop_size)
  step_hw = (None, None) if mode == 'whole' else tuple(int(s) for s in stride)
  sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
  calls = []
  for scale in scales:
    members = {}
    for i, (height, width) in enumerate(sizes.tolist()):
      if height <= 0 or width <= 0:
        continue
      scaled = (scaled_length(height, scale), scaled_length(width, scale))
      (wh, nh, ch), (ww, nw, cw) = (_axis_geometry(n, crop[a], step_hw[a], size_divisor, step)
                                    for a, n in enumerate(scaled))
      unit = Unit((wh, ww), (nh, nw), (ch, cw), scale != 1.0)
      members.setdefault(unit, np.zeros((len(sizes), 2), np.int32))[i] = scaled
    calls.extend(sorted(members.items(), key=lambda item: dataclasses.astuple(item[0])))
  return calls


def programs(sizes, **protocol) -> set[Unit]:
  """The distinct programs (units) a split of image `sizes` compiles under the protocol
  (arguments as `plan`), whatever its batches."""
  return {unit for unit, _ in plan(sizes, **protocol)}
