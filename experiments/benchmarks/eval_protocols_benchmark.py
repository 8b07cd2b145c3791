r"""Eval throughput and XLA compile count of the segmentation protocols (not a test).

    python experiments/benchmarks/eval_protocols_benchmark.py                 # both protocols
    python experiments/benchmarks/eval_protocols_benchmark.py --protocols=ade20k --num_images=16

Runs `evaluate.Evaluator.run` on dummy images of realistic sizes, fed straight into the evaluator
(no TFDS): Pascal Context (original VOC sizes, at most 500 px) and ADE20K (short side 512, as
the eval resize leaves them), each with its config's protocol: 512x512 sliding windows at stride
341 with flips, at the six scales 0.5 ... 1.75 (`--scales=1` for one scale). Prints, per protocol,
the images per second of the first pass (compiles included), of a second pass (compiled programs
reused) and the number of XLA compilations each pass triggered; `--window_step=64` coarsens the
windows of images smaller than the crop (`inference_plan.plan`). The model is the `tiny` preset
with random weights (`--preset`), so the figures measure the protocol, not the network.

`--memory_only` runs nothing: it compiles each distinct unit program the batches need and prints
its `memory_analysis()` per device (arguments + outputs - donated + temporaries) and the largest,
the figure that decides whether the evaluation fits a device:

    python experiments/benchmarks/eval_protocols_benchmark.py --protocols=ade20k --memory_only
"""

import time

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from ddep_jax import evaluate
from ddep_jax import inference
from ddep_jax import inference_plan
from ddep_jax import initialization
from ddep_jax import models
from ddep_jax import sharding
from ddep_jax.data import input_pipeline

_PROTOCOLS = flags.DEFINE_list('protocols', ['pascal_context', 'ade20k'], 'Protocols to time.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 8, 'Images per protocol (one pass).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 4, 'Global eval batch.')
_PRESET = flags.DEFINE_string('preset', 'tiny', 'Model preset.')
_SCALES = flags.DEFINE_list('scales', [str(s) for s in inference.MULTI_SCALE_SCALES],
                            'Test scales.')
_WINDOW_STEP = flags.DEFINE_integer('window_step', None, 'Window step of small windows '
                                    '(`inference_plan.plan`); None: the size divisor (MMSeg).')
_MEMORY_ONLY = flags.DEFINE_bool('memory_only', False, 'Compile the unit programs and print '
                                 'their memory per device instead of running the evaluation.')

GB = 1e9

# (height, width) of images as the eval input leaves them: Pascal Context's VOC images (at most
# 500 px, original resolution) and ADE20K's resized to a short side of 512 (MMSeg's (2048, 512)).
_SIZES = {
    'pascal_context': [(375, 500), (500, 375), (333, 500), (500, 334), (281, 500), (366, 500),
                       (400, 500), (500, 400)],
    'ade20k': [(512, 683), (683, 512), (512, 512), (512, 768), (512, 910), (512, 683),
               (768, 512), (512, 1024)],
}
_NUM_CLASSES = {'pascal_context': 59, 'ade20k': 150}


