"""How well a run uses its hardware: step FLOPs, TFLOP/s per device, MFU, images/s, input wait.

The pure pieces of the throughput metrics the train loop logs (`train/mfu`,
`train/tflops_per_device`, ...):

    flops = step_flops_per_device(jitted_step.lower(state, batch).compile())  # once, at start-up
    peak = peak_flops_per_device(jax.devices()[0].device_kind, 'bfloat16', config)
    throughput_metrics(flops, steps=100, seconds=42.0, input_seconds=1.3,
                       global_batch_size=512, num_devices=8, peak_flops=peak)

MFU here is the step's FLOPs as XLA's cost analysis counts them (the compiled program, so a
rematerialised forward pass is counted again) times steps/s over the devices' peak: with remat on
it is closer to hardware FLOPs utilisation than to PaLM's model FLOPs utilisation.
"""

import contextlib
import time
from typing import Optional

import ml_collections

# Dense peak TFLOP/s per chip (no 2:4 sparsity) for the compute dtypes, keyed by `device_kind`.
# float32 is what JAX runs a float32 matmul at by default: one bfloat16 pass on TPU, TF32 on
# Ampere and later GPUs (docs.jax.dev/en/latest/201/precision.html). Sources: Cloud TPU system
# architecture pages cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} (bf16 per chip); NVIDIA A100
# datasheet (BF16 312, TF32 156), H100 whitepaper / datasheet (SXM: BF16 989.4, TF32 494.7;
# PCIe: 756 / 378; NVL: 835.5 / 417.5, half the sparse figures), H200 datasheet (SXM as H100 SXM,
# NVL 835.5 / 417.5).
_TPU_PEAKS = {
    'TPU v4': {'bfloat16': 275.0, 'float32': 275.0},
    'TPU v5 lite': {'bfloat16': 197.0, 'float32': 197.0},   # v5e
    'TPU v5e': {'bfloat16': 197.0, 'float32': 197.0},
    'TPU v5': {'bfloat16': 459.0, 'float32': 459.0},        # v5p
    'TPU v5p': {'bfloat16': 459.0, 'float32': 459.0},
    'TPU v6 lite': {'bfloat16': 918.0, 'float32': 918.0},   # v6e (Trillium)
    'TPU v6e': {'bfloat16': 918.0, 'float32': 918.0},
}
# GPUs: (substrings that must all occur in device_kind, peaks); the first match wins, so the
# PCIe / NVL variants come before the SXM default of their chip.
_GPU_PEAKS = (
    (('H100', 'PCIE'), {'bfloat16': 756.0, 'float32': 378.0}),
    (('H100', 'NVL'), {'bfloat16': 835.5, 'float32': 417.5}),
    (('H100',), {'bfloat16': 989.4, 'float32': 494.7}),
    (('H200', 'NVL'), {'bfloat16': 835.5, 'float32': 417.5}),
    (('H200',), {'bfloat16': 989.4, 'float32': 494.7}),
    (('A100',), {'bfloat16': 312.0, 'float32': 156.0}),
)
DTYPES = ('float32', 'bfloat16')
# XLA:CPU expands jax.checkpoint's optimization barriers early in its pass pipeline (the pass
# `cse_barrier_expander`), and its later CSE then merges the recomputation into the forward pass:
# remat saves no memory there (GPUs expand them only after scheduling). This XLA flag keeps them,
# so that `memory_analysis()` on a CPU shows what remat saves (the benchmark, tests).
CPU_KEEP_REMAT_XLA_FLAG = '--xla_disable_hlo_passes=cse_barrier_expander'


def default_config() -> ml_collections.ConfigDict:
  """`peak_tflops_per_device`: None looks the device up in the peak table (`peak_flops_per_device`).

  Set it for a device the table lacks, or when the matmul precision differs from JAX's default
  (e.g. `jax_default_matmul_precision='highest'` runs float32 far below the table's figure).
  """
  return ml_collections.ConfigDict(dict(
      peak_tflops_per_device=ml_collections.config_dict.placeholder(float)))


def table_peak_tflops(device_kind: str, dtype: str) -> Optional[float]:
  """The table's dense peak TFLOP/s of one `device_kind` chip in `dtype`; None if unknown."""
  if dtype not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}; got {dtype!r}.')
  if device_kind in _TPU_PEAKS:
    return _TPU_PEAKS[device_kind][dtype]
  kind = device_kind.upper()
  for needles, peaks in _GPU_PEAKS:
    if all(n in kind for n in needles):
      return peaks[dtype]
  return None


