"""The XLA flags of the test session, which the processes that tests start must share.

LLVM's optimisation of the tiny models' programs is most of the suite's compile time (the tiny
TransUNet's jit(init): about 40 s at the default level, 5 s at level 0) and buys nothing at
their sizes. Numbers then differ from default-level runs in the last bits, so every test
compares runs made under these same flags: subprocesses take theirs from `flags()`.
"""

FAST_COMPILE = '--xla_backend_optimization_level=0'


def flags(devices: int | None = 8) -> str:
  """XLA_FLAGS for a test process with `devices` CPU devices (None: XLA's default, one)."""
  count = [] if devices is None else [f'--xla_force_host_platform_device_count={devices}']
  return ' '.join(count + [FAST_COMPILE])
