"""Experiment tooling: sweeps (`hyper`, `sweep`), the Cloud TPU launcher (`tpu/`), result tables
(`results_table`, `collect_results`), the miniature reproduction (`demo`, `make demo`) and
benchmarks (`benchmarks/`). They run from the repository root (`python -m
experiments.<tool>`), which holds `configs/`; the installed `ddep_jax` package never imports them.

The sweep, the launcher and the collector start the trainer as a subprocess and read the JSON it
writes into work directories (they import only `ddep_jax.fileio`, and the config files they
load), so they stay fast and testable without the trainer or an accelerator; the demo calls the
trainer in its own process.
"""