def peak_flops_per_device(device_kind: str, dtype: str,
                          peak_tflops_override: Optional[float] = None) -> Optional[float]:
  """Peak FLOP/s of one device: the override (TFLOP/s) if set, else the table; None if unknown."""
  if peak_tflops_override is not None:
    if peak_tflops_override <= 0:
      raise ValueError(f'config.peak_tflops_per_device must be positive (or None to look the '
                       f'device up); got {peak_tflops_override}.')
    return float(peak_tflops_override) * 1e12
  tflops = table_peak_tflops(device_kind, dtype)
  return None if tflops is None else tflops * 1e12


def step_flops_per_device(compiled) -> Optional[float]:
  """FLOPs of one run of a compiled (SPMD) program on one device, from XLA's cost analysis.

  XLA analyses the partitioned program, so the figure is per device; None when the backend gives
  no cost analysis.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def throughput_metrics(step_flops: Optional[float], *, steps: int, seconds: float,
                       input_seconds: float, global_batch_size: int, num_devices: int,
                       peak_flops: Optional[float]) -> dict[str, float]:
  """Throughput of `steps` train steps that took `seconds` of wall time.

  Args:
    step_flops: FLOPs of one step on one device (`step_flops_per_device`), or None.
    steps: steps in the interval.
    seconds: wall time of the interval (host side, after the devices caught up).
    input_seconds: of which the host waited for the next batch of the input pipeline.
    global_batch_size: images per step over all devices.
    num_devices: devices the step runs on.
    peak_flops: peak FLOP/s of one device, or None (then no `mfu`).

  Returns:
    `images_per_sec` (global), `images_per_sec_per_device`, `input_wait_fraction` and, when the
    FLOPs are known, `step_flops_per_device`, `tflops_per_device` and (peak known) `mfu`.
  """
  if steps <= 0 or seconds <= 0:
    raise ValueError(f'Need a positive number of steps and seconds; got {steps}, {seconds}.')
  steps_per_sec = steps / seconds
  metrics = {
      'images_per_sec': global_batch_size * steps_per_sec,
      'images_per_sec_per_device': global_batch_size * steps_per_sec / num_devices,
      'input_wait_fraction': input_seconds / seconds,
  }
  if step_flops is not None:
    achieved = step_flops * steps_per_sec  # Per device.
    metrics['step_flops_per_device'] = step_flops
    metrics['tflops_per_device'] = achieved / 1e12
    if peak_flops is not None:
      metrics['mfu'] = achieved / peak_flops
  return metrics


class ThroughputMeter:
  """Host-side timing of the train loop, turned into `throughput_metrics` at each log step.

      meter = ThroughputMeter(global_batch_size=..., num_devices=..., peak_flops=...)
      with meter.waiting_for_input():
        batch = next(iterator)
      ...
      meter.step_done()
      ... fetch the step's metrics (syncs with the devices) ...
      writer.write_scalars(step, meter.metrics())   # then meter.restart() after evals etc.
  """

  def __init__(self, *, global_batch_size: int, num_devices: int, peak_flops: Optional[float],
               clock=time.perf_counter):
    self.global_batch_size = global_batch_size
    self.num_devices = num_devices
    self.peak_flops = peak_flops
    self.step_flops: Optional[float] = None
    self._clock = clock
    self.restart()

  def restart(self):
    """Starts a new interval now (after compilation, evaluations or checkpointing)."""
    self._start = self._clock()
    self._steps = 0
    self._input_seconds = 0.0

  @contextlib.contextmanager
  def waiting_for_input(self):
    start = self._clock()
    try:
      yield
    finally:
      self._input_seconds += self._clock() - start

  def step_done(self):
    self._steps += 1

  def metrics(self) -> dict[str, float]:
    """Throughput since the last `restart` / `metrics` call ({} before any step)."""
    seconds = self._clock() - self._start
    if not self._steps or seconds <= 0:
      return {}
    out = throughput_metrics(self.step_flops, steps=self._steps, seconds=seconds,
                             input_seconds=self._input_seconds,
                             global_batch_size=self.global_batch_size,
                             num_devices=self.num_devices, peak_flops=self.peak_flops)
    self.restart()
    return out


def meter_for(config: ml_collections.ConfigDict, mesh, device_kind: str) -> ThroughputMeter:
  """The meter of a run: global batch, devices of the mesh, peak of its compute dtype."""
  peak = peak_flops_per_device(device_kind, config.model.dtype, config.peak_tflops_per_device)
  return ThroughputMeter(global_batch_size=int(config.input.batch_size),
                         num_devices=int(mesh.devices.size), peak_flops=peak)
