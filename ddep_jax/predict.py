r"""Run a trained segmentation model on image files: label maps and colour overlays.

  python -m ddep_jax.predict --checkpoint=/path/to/run --images='photos/*.jpg' --out=/tmp/pred

`--checkpoint` is a run's workdir, its `checkpoints/` directory or a `checkpoints/<step>`
directory; the run's `config.json` (written by the trainer) gives the model, the classes and the
inference protocol (`--config` names another `config.json`). Each image goes through the same
protocol as evaluation (`config.evals.<--eval>`: whole image, sliding window, multi-scale +
flip; `ddep_jax.inference`), on its own, at its own size, and gives in `--out`:

* `<name>_labels.png`: the label map, train ids (0 .. num_classes - 1), or with
  `--label_ids=original` the dataset's stored label ids (e.g. Cityscapes label ids);
* `<name>_overlay.png`: the image blended with one colour per class, with a legend of the
  classes present on the right (`LEGEND_WIDTH` pixels wide).

Images: anything Pillow reads. Grayscale and palette images are converted to RGB, RGBA and LA
lose their alpha channel (logged per file); 16-bit and float images are refused. Outputs that
exist already are kept and their image skipped (`--overwrite` redoes them); a file that cannot be
read is reported by name and the others still run. Files are written atomically (tmp + rename;
one upload on `gs://`). Every path (checkpoint, config, images, output) may be local or a `gs://`
URL (`ddep_jax.fileio`).

From Python: `predict(params, config, image) -> label map` (docs/python_api.md).
"""

import dataclasses
import functools
import io
import json
import os
from typing import Any, Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageDraw
import tqdm

from ddep_jax import checkpoints
from ddep_jax import evaluate
from ddep_jax import fileio
from ddep_jax import inference
from ddep_jax import models
from ddep_jax.data import datasets
from ddep_jax.data import preprocessing

LEGEND_WIDTH = 160
_LEGEND_ROW = 14
_OVERLAY_ALPHA = 0.5  # Weight of the class colour in the overlay.
_IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm')
# Pillow modes converted to RGB (alpha dropped); any other non-RGB mode is refused.
_CONVERTIBLE_MODES = ('L', 'LA', 'P', 'PA', 'RGBA', 'RGBa', 'CMYK', 'YCbCr', '1', 'LAB', 'HSV')


@dataclasses.dataclass(frozen=True)
class Protocol:
  """The inference protocol of one `config.evals` entry (see `ddep_jax.inference`)."""
  mode: str
  scales: tuple[float, ...]
  flip: bool
  crop_size: Optional[tuple[int, int]]
  stride: Optional[tuple[int, int]]
  size_divisor: int
  # The eval input's `resize` (None: own size; an int: short side; (h, w): fixed). The label
  # map is brought back to the image's size as MMSegmentation does: probabilities resized
  # bilinearly, then argmax.
  resize: Any


def protocol_of(config, eval_name: Optional[str] = None) -> Protocol:
  """The protocol of `config.evals[eval_name]` (default: the first by name; with no evals, that
  of `evaluate.default_eval_config()`, the whole image at its own size)."""
  evals = evaluate.eval_configs(config)
  if eval_name is not None and eval_name not in evals:
    raise ValueError(f'config.evals has no {eval_name!r}; it has {sorted(evals)}.')
  if eval_name is None:
    ec = evals[sorted(evals)[0]] if evals else evaluate.default_eval_config()
  else:
    ec = evals[eval_name]
  pair = lambda v: (int(v[0]), int(v[1])) if v else None  # noqa: E731
  resize = ec.resize
  return Protocol(mode=ec.mode, scales=tuple(float(s) for s in ec.scales), flip=bool(ec.flip),
                  crop_size=pair(ec.crop_size), stride=pair(ec.stride),
                  size_divisor=evaluate.sharding_size_divisor(config),
                  resize=resize if resize is None or isinstance(resize, int) else pair(resize))


def _probabilities(predict_fn, images, protocol: Protocol):
  """The one call into the inference protocol: class probabilities of a batch of one image."""
  return inference.predict_probabilities(
      predict_fn, images, mode=protocol.mode, scales=protocol.scales, flip=protocol.flip,
      crop_size=protocol.crop_size, stride=protocol.stride, size_divisor=protocol.size_divisor)


