"""The demo's picture of its predictions: validation scenes, ground truth, each method's output.

`write_predictions` draws one row per validation scene (the first few of `digit_scenes`'
`validation` split) and the columns: the scene, its ground-truth mask, then for each label
fraction of the plan (lowest first) each initialisation's prediction, in the table's row order.
Every prediction comes from the fine-tuning run of the plan's first subset seed, loaded and run
with `ddep_jax.predict` (the command line's own code: final parameters, the run's eval protocol).

The pixels are composed in numpy (`compose_grid`: each 32x32 cell enlarged `SCALE` times, nearest
neighbour, `GAP` white pixels between cells) and copied 1:1 into the PNG under a band of headers,
so a cell of the file is exactly the colours of its labels.
"""

import io
from typing import Sequence

import numpy as np

from ddep_jax import fileio
from ddep_jax import predict
from ddep_jax.data import datasets
from ddep_jax.data import preprocessing
from ddep_jax.data import reading
from experiments import demo_runs

DATASET = 'digit_scenes'
NUM_SCENES = 6
SMOKE_NUM_SCENES = 3  # Each scene costs a prediction per column; the smoke run stays seconds.
SCALE = 4  # 32x32 scenes as 128x128 cells: digits readable at a glance.
GAP = 4  # White pixels between cells.
TITLE_PX = 26  # Band for the figure title above the column headers.
HEADER_PX = 18  # Band for the column headers above the cells.
_DPI = 100
# The table's rows (Table 2's names), short enough for a 128-pixel column at 100 %.
_INIT_NAMES = {'none': 'No pretrain.', 'supervised': 'Supervised', 'dep': 'DeP', 'ddep': 'DDeP'}


# ------------------------------------------------------------------------------------------------
# Pixels: pure numpy.
# ------------------------------------------------------------------------------------------------


def mask_colours(num_classes: int) -> np.ndarray:
  """`predict.palette` with background (class 0) black: `[max(num_classes, 256), 3]` uint8.

  The palette's colours are all at least 40 in each channel, so black stands apart from every
  class; its own background colour is close to some digits' (class 5's, on `digit_scenes`).
  """
  colours = predict.palette(num_classes).copy()
  colours[0] = 0
  return colours


