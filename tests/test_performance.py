"""Throughput metrics: the peak table and the MFU maths (what the loop logs: tests/test_train.py)."""

import pytest

from ddep_jax import performance


@pytest.mark.parametrize('kind,dtype,tflops', [
    ('TPU v4', 'bfloat16', 275.0), ('TPU v5 lite', 'bfloat16', 197.0),
    ('TPU v5', 'float32', 459.0), ('TPU v6 lite', 'bfloat16', 918.0),
    ('NVIDIA A100-SXM4-80GB', 'float32', 156.0), ('NVIDIA H100 80GB HBM3', 'bfloat16', 989.4),
    ('NVIDIA H100 PCIe', 'bfloat16', 756.0), ('NVIDIA H200', 'float32', 494.7),
    ('cpu', 'bfloat16', None)])
def test_peak_table(kind, dtype, tflops):
  assert performance.table_peak_tflops(kind, dtype) == tflops
  peak = performance.peak_flops_per_device(kind, dtype)
  assert peak == (None if tflops is None else tflops * 1e12)
  assert performance.peak_flops_per_device(kind, dtype, 2.5) == 2.5e12  # Config override.


def test_mfu_from_a_fake_device_peak():
  # 10 steps of 3 GFLOP per device in 2 s on 4 devices of 10 GFLOP/s, batch 32, 0.5 s waiting.
  m = performance.throughput_metrics(3e9, steps=10, seconds=2.0, input_seconds=0.5,
                                     global_batch_size=32, num_devices=4, peak_flops=10e9)
  assert m == pytest.approx({'images_per_sec': 160.0, 'images_per_sec_per_device': 40.0,
                             'input_wait_fraction': 0.25, 'step_flops_per_device': 3e9,
                             'tflops_per_device': 0.015, 'mfu': 1.5})
  unknown = performance.throughput_metrics(3e9, steps=10, seconds=2.0, input_seconds=0.0,
                                           global_batch_size=32, num_devices=4, peak_flops=None)
  assert 'mfu' not in unknown and unknown['tflops_per_device'] == pytest.approx(0.015)
  no_flops = performance.throughput_metrics(None, steps=10, seconds=2.0, input_seconds=0.0,
                                            global_batch_size=32, num_devices=4, peak_flops=1.0)
  assert set(no_flops) == {'images_per_sec', 'images_per_sec_per_device', 'input_wait_fraction'}


def test_meter_times_input_waits_and_intervals():
  now = [0.0]
  meter = performance.ThroughputMeter(global_batch_size=8, num_devices=2, peak_flops=4.0,
                                      clock=lambda: now[0])
  meter.step_flops = 2.0
  for _ in range(4):
    with meter.waiting_for_input():
      now[0] += 0.25
    now[0] += 0.75
    meter.step_done()
  m = meter.metrics()  # 4 steps in 4 s, 1 s of it waiting.
  assert m == pytest.approx({'images_per_sec': 8.0, 'images_per_sec_per_device': 4.0,
                             'input_wait_fraction': 0.25, 'step_flops_per_device': 2.0,
                             'tflops_per_device': 2e-12, 'mfu': 0.5})
  assert meter.metrics() == {}  # A new interval, no step yet.
