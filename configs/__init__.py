"""Experiment configs: one file per experiment family, each with `get_config(arg)` (and
`get_sweep(hyper, arg)`), big_vision style.

Run from the repository root, as `--config=configs/<file>.py:<arg>` (ml_collections' config_flags
loads the file by path) or `python -m experiments.sweep --config=...`. The files share code only
through three modules of this package, imported as `from configs import ...`:

* `paper`: the paper's numbers (learning rates, noise levels, epochs, grids); imports nothing.
* `common`: the full default config (from the library's locked `default_config()`s) and the
  `:k=v,...` argument parser.
* `stages`: what the experiment files have in common (models, the fine-tuning stage, sweeps,
  `runlocal`, the paths of pretraining runs).

No experiment file imports another one, so each is loaded once, under one name; and nothing
here edits `sys.path`.
"""