def colour_mask(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """uint8 `[H, W, 3]`: each label's colour (`mask_colours`)."""
  return mask_colours(num_classes)[np.asarray(labels)]


def cell_origin(row: int, col: int, cell_hw: tuple[int, int], scale: int = SCALE,
                gap: int = GAP) -> tuple[int, int]:
  """(top, left) pixel of cell (row, col) in `compose_grid`'s output."""
  height, width = cell_hw
  return row * (height * scale + gap), col * (width * scale + gap)


def compose_grid(cells: Sequence[Sequence[np.ndarray]], scale: int = SCALE,
                 gap: int = GAP) -> np.ndarray:
  """The cells (rows of uint8 `[h, w, 3]`, all one size) enlarged `scale` times, on white.

  Returns:
    uint8 `[rows * (h * scale + gap) - gap, cols * (w * scale + gap) - gap, 3]`.
  """
  num_rows, num_cols = len(cells), len(cells[0])
  if any(len(row) != num_cols for row in cells):
    raise ValueError(f'Every row needs {num_cols} cells; got {[len(r) for r in cells]}.')
  cell_hw = cells[0][0].shape[:2]
  bottom, right = cell_origin(num_rows, num_cols, cell_hw, scale, gap)
  grid = np.full((bottom - gap, right - gap, 3), 255, np.uint8)
  for r, row in enumerate(cells):
    for c, cell in enumerate(row):
      if cell.shape != (*cell_hw, 3):
        raise ValueError(f'Cell ({r}, {c}) has shape {cell.shape}; expected {(*cell_hw, 3)}.')
      top, left = cell_origin(r, c, cell_hw, scale, gap)
      enlarged = np.repeat(np.repeat(cell, scale, axis=0), scale, axis=1)  # Nearest neighbour.
      grid[top:top + cell_hw[0] * scale, left:left + cell_hw[1] * scale] = enlarged
  return grid


# ------------------------------------------------------------------------------------------------
# Inputs: validation scenes and the runs of each column.
# ------------------------------------------------------------------------------------------------


def read_scenes(data_dir: str, count: int,
                dataset: str = DATASET) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` validation scenes: uint8 images `[n, H, W, 3]`, int32 train ids `[n, H, W]`.

  Read as the evaluation reads them (`ddep_jax.data.reading`, the split's fixed order), the
  masks mapped through the label table of `dataset` (`digit_scenes` or a dataset registered over
  the same scenes, e.g. `digit_scenes_foreground`).
  """
  spec = datasets.get_spec(dataset)
  split = f'{spec.eval_split}[:{count}]'
  source = reading.open_source(dataset, split, 'segment', data_dir)

  def decode(example):
    image, mask = reading.decode(source, example)
    return image, preprocessing.map_labels(mask, spec.label_table)

  pairs = list(reading.read_encoded(source, split).map(decode).as_numpy_iterator())
  return (np.stack([image for image, _ in pairs]).astype(np.uint8),
          np.stack([mask for _, mask in pairs]).astype(np.int32))


def prediction_columns(runs: Sequence[demo_runs.DemoRun],
                       inits: Sequence[str]) -> list[demo_runs.DemoRun]:
  """The fine-tuning runs of the plan's first subset seed: by fraction (lowest first), then in
  the order of `inits`."""
  finetune = [r for r in runs if r.sweep_run is not None]
  seed = finetune[0].tags['subset_seed']
  by_cell = {(r.tags['label_fraction'], r.tags['init']): r
             for r in finetune if r.tags['subset_seed'] == seed}
  fractions = sorted({fraction for fraction, _ in by_cell})
  return [by_cell[(f, i)] for f in fractions for i in inits if (f, i) in by_cell]


def header(run: demo_runs.DemoRun) -> str:
  """'5 % · DDeP': the column's label fraction and initialisation."""
  return f'{100 * run.tags["label_fraction"]:g} % · {_INIT_NAMES[run.tags["init"]]}'


# ------------------------------------------------------------------------------------------------
# The file.
# ------------------------------------------------------------------------------------------------


def write_predictions(path: str, runs: Sequence[demo_runs.DemoRun], data_dir: str, *,
                      inits: Sequence[str], num_scenes: int = NUM_SCENES) -> str:
  """Writes the grid of `num_scenes` validation scenes x (scene, truth, runs) to `path`.

  Args:
    path: the PNG to write (local or gs://).
    runs: the demo's plan (`demo_runs.plan_runs`), its fine-tuning runs finished.
    data_dir: TFDS data_dir holding `ddep_digit_scenes`.
    inits: the initialisations in column order within a fraction (the table's row order).
    num_scenes: rows: the first scenes of the validation split.

  Returns:
    `path`.
  """
  # Figure + Agg canvas, not pyplot, as collect_results.plot_label_efficiency.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  columns = prediction_columns(runs, inits)
  # The classes the runs segment (`configs/demo.py:classes=...`), the same in every run.
  dataset = demo_runs.run_config(columns[0]).input.dataset
  num_classes = datasets.get_spec(dataset).num_classes
  images, masks = read_scenes(data_dir, num_scenes, dataset)
  cells = [[image, colour_mask(mask, num_classes)] for image, mask in zip(images, masks)]
  for run in columns:
    config, params, _ = predict.load_run(run.workdir)
    for row, image in zip(cells, images):
      row.append(colour_mask(predict.predict(params, config, image), num_classes))
  grid = compose_grid(cells)

  top = TITLE_PX + HEADER_PX
  height, width = grid.shape[0] + top, grid.shape[1]
  figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor='white')
  FigureCanvasAgg(figure)
  figure.figimage(grid, xo=0, yo=0, origin='upper')  # 1:1 pixels at the bottom of the figure.
  seed = columns[0].tags['subset_seed']
  figure.text(0.5, 1 - 4 / height, f'Validation scenes, ground truth and predictions '
              f'(fine-tuned on labelled subset {seed}; background black)', ha='center',
              va='top', fontsize=10)
  cell_width = images.shape[2] * SCALE
  for col, label in enumerate(['scene', 'ground truth'] + [header(r) for r in columns]):
    _, left = cell_origin(0, col, images.shape[1:3])
    figure.text((left + cell_width / 2) / width, 1 - (top - 3) / height, label, ha='center',
                va='bottom', fontsize=8)
  buffer = io.BytesIO()
  figure.savefig(buffer, dpi=_DPI, format='png')
  fileio.write_bytes(path, buffer.getvalue())
  return path

