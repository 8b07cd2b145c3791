r"""What a pod user can expect: step time, images/s, TFLOP/s, MFU and memory per device (not a test).

    python experiments/benchmarks/performance_benchmark.py                     # everything
    python experiments/benchmarks/performance_benchmark.py --steps=0          # compile only
    python experiments/benchmarks/performance_benchmark.py --regimes=finetune --sizes=512 \
        --widths=1 --dtypes=bfloat16 --batch=8 --steps=10                     # one row
    python experiments/benchmarks/performance_benchmark.py --decoder_ops      # item shares

For every (regime, size, decoder width, dtype) it builds the real train step
(`train_step.make_train_step`) of the full-size R50+ViT-B/16 TransUNet on a mesh over all devices,
compiles it (`jit(...).lower(...).compile()`) and reads the FLOPs per device from XLA's cost
analysis and the memory per device from `memory_analysis()` (arguments + outputs - aliased +
temporaries). A second compile at twice the batch gives the memory per extra image, hence the
largest batch per device that fits 16 / 32 / 80 GB. With `--steps > 0` (and the size at most
`--max_time_size`) it times the step: the median of `--steps` runs after one warm-up, images/s
and TFLOP/s per device, and MFU where `ddep_jax.performance` knows the device's peak.

Regimes: `ddep` (denoising, encoder frozen; at `--ddep_sizes`, 224 in the paper), `dep`
(denoising, everything trained) and `finetune` (19-class pixel cross-entropy, everything trained),
both at `--sizes` (512 and 1024 crops in the paper).

`--input_pipeline` then runs `input_pipeline_benchmark.py` (images/s per host of the same input
pipelines), and `--decoder_ops` prints the cost of the decoder's x2 upsampling (the fixed-tap
`decoder.upsample2x` and the `jax.image.resize` it replaced) and GroupNorm layers next to the
whole fine-tuning step's (docs/performance.md).
"""

import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddep_jax import models
from ddep_jax import objectives
from ddep_jax import optimizer
from ddep_jax import performance
from ddep_jax import sharding
from ddep_jax import train_step
from ddep_jax.models import decoder as decoder_lib

REGIMES = ('ddep', 'dep', 'finetune')
_REGIMES = flags.DEFINE_list('regimes', list(REGIMES), f'Any of {REGIMES}.')
_DDEP_SIZES = flags.DEFINE_list('ddep_sizes', ['224'], 'Square input sizes of the DDeP step.')
_SIZES = flags.DEFINE_list('sizes', ['512', '1024'], 'Square sizes of the DeP / fine-tune steps.')
_WIDTHS = flags.DEFINE_list('widths', ['1', '2', '3'], 'Decoder widths (§4.3).')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Batch per device.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per row (0: compile only).')
_MAX_TIME_SIZE = flags.DEFINE_integer('max_time_size', 1024, 'Time steps only up to this size.')
_MEMORY_SCALING = flags.DEFINE_bool('memory_scaling', True,
                                    'Compile again at 2x batch for the batch that fits.')
_PRESET = flags.DEFINE_string('preset', 'R50+ViT-B_16', 'Model preset.')
_REMAT = flags.DEFINE_string('remat', 'none', 'model.remat policy.')
_ATTENTION = flags.DEFINE_string('attention', 'auto', 'model.encoder.attention_implementation.')
_INPUT_PIPELINE = flags.DEFINE_bool('input_pipeline', False, 'Also run the input benchmark.')
_DECODER_OPS = flags.DEFINE_bool('decoder_ops', False, 'Only the decoder op shares.')
_NUM_CLASSES = 19
GB = 1e9