@functools.lru_cache(maxsize=8)
def _label_fn(model_json: str, num_classes: int, protocol: Protocol):
  """A jitted `(params, image [1, H, W, 3] in [-1, 1]) -> label map [H, W] int32`."""
  model = models.build_model(ml_collections.ConfigDict(json.loads(model_json)), task='segment',
                             num_classes=num_classes)

  def labels(params, images, out_hw):
    predict_fn = lambda x: model.apply({'params': params}, x, train=False)[0]  # noqa: E731
    probabilities = _probabilities(predict_fn, images, protocol)
    if probabilities.shape[1:3] != out_hw:
      probabilities = jax.image.resize(
          probabilities, (probabilities.shape[0], *out_hw, probabilities.shape[-1]), 'linear')
    return jnp.argmax(probabilities, axis=-1)[0].astype(jnp.int32)

  return jax.jit(labels, static_argnames=('out_hw',))


def predict(params: Mapping[str, Any], config, image: np.ndarray, *,
            eval_name: Optional[str] = None) -> np.ndarray:
  """The label map (train ids) of one image under the config's evaluation protocol.

  Args:
    params: the segmentation model's parameters (`checkpoints.load_params(run)[0]`).
    config: the run's config (`load_config(run)`); `config.model`, `config.num_classes` and
      `config.evals[eval_name]` (the protocol) are used.
    image: uint8 RGB `[H, W, 3]`, any H and W.
    eval_name: which `config.evals` entry gives the protocol (including its `resize`: the image
      is inferred at the eval size and the probabilities resized back to its own); default the
      first by name, or the whole image if the config has none.

  Returns:
    int32 `[H, W]` train ids.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'predict needs an RGB image [H, W, 3]; got shape {image.shape} (convert '
                     f'grayscale or RGBA first, e.g. read_image).')
  if config.task != 'segment':
    raise ValueError(f'predict needs a segmentation model (task=segment); this config is for '
                     f'task={config.task!r}.')
  protocol = protocol_of(config, eval_name)
  # The eval input pipeline's resize and normalisation, on the same TF ops.
  size = tuple(int(n) for n in preprocessing.eval_size(image.shape[:2], protocol.resize))
  pixels = image
  if size != image.shape[:2]:
    pixels, _ = preprocessing.resize_image_and_mask(image, None, size)
  images = np.asarray(preprocessing.normalize_image(pixels))[None]
  fn = _label_fn(config.model.to_json(), int(config.num_classes), protocol)
  return np.asarray(fn(params, images, out_hw=tuple(image.shape[:2])))


# -- files ----------------------------------------------------------------------------------------

def find_config(checkpoint: str) -> str:
  """The `config.json` of the run holding `checkpoint` (workdir, checkpoints/, checkpoints/<n>)."""
  path = fileio.abspath(checkpoint.rstrip('/'))
  for directory in (path, fileio.dirname(path), fileio.dirname(fileio.dirname(path))):
    candidate = fileio.join(directory, 'config.json')
    if fileio.exists(candidate):
      return candidate
  raise FileNotFoundError(f'No config.json found at or above {checkpoint} (the trainer writes '
                          f'one into the workdir); pass --config=/path/to/config.json.')


def load_config(path: str) -> ml_collections.ConfigDict:
  """A run's `config.json` as a ConfigDict (a run dir or checkpoint finds its own)."""
  if not path.endswith('.json'):
    path = find_config(path)
  return ml_collections.ConfigDict(fileio.read_json(path))


def load_run(checkpoint: str, config_path: Optional[str] = None):
  """Returns `(config, params, step)` of a segmentation run, with errors naming the files."""
  config_path = config_path or find_config(checkpoint)
  config = load_config(config_path)
  if 'task' not in config:
    raise ValueError(f'{config_path} has no field task: it is not the config.json of a run (the '
                     'trainer writes one into the workdir).')
  if config.task != 'segment':
    raise ValueError(f'{config_path} is the config of a task={config.task!r} run; '
                     f'predict needs a segmentation run (task=segment), e.g. a fine-tuning '
                     f'stage. A denoising or classification checkpoint has no class head.')
  params, step = checkpoints.load_params(checkpoint)
  head = params.get('head', {}).get('kernel')
  if 'decoder' not in params or head is None or head.shape[-1] != int(config.num_classes):
    raise ValueError(f'The checkpoint at {checkpoint} (step {step}) does not hold a segmentation '
                     f'model with {config.num_classes} classes as {config_path} says (head '
                     f'{None if head is None else head.shape}); check that both belong to the '
                     f'same run.')
  return config, params, step


