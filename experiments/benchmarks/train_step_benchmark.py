r"""Train-step throughput of DDeP, DeP and fine-tuning on the full-size TransUNet (not a test).

    python experiments/benchmarks/train_step_benchmark.py                  # 224x224, 4 per device
    python experiments/benchmarks/train_step_benchmark.py --batch_size=2 --steps=2   # CPU
    python experiments/benchmarks/train_step_benchmark.py --regimes=ddep,ddep_masked_updates,dep

For each regime it builds the real step (`train_step.make_train_step`) on a mesh over every
device present, compiles it, runs `--warmup` untimed steps and then `--steps` timed rounds, one
step of every regime per round (interleaved, so that drifting machine load hits all of them alike).
It prints the median step time, images/s, the step's FLOPs from XLA's cost analysis of the compiled
program and the achieved FLOP/s as a fraction of a measured matmul peak (a batched square matmul
in the same dtype, one per device), then the DDeP / DeP ratios of FLOPs and time.

Regimes (`--regimes`):
  ddep                 denoising, encoder frozen: gradients of the decoder and head only (§4).
  dep                  denoising, everything trained (§3).
  finetune             pixel cross-entropy, everything trained (19 classes).
  ddep_masked_updates  DDeP's optimizer (frozen encoder updates masked to zero) but gradients of
                       every parameter: what freezing by masking the updates alone would cost.

The DDeP step skips the encoder's backward pass, so with the 1x decoder (about as large as the
encoder) it needs about 0.7x the FLOPs of the DeP step; `ddep_masked_updates` costs about 1.0x.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ddep_jax import models
from ddep_jax import objectives
from ddep_jax import optimizer
from ddep_jax import sharding
from ddep_jax import train_step

REGIMES = ('ddep', 'dep', 'finetune', 'ddep_masked_updates')
_REGIMES = flags.DEFINE_list('regimes', ['ddep', 'dep', 'finetune'], f'Any of {REGIMES}.')
_PRESET = flags.DEFINE_string('preset', 'R50+ViT-B_16', 'Model preset (ddep_jax.models).')
_DECODER_WIDTH = flags.DEFINE_float('decoder_width', 1, 'Decoder width multiplier (§4.3).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 0, 'Global batch size (0: 4 per device).')
_RESOLUTION = flags.DEFINE_integer('resolution', 224, 'Square input size.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per regime (median reported).')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed steps per regime after compiling.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_MATMUL_SIZE = flags.DEFINE_integer('matmul_size', 2048, 'Side of the square matmul for the peak.')
_NUM_CLASSES = 19


def _config(regime: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  for module in (objectives, optimizer, sharding, train_step):
    config.update(module.default_config())
  config.model = models.get_config(_PRESET.value, decoder_width=_DECODER_WIDTH.value,
                                   dtype=_DTYPE.value)
  config.task = 'segment' if regime == 'finetune' else 'denoise'
  config.num_classes = _NUM_CLASSES
  config.total_steps = 10_000
  trained = dict(decay_type='cosine', warmup_steps=100)
  config.schedule = ([('encoder/.*', None), ('.*', trained)] if regime.startswith('ddep')
                     else [('.*', trained)])
  return config


def matmul_peak_flops(mesh, dtype, size: int, repeats: int = 5) -> float:
  """Best FLOP/s of one `size`^3 matmul per device, all devices at once."""
  num = mesh.devices.size
  spec = NamedSharding(mesh, P(mesh.axis_names))
  a = jax.device_put(jnp.ones((num, size, size), dtype), spec)
  b = jax.device_put(jnp.full((num, size, size), 0.5, dtype), spec)
  matmul = jax.jit(lambda a, b: jnp.einsum('bij,bjk->bik', a, b), out_shardings=spec)
  matmul(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * num * size**3 / best


class Regime:
  """One compiled train step with its state and batch."""

  def __init__(self, name: str, mesh, batch_size: int):
    self.name = name
    config = _config(name)
    model = models.build_model(config.model, task=config.task, num_classes=_NUM_CLASSES)
    image_shape = (batch_size, _RESOLUTION.value, _RESOLUTION.value, 3)
    abstract = train_step.abstract_params(config, model, image_shape)
    opt = optimizer.make_optimizer(config, abstract)
    self.num_trainable = sum(int(np.prod(x.shape)) for x, t in
                             zip(jax.tree.leaves(abstract), jax.tree.leaves(opt.trainable_mask))
                             if t)
    self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    start = time.perf_counter()
    self.state, shardings = train_step.create_train_state(config, model, opt, mesh, image_shape)
    jax.block_until_ready(self.state)
    self.init_s = time.perf_counter() - start
    if name == 'ddep_masked_updates':
      # Differentiate everything; the optimizer still zeroes the encoder's updates.
      opt = opt._replace(trainable_mask=jax.tree.map(lambda _: True, opt.trainable_mask))
    step = train_step.make_train_step(config, model, opt, mesh, shardings)
    rng = np.random.default_rng(0)
    local = {'image': rng.uniform(-1, 1, image_shape).astype(np.float32)}
    if config.task == 'segment':
      local['label'] = rng.integers(0, _NUM_CLASSES, image_shape[:3]).astype(np.int32)
    self.batch = sharding.global_batch(local, mesh)
    start = time.perf_counter()
    self.compiled = step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    # Cost analysis of an SPMD program is per device.
    self.flops = float(self.compiled.cost_analysis()['flops']) * mesh.devices.size
    self.times = []

  def run(self, timed: bool):
    start = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    if timed:
      self.times.append(time.perf_counter() - start)
    if not np.isfinite(float(metrics['loss'])):
      raise FloatingPointError(f'{self.name}: non-finite loss {metrics["loss"]}')


def main(argv):
  del argv
  unknown = sorted(set(_REGIMES.value) - set(REGIMES))
  if unknown:
    raise app.UsageError(f'--regimes: unknown {unknown}; choose from {REGIMES}.')
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(mesh=(('data', -1),))))
  num_devices = mesh.devices.size
  batch_size = _BATCH_SIZE.value or 4 * num_devices
  print(f'jax {jax.__version__}, {num_devices} x {jax.devices()[0].device_kind}; '
        f'{_PRESET.value} decoder {_DECODER_WIDTH.value:g}x, {_DTYPE.value}, batch {batch_size}, '
        f'{_RESOLUTION.value}x{_RESOLUTION.value}')
  dtype = jnp.bfloat16 if _DTYPE.value == 'bfloat16' else jnp.float32
  peak = matmul_peak_flops(mesh, dtype, _MATMUL_SIZE.value)
  print(f'matmul peak ({_MATMUL_SIZE.value}^3 {_DTYPE.value} per device): '
        f'{peak / 1e9:.1f} GFLOP/s over {num_devices} device(s)')

  regimes = []
  for name in _REGIMES.value:
    regimes.append(Regime(name, mesh, batch_size))
    r = regimes[-1]
    print(f'{name}: {r.num_trainable:,} of {r.num_params:,} parameters trained; init '
          f'{r.init_s:.1f} s, compile {r.compile_s:.1f} s, {r.flops / 1e9:.1f} GFLOP per step')
  for r in regimes:
    for _ in range(_WARMUP.value):
      r.run(timed=False)
  for _ in range(_STEPS.value):
    for r in regimes:
      r.run(timed=True)

  print(f'{"regime":<20} {"step s":>8} {"min":>7} {"max":>7} {"img/s":>8} {"GFLOP":>8} '
        f'{"GFLOP/s":>8} {"of peak":>8}')
  by_name = {}
  for r in regimes:
    step_s = float(np.median(r.times))
    by_name[r.name] = (r.flops, step_s)
    achieved = r.flops / step_s
    print(f'{r.name:<20} {step_s:8.3f} {min(r.times):7.3f} {max(r.times):7.3f} '
          f'{batch_size / step_s:8.2f} {r.flops / 1e9:8.1f} {achieved / 1e9:8.1f} '
          f'{achieved / peak:8.1%}')
  if 'dep' in by_name:
    for name in ('ddep', 'ddep_masked_updates'):
      if name in by_name:
        print(f'{name} / dep: FLOPs {by_name[name][0] / by_name["dep"][0]:.3f}, '
              f'time {by_name[name][1] / by_name["dep"][1]:.3f}')


if __name__ == '__main__':
  app.run(main)