def _config(regime: str, width: float, dtype: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  for module in (objectives, optimizer, sharding, train_step):
    config.update(module.default_config())
  config.model = models.get_config(_PRESET.value, decoder_width=width, dtype=dtype,
                                   remat=_REMAT.value,
                                   encoder={'attention_implementation': _ATTENTION.value})
  config.task = 'segment' if regime == 'finetune' else 'denoise'
  config.num_classes = _NUM_CLASSES
  config.total_steps = 10_000
  trained = dict(decay_type='cosine', warmup_steps=100)
  config.schedule = ([('encoder/.*', None), ('.*', trained)] if regime == 'ddep'
                     else [('.*', trained)])
  return config


def _compile(config, mesh, batch: int, size: int):
  """(compiled step, state, global batch) at `batch` images per device."""
  num = mesh.devices.size
  model = models.build_model(config.model, task=config.task, num_classes=_NUM_CLASSES)
  image_shape = (batch * num, size, size, 3)
  opt = optimizer.make_optimizer(config, train_step.abstract_params(config, model, image_shape))
  state, shardings = train_step.create_train_state(config, model, opt, mesh, image_shape)
  rng = np.random.default_rng(0)
  local = {'image': rng.uniform(-1, 1, image_shape).astype(np.float32)}
  if config.task == 'segment':
    local['label'] = rng.integers(0, _NUM_CLASSES, image_shape[:3]).astype(np.int32)
  global_batch = sharding.global_batch(local, mesh)
  step = train_step.make_train_step(config, model, opt, mesh, shardings)
  return step.lower(state, global_batch).compile(), state, global_batch


def _memory_bytes(compiled) -> float:
  """Peak bytes per device of a compiled program: live arguments, outputs and temporaries."""
  m = compiled.memory_analysis()
  return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
               m.temp_size_in_bytes)


