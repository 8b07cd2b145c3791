"""Experiment tooling: sweeps (`hyper`, `sweep`), the Cloud TPU launcher (`tpu/`), result tables
(`collect_results`) and benchmarks (`benchmarks/`).

These tools start the trainer as a subprocess and read the JSON it writes into work directories;
they do not import `ddep_jax` themselves (only the config files they load do), so they stay fast
and testable without the trainer or an accelerator.
"""