def _batches(name: str, batch_size: int, num_images: int):
  """Eval batches as `input_pipeline.get_eval_dataset` makes them: padded to the largest size."""
  rng = np.random.default_rng(0)
  sizes = [_SIZES[name][i % len(_SIZES[name])] for i in range(num_images)]
  pad_to = tuple(-(-max(s[a] for s in sizes) // 32) * 32 for a in (0, 1))
  batches = []
  for start in range(0, num_images, batch_size):
    chunk = sizes[start:start + batch_size]
    image = np.full((batch_size, *pad_to, 3), -1.0, np.float32)  # The pipeline's pad value.
    label = np.full((batch_size, *pad_to), 255, np.int32)
    orig_size = np.zeros((batch_size, 2), np.int32)
    valid = np.zeros((batch_size,), bool)
    for i, (h, w) in enumerate(chunk):
      image[i, :h, :w] = rng.uniform(-1, 1, (h, w, 3))
      label[i, :h, :w] = rng.integers(0, _NUM_CLASSES[name], (h, w))
      orig_size[i] = (h, w)
      valid[i] = True
    batches.append(dict(image=image, label=label, orig_size=orig_size, valid=valid,
                        id_hash=np.arange(batch_size, dtype=np.int32) + start,
                        num_invalid_label_pixels=np.zeros((batch_size,), np.int32)))
  return batches


def _config(name: str) -> ml_collections.ConfigDict:
  # The fields the evaluator reads; the protocol is configs/stages.py's SLIDING_512.
  config = ml_collections.ConfigDict(dict(
      task='segment', num_classes=_NUM_CLASSES[name], model=models.get_config(_PRESET.value),
      mesh=(('data', -1),)))
  val = input_pipeline.default_eval_config()
  val.dataset = name
  val.batch_size = _BATCH_SIZE.value
  val.update(dict(mode='sliding', crop_size=(512, 512), stride=(341, 341), flip=True,
                  scales=tuple(float(s) for s in _SCALES.value)))
  val.window_step = _WINDOW_STEP.value
  config.evals = ml_collections.ConfigDict({'val': val})
  return config


def _memory_bytes(compiled) -> float:
  """Peak bytes per device of a compiled program: live arguments, outputs and temporaries."""
  m = compiled.memory_analysis()
  return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
               m.temp_size_in_bytes)


def unit_memory(name: str, evaluator, params, batches):
  """Compiles (does not run) each distinct unit program of the batches; prints its memory."""
  # pylint: disable=protected-access
  seen, largest = set(), (0.0, None)
  start = time.perf_counter()
  for local_batch in batches:
    batch = sharding.global_batch({k: local_batch[k] for k in ('image', 'orig_size')},
                                  evaluator.mesh)
    sums = jax.ShapeDtypeStruct((*batch['image'].shape[:3], evaluator.config.num_classes),
                                np.float32, sharding=sharding.batch_sharding(evaluator.mesh))
    for unit, scaled_sizes in inference_plan.plan(evaluate._global_sizes(local_batch),
                                             **evaluator._plan_args):
      key = (unit, batch['image'].shape)
      if key in seen:
        continue
      seen.add(key)
      scaled_sizes = jax.make_array_from_process_local_data(evaluator._replicated, scaled_sizes)
      compiled = evaluator._unit_fn.lower(params, batch['image'], batch['orig_size'],
                                          scaled_sizes, sums, unit=unit).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes / GB
      peak = _memory_bytes(compiled) / GB
      print(f'  {unit}: {peak:.2f} GB per device ({temp:.2f} GB temporaries)', flush=True)
      largest = max(largest, (peak, unit), key=lambda item: item[0])
  print(f'{name}: {len(seen)} unit programs compiled in {time.perf_counter() - start:.0f} s; '
        f'largest {largest[0]:.2f} GB per device ({largest[1]})', flush=True)


def run(name: str):
  config = _config(name)
  mesh = sharding.make_mesh(config)
  model = initialization.build_model_for(config)
  params = model.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32),
                      train=False)['params']
  batches = _batches(name, _BATCH_SIZE.value, _NUM_IMAGES.value)
  input_pipeline.get_eval_dataset = lambda *a, **k: (batches, len(batches))
  input_pipeline.dataset_info = lambda *a, **k: {}
  evaluator = evaluate.Evaluator('val', config, config.evals.val, model, mesh)
  if _MEMORY_ONLY.value:
    unit_memory(name, evaluator, params, batches)
    return
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: compiles.append(event)
      if event == '/jax/core/compile/backend_compile_duration' else None)
  for attempt in ('first pass', 'second pass'):
    before = len(compiles)
    start = time.perf_counter()
    results, _ = evaluator.run(params)
    seconds = time.perf_counter() - start
    print(f'{name} {attempt}: {_NUM_IMAGES.value / seconds:.3f} images/s ({seconds:.1f} s), '
          f'{len(compiles) - before} XLA compilations, mIoU {results["mIoU"]:.4f}', flush=True)


def main(argv):
  del argv
  print(f'{jax.device_count()} {jax.devices()[0].platform} device(s), preset {_PRESET.value}, '
        f'{_NUM_IMAGES.value} images, batch {_BATCH_SIZE.value}, scales {_SCALES.value}')
  for name in _PROTOCOLS.value:
    run(name)


if __name__ == '__main__':
  app.run(main)