def _fits(fixed: float, per_image: float, budget_gb: float) -> str:
  if per_image <= 0:
    return '?'
  return str(max(0, int((budget_gb * GB - fixed) // per_image)))


def run_row(regime, size, width, dtype, mesh, peak):
  config = _config(regime, width, dtype)
  batch = _BATCH.value
  start = time.perf_counter()
  compiled, state, global_batch = _compile(config, mesh, batch, size)
  compile_s = time.perf_counter() - start
  flops = performance.step_flops_per_device(compiled)
  memory = _memory_bytes(compiled)
  row = dict(regime=regime, size=size, width=width, dtype=dtype, batch=batch,
             gflop_per_image=flops / batch / 1e9, memory_gb=memory / GB, compile_s=compile_s)
  if _MEMORY_SCALING.value:
    memory2 = _memory_bytes(_compile(config, mesh, 2 * batch, size)[0])
    per_image = (memory2 - memory) / batch
    fixed = memory - batch * per_image
    row.update(per_image_gb=per_image / GB,
               **{f'fits_{g}gb': _fits(fixed, per_image, g) for g in (16, 32, 80)})
  if _STEPS.value and size <= _MAX_TIME_SIZE.value:
    state, metrics = compiled(state, global_batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_STEPS.value):
      t = time.perf_counter()
      state, metrics = compiled(state, global_batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
    if not np.isfinite(float(metrics['loss'])):
      raise FloatingPointError(f'{regime} {size} {width}x {dtype}: non-finite loss.')
    step_s = float(np.median(times))
    m = performance.throughput_metrics(flops, steps=1, seconds=step_s, input_seconds=0.0,
                                       global_batch_size=batch * mesh.devices.size,
                                       num_devices=mesh.devices.size, peak_flops=peak(dtype))
    row.update(step_s=step_s, images_per_sec_per_device=m['images_per_sec_per_device'],
               tflops_per_device=m['tflops_per_device'], mfu=m.get('mfu'))
  return row


COLUMNS = (('regime', '{}'), ('size', '{}'), ('width', '{:g}x'), ('dtype', '{}'),
           ('batch', '{}'), ('gflop_per_image', '{:.1f}'), ('step_s', '{:.3f}'),
           ('images_per_sec_per_device', '{:.2f}'), ('tflops_per_device', '{:.3f}'),
           ('mfu', '{:.1%}'), ('memory_gb', '{:.2f}'), ('per_image_gb', '{:.2f}'),
           ('fits_16gb', '{}'), ('fits_32gb', '{}'), ('fits_80gb', '{}'), ('compile_s', '{:.0f}'))
HEADERS = ('regime', 'size', 'decoder', 'dtype', 'batch/dev', 'GFLOP/img', 'step s',
           'img/s/dev', 'TFLOP/s/dev', 'MFU', 'mem GB/dev', 'GB/img', 'b@16GB', 'b@32GB',
           'b@80GB', 'compile s')


def print_row(row, header=False):
  if header:
    print('| ' + ' | '.join(HEADERS) + ' |')
    print('|' + '|'.join('---' for _ in HEADERS) + '|')
  cells = [fmt.format(row[k]) if row.get(k) is not None else '' for k, fmt in COLUMNS]
  print('| ' + ' | '.join(cells) + ' |', flush=True)


def _cost(fn, *args):
  """(GFLOP, GB accessed) of `fn` compiled for `args`, from XLA's cost analysis."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost.get('flops', 0.0) / 1e9, cost.get('bytes accessed', 0.0) / 1e9


def _resize_upsample2x(x):
  batch, height, width, channels = x.shape
  return jax.image.resize(x, (batch, 2 * height, 2 * width, channels), 'bilinear')


def decoder_ops(size: int = 512, width: float = 1.0):
  """Forward + backward cost of the decoder's upsampling and GroupNorm layers, one image."""
  dec = decoder_lib.Decoder(decoder_width=width)
  widths = dec.widths
  totals = {'upsample2x (taps)': [0.0, 0.0], 'jax.image.resize': [0.0, 0.0],
            'GroupNorm': [0.0, 0.0]}
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) ** 2))  # noqa: E731
  for i, features in enumerate(widths):
    side = size // 16 * 2**i
    if i > 0:
      x = jnp.ones((1, side // 2, side // 2, widths[i - 1]), jnp.float32)
      for name, fn in (('upsample2x (taps)', decoder_lib.upsample2x),
                       ('jax.image.resize', _resize_upsample2x)):
        totals[name] = [a + b for a, b in zip(totals[name], _cost(grad(fn), x))]
    y = jnp.ones((1, side, side, features), jnp.float32)
    norm = nn.GroupNorm(num_groups=32, epsilon=1e-6)
    params = norm.init(jax.random.key(0), y)
    gn = lambda x, p=params, m=norm: m.apply(p, x)  # noqa: E731
    totals['GroupNorm'] = [a + 2 * b for a, b in zip(totals['GroupNorm'], _cost(grad(gn), y))]
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(mesh=(('data', -1),))),
                            devices=jax.devices()[:1])
  compiled, _, _ = _compile(_config('finetune', width, 'float32'), mesh, 1, size)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  step = (cost['flops'] / 1e9, cost['bytes accessed'] / 1e9)
  print(f'Fine-tuning step {size}x{size}, {width:g}x decoder, batch 1, float32: '
        f'{step[0]:.1f} GFLOP, {step[1]:.2f} GB accessed (XLA cost analysis)')
  print('| op (forward + backward, all decoder layers) | GFLOP | share of step | GB accessed | '
        'share of step |')
  print('|---|---|---|---|---|')
  for name, (flops, gbytes) in totals.items():
    print(f'| {name} | {flops:.2f} | {flops / step[0]:.1%} | {gbytes:.2f} | '
          f'{gbytes / step[1]:.1%} |')


def main(argv):
  del argv
  if _DECODER_OPS.value:
    for size in map(int, _SIZES.value):
      decoder_ops(size)
    return
  unknown = sorted(set(_REGIMES.value) - set(REGIMES))
  if unknown:
    raise app.UsageError(f'--regimes: unknown {unknown}; choose from {REGIMES}.')
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(mesh=(('data', -1),))))
  kind = jax.devices()[0].device_kind
  peak = lambda dtype: performance.peak_flops_per_device(kind, dtype)  # noqa: E731
  print(f'jax {jax.__version__}, {mesh.devices.size} x {kind} (peak bf16 '
        f'{performance.table_peak_tflops(kind, "bfloat16")} TFLOP/s); {_PRESET.value}, '
        f'remat {_REMAT.value}, attention {_ATTENTION.value}', flush=True)
  if (_REMAT.value != 'none' and jax.default_backend() == 'cpu'
      and performance.CPU_KEEP_REMAT_XLA_FLAG not in os.environ.get('XLA_FLAGS', '')):
    print(f'note: XLA:CPU drops the optimization barriers of jax.checkpoint early and its CSE '
          f'then merges the recomputation into the forward pass, so the memory that remat saves '
          f'on GPUs and TPUs does not show here; rerun with '
          f'XLA_FLAGS={performance.CPU_KEEP_REMAT_XLA_FLAG} to keep them (docs/performance.md).',
          flush=True)
  first = True
  for regime in _REGIMES.value:
    sizes = _DDEP_SIZES.value if regime == 'ddep' else _SIZES.value
    for size in map(int, sizes):
      for width in map(float, _WIDTHS.value):
        for dtype in _DTYPES.value:
          print_row(run_row(regime, size, width, dtype, mesh, peak), header=first)
          first = False
  if _INPUT_PIPELINE.value:
    script = __file__.replace('performance_benchmark.py', 'input_pipeline_benchmark.py')
    subprocess.run([sys.executable, script], check=True)


if __name__ == '__main__':
  app.run(main)
