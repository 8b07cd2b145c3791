r"""Parameter counts and forward time of the full-size models (not a test).

    python experiments/benchmarks/model_forward.py                      # counts + 224, 512
    python experiments/benchmarks/model_forward.py --sizes=224 --repeats=5 --dtype=bfloat16

Prints the parameter counts of the R50+ViT-B/16 encoder, the 1x / 2x / 3x DDeP decoders and the
ResNet-50 U-Net (from `jax.eval_shape`, nothing allocated), then the forward time of the
segmentation model (`--preset`, 19 classes, batch `--batch_size`) at each size: compile time once,
then the median of `--repeats` timed runs with random parameters.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from ddep_jax import models

_PRESET = flags.DEFINE_string('preset', 'R50+ViT-B_16', 'Model preset to time.')
_SIZES = flags.DEFINE_list('sizes', ['224', '512'], 'Square input sizes to time.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 1, 'Images per forward pass.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per size (median reported).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_DECODER_WIDTH = flags.DEFINE_float('decoder_width', 1, 'Decoder width multiplier to time.')
_COUNTS = flags.DEFINE_bool('counts', True, 'Print parameter counts first.')


def _param_shapes(config, task='segment', num_classes=19, size=224):
  model = models.build_model(config, task=task, num_classes=num_classes)
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return model, jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                               images)['params']


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def print_counts():
  """Parameter counts per part (224x224 position embedding, 19-class segmentation head)."""
  for width in (1, 2, 3):
    _, params = _param_shapes(models.get_config('R50+ViT-B_16', decoder_width=width))
    if width == 1:
      print(f'R50+ViT-B/16 encoder: {_count(params["encoder"]):,}')
    print(f'DDeP decoder {width}x: {_count(params["decoder"]):,}  '
          f'(head 19 classes: {_count(params["head"]):,}; total {_count(params):,})')
  _, params = _param_shapes(models.get_config('R50+ViT-B_16-TransUNet'))
  print(f'TransUNet decoder (512 -> 16): {_count(params["decoder"]):,}')
  _, params = _param_shapes(models.get_config('R50-UNet'))
  print(f'R50 U-Net: encoder {_count(params["encoder"]):,}, decoder 1x '
        f'{_count(params["decoder"]):,}, total {_count(params):,}')


def time_forward(size: int):
  """Compile time and median forward time (seconds) of the model at `size` x `size`."""
  config = models.get_config(_PRESET.value, dtype=_DTYPE.value,
                             decoder_width=_DECODER_WIDTH.value)
  model, shapes = _param_shapes(config, size=size)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype),
                        shapes)
  images = jnp.asarray(rng.uniform(-1, 1, (_BATCH_SIZE.value, size, size, 3)), jnp.float32)
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)[0])
  start = time.perf_counter()
  compiled = forward.lower(params, images).compile()
  compile_s = time.perf_counter() - start
  compiled(params, images).block_until_ready()  # Warm-up.
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    compiled(params, images).block_until_ready()
    times.append(time.perf_counter() - start)
  return compile_s, float(np.median(times)), times


def main(argv):
  del argv
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind} '
        f'({jax.device_count()} device(s))')
  if _COUNTS.value:
    print_counts()
  for size in map(int, _SIZES.value):
    compile_s, median_s, times = time_forward(size)
    print(f'{_PRESET.value} {_DECODER_WIDTH.value:g}x {_DTYPE.value} forward, batch '
          f'{_BATCH_SIZE.value}, {size}x{size}: median {median_s:.3f} s over {len(times)} runs '
          f'(min {min(times):.3f}, max {max(times):.3f}; compile {compile_s:.1f} s)')


if __name__ == '__main__':
  app.run(main)