def read_image(path: str) -> np.ndarray:
  """uint8 RGB `[H, W, 3]`; grayscale/palette converted, alpha dropped (logged), else an error."""
  try:
    with Image.open(io.BytesIO(fileio.read_bytes(path))) as img:
      img.load()
      mode = img.mode
      if mode != 'RGB':
        if mode not in _CONVERTIBLE_MODES:
          raise ValueError(f'{path}: unsupported image mode {mode!r} (16-bit or float); save it '
                           f'as 8-bit RGB.')
        note = 'alpha channel dropped' if 'A' in mode or 'a' in mode else 'converted'
        logging.info('%s: %s image %s to RGB.', path, mode, note)
        img = img.convert('RGB')
      return np.asarray(img, np.uint8)
  except (OSError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError.
    raise ValueError(f'{path}: not a readable image ({e}).') from None


def find_images(pattern: str) -> list[str]:
  """The files a glob matches (sorted), or the image files of a directory."""
  if fileio.isdir(pattern):
    paths = sorted(fileio.join(pattern, name) for name in fileio.listdir(pattern)
                   if name.lower().endswith(_IMAGE_SUFFIXES))
  else:
    paths = [p for p in fileio.glob(pattern, recursive=True) if fileio.isfile(p)]
  if not paths:
    raise FileNotFoundError(f'No image files in {pattern!r} (a glob, a file, or a directory of '
                            f'{", ".join(_IMAGE_SUFFIXES)} files).')
  return paths


def palette(num_classes: int) -> np.ndarray:
  """Fixed colours per class (as evaluate's summaries); `[max(num_classes, 256), 3]` uint8."""
  colours = np.random.default_rng(0).integers(40, 256, size=(max(num_classes, 256), 3))
  return colours.astype(np.uint8)


def class_names_of(config) -> tuple[str, ...]:
  """Names of the train ids from the dataset registry, else `class <i>`."""
  num_classes = int(config.num_classes)
  names = None
  try:
    names = datasets.get_spec(config.input.dataset).class_names
  except (KeyError, ValueError, AttributeError):
    pass
  if names is None or len(names) != num_classes:
    names = tuple(f'class {i}' for i in range(num_classes))
  return tuple(names)


def original_ids(config) -> np.ndarray:
  """train id -> the dataset's stored label id (the first that maps to it); int32 [num_classes]."""
  spec = datasets.get_spec(config.input.dataset)
  if spec.label_table is None:
    raise ValueError(f'Dataset {config.input.dataset!r} has no label table; --label_ids=original '
                     f'needs one (use train ids).')
  table = np.asarray(spec.label_table)
  out = np.zeros(int(config.num_classes), np.int32)
  for train_id in range(int(config.num_classes)):
    stored = np.flatnonzero(table == train_id)
    if not stored.size:
      raise ValueError(f'Train id {train_id} has no stored id in {config.input.dataset!r}.')
    out[train_id] = stored[0]
  return out


def overlay(image: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
  """The image blended with the class colours, plus a legend of the classes present on the right.

  Returns:
    uint8 `[max(H, legend height), W + LEGEND_WIDTH, 3]`; the image part is the top-left H x W.
  """
  colours = palette(len(class_names))
  height, width = labels.shape
  blended = ((1 - _OVERLAY_ALPHA) * image.astype(np.float32)
             + _OVERLAY_ALPHA * colours[labels].astype(np.float32))
  present = np.unique(labels)
  canvas = np.full((max(height, (len(present) + 1) * _LEGEND_ROW), width + LEGEND_WIDTH, 3), 255,
                   np.uint8)
  canvas[:height, :width] = np.round(blended).astype(np.uint8)
  picture = Image.fromarray(canvas)
  draw = ImageDraw.Draw(picture)
  for row, class_id in enumerate(present):
    top = 2 + row * _LEGEND_ROW
    draw.rectangle([width + 4, top, width + 14, top + 10], fill=tuple(int(c) for c in
                                                                      colours[class_id]))
    draw.text((width + 18, top - 1), f'{class_id} {class_names[class_id]}', fill=(0, 0, 0))
  return np.asarray(picture)


def _write_png(array: np.ndarray, path: str):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  fileio.write_bytes(path, buffer.getvalue())


def output_paths(image_path: str, out_dir: str) -> tuple[str, str]:
  stem = os.path.splitext(os.path.basename(image_path))[0]
  return (fileio.join(out_dir, f'{stem}_labels.png'),
          fileio.join(out_dir, f'{stem}_overlay.png'))


def predict_files(checkpoint: str, images: str, out_dir: str, *, config_path: str | None = None,
                  eval_name: str | None = None, label_ids: str = 'train',
                  overwrite: bool = False) -> dict[str, list[str]]:
  """The command line's work; returns `{'written': [...], 'skipped': [...], 'failed': [...]}`."""
  if label_ids not in ('train', 'original'):
    raise ValueError(f"--label_ids must be 'train' or 'original'; got {label_ids!r}.")
  paths = find_images(images)
  config, params, step = load_run(checkpoint, config_path)
  logging.info('Predicting %d images with step %d of %s, protocol %s.', len(paths), step,
               checkpoint, protocol_of(config, eval_name))
  names = class_names_of(config)
  to_stored = original_ids(config) if label_ids == 'original' else None
  fileio.makedirs(out_dir)
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  duplicates = sorted({s for s in stems if stems.count(s) > 1})
  if duplicates:
    raise ValueError(f'Several images share the names {duplicates} (outputs are named after the '
                     f'file name); predict them into separate --out directories.')
  report = {'written': [], 'skipped': [], 'failed': []}
  for path in tqdm.tqdm(paths, desc='predict', unit='image'):
    labels_path, overlay_path = output_paths(path, out_dir)
    if not overwrite and fileio.exists(labels_path) and fileio.exists(overlay_path):
      report['skipped'].append(path)
      continue
    try:
      image = read_image(path)
    except ValueError as e:
      logging.error('%s', e)
      report['failed'].append(f'{e}')
      continue
    labels = predict(params, config, image, eval_name=eval_name)
    stored = labels if to_stored is None else to_stored[labels]
    dtype = np.uint8 if stored.max(initial=0) < 256 else np.uint16
    _write_png(stored.astype(dtype), labels_path)
    _write_png(overlay(image, labels, names), overlay_path)
    report['written'].append(path)
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  f = flags.FLAGS
  report = predict_files(f.checkpoint, f.images, f.out, config_path=f.config, eval_name=f.eval,
                         label_ids=f.label_ids, overwrite=f.overwrite)
  print(f'{len(report["written"])} written, {len(report["skipped"])} skipped (outputs exist), '
        f'{len(report["failed"])} failed, in {f.out}')
  if report['failed']:
    raise SystemExit('Could not read:\n' + '\n'.join(report['failed']))


if __name__ == '__main__':
  flags.DEFINE_string('checkpoint', None, 'A segmentation run: its workdir, checkpoints/ dir or '
                      'checkpoints/<step> dir.')
  flags.DEFINE_string('images', None, "Images: a glob ('photos/*.jpg'), a file or a directory.")
  flags.DEFINE_string('out', None, 'Output directory for <name>_labels.png and '
                      '<name>_overlay.png.')
  flags.DEFINE_string('config', None, "The run's config.json; default: found next to the "
                      'checkpoint.')
  flags.DEFINE_string('eval', None, 'Which config.evals entry gives the inference protocol; '
                      'default the first by name.')
  flags.DEFINE_enum('label_ids', 'train', ['train', 'original'], 'Write train ids or the '
                    "dataset's original label ids.")
  flags.DEFINE_bool('overwrite', False, 'Redo images whose outputs exist.')
  flags.mark_flags_as_required(['checkpoint', 'images', 'out'])
  app.run(main)
