r"""The miniature DDeP reproduction of `make demo`: every stage on the embedded digit scenes.

`python -m experiments.demo --workdir=workdirs/demo` runs all of it (see docs/demo.md). Each run is
an ordinary trainer run of this file, so any one of them can be repeated by hand:

  python -m ddep_jax.main --config=configs/demo.py:stage=supervised \
      --workdir=workdirs/demo/pretrain/supervised
  python -m ddep_jax.main --config=configs/demo.py:stage=ddep --workdir=workdirs/demo/pretrain/ddep
  python -m ddep_jax.main --config=configs/demo.py:stage=dep --workdir=workdirs/demo/pretrain/dep
  python -m ddep_jax.main \
      --config=configs/demo.py:stage=finetune,init=ddep,label_fraction=0.01,subset_seed=0 \
      --workdir=workdirs/demo/finetune/init=ddep-label_fraction=0.01-subset_seed=0

and `python -m experiments.sweep --config=configs/demo.py:stage=finetune \
--workdir_root=workdirs/demo/finetune` runs the fine-tuning sweep (`get_sweep`), one process per
run.

The stages stand in for the paper's (§3-5) at a size a laptop CPU trains in minutes:

| stage        | paper                                  | here                                   |
|--------------|----------------------------------------|----------------------------------------|
| `supervised` | ImageNet-21k supervised encoder        | classify single digits on photos       |
| `ddep`       | decoder denoising, encoder frozen (§4) | denoise 2,000 unlabeled scenes, Eq. 6  |
| `dep`        | whole model denoising, scratch (§3)    | the same data, steps and noise         |
| `finetune`   | pixel cross-entropy, 1-100 % labels    | 1 % / 5 % of 1,000 labelled scenes, 11 |
|              |                                        | classes, mIoU on 200 validation scenes |

Fine-tuning has one recipe for every initialisation (`init=none|supervised|dep|ddep`), label
fraction and subset: only the initial parameters and the labelled subset differ. `init=none`
and `init=supervised` are the paper's "No pretraining" and "Supervised" baselines (encoder only).

Arguments (`configs/demo.py:k=v,...`):
  stage: 'supervised', 'ddep', 'dep' or 'finetune'.
  init: fine-tuning initialisation, 'none', 'supervised', 'dep' or 'ddep'.
  label_fraction: fraction of the 1,000 labelled train scenes used for fine-tuning.
  subset_seed: which labelled subset; also the run's `config.seed` (model init and data order),
    so that repetitions at 100 % labels differ too (as `experiments.hyper.repeats`).
  subset_seeds: the sweep's subset seeds, `+`-separated (`subset_seeds=100+101+102`); default
    `SUBSET_SEEDS`, 100-102 (`SMOKE_SUBSET_SEEDS` with runlocal): subsets the design was not
    chosen on; it was explored on `EXPLORATION_SUBSET_SEEDS`, 0-2 (issue 19's protocol).
  stride: the encoder's output stride, 16 (default: a 2x2 token map on the 32x32 scenes), 8 or 4
    (4x4 or 8x8 tokens): the `tiny` hybrid with 3, 2 or 1 ResNet stages and a decoder of 5, 4 or
    3 stages (`ddep_jax.models.get_config(output_stride=...)`).
  classes: what fine-tuning segments: 'digits' (default: background + the 10 digits, 11
    classes) or 'foreground' (background + one class for every digit: the same scenes and masks,
    `digit_scenes_foreground`); issue 19's check of a task whose identity the encoder need not
    supply (docs/demo.md).
  root: the demo work directory: earlier stages are read from `<root>/pretrain/<stage>`.
  data_dir: TFDS data_dir of `ddep_digit_scenes` (default `<root>/tfds`).
  runlocal: a seconds-long smoke version (tiny model, a few steps, few eval images), for tests.
Paths in the argument may not contain ',', '+' or '='.
"""

import math

from configs import common
from configs import paper
from ddep_jax import fileio
from ddep_jax import models
from ddep_jax.data import datasets

STAGES = ('supervised', 'ddep', 'dep', 'finetune')
PRETRAIN_STAGES = ('supervised', 'ddep', 'dep')  # In the order they must run.
# The demo's label-efficiency protocol: fractions of the 1,000 train scenes (10 and 50 images)
# x labelled subsets (their seeds); Table 2 / Fig. 6 of the paper in miniature, at the low
# fractions where the paper's gains are largest. 100 % is left out: 300 steps are under five
# epochs of it, its runs the least converged and the most spread (docs/demo.md), and a budget
# that converges them does not fit in the demo's 20 minutes (issue 19, hypothesis 3).
LABEL_FRACTIONS = (0.01, 0.05)
# The design was explored on the labelled subsets 0, 1, 2 (docs/demo.md); the table of `make
# demo` is measured on subsets the exploration never used (issue 19's protocol).
EXPLORATION_SUBSET_SEEDS = (0, 1, 2)
SUBSET_SEEDS = (100, 101, 102)
NUM_SUBSETS = len(SUBSET_SEEDS)
# The smoke run (tests): one labelled fraction (a subset, not the whole set), two subsets for a std.
SMOKE_LABEL_FRACTIONS = (0.05,)
SMOKE_SUBSET_SEEDS = (0, 1)
SMOKE_NUM_SUBSETS = len(SMOKE_SUBSET_SEEDS)

_DEFAULT_ROOT = 'workdirs/demo'  # The Makefile's DEMO_WORKDIR.
NOISE_STD = 0.22  # Paper §4.1's best sigma, on [-1, 1] images as here: kept, not retuned.
# Fine-tuning loss weights (`config.class_weights`): background 0.1, each digit 1.
BACKGROUND_WEIGHTED = (0.1,) + (1.0,) * 10
OUTPUT_STRIDES = (16, 8, 4)
# What fine-tuning segments: the 10 digits, or digits as one foreground class.
SEGMENTATION_DATASETS = {'digits': 'digit_scenes', 'foreground': 'digit_scenes_foreground'}
# Decoder stages at 1/16 ... 1/1; a smaller stride keeps the last ones (as the presets do).
DECODER_WIDTHS = (64, 32, 32, 16, 16)


def _parse(arg):
  return common.parse_arg(arg, stage='finetune', init='ddep', label_fraction=1.0, subset_seed=0,
                          subset_seeds=None, stride=16, classes='digits', root=_DEFAULT_ROOT,
                          data_dir='', runlocal=False)


def subset_seeds(arg) -> tuple[int, ...]:
  """The sweep's subset seeds: `arg.subset_seeds` (one int or a tuple), or the default."""
  if arg.subset_seeds is None:
    return SMOKE_SUBSET_SEEDS if arg.runlocal else SUBSET_SEEDS
  seeds = arg.subset_seeds if isinstance(arg.subset_seeds, tuple) else (arg.subset_seeds,)
  if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
    raise ValueError(f'subset_seeds={arg.subset_seeds!r}: expected integers joined by "+", '
                     'e.g. subset_seeds=100+101+102.')
  if len(set(seeds)) != len(seeds):
    raise ValueError(f'subset_seeds={arg.subset_seeds!r} repeats a seed.')
  return tuple(seeds)


def model_config(stride=16):
  """The demo's TransUNet: the `tiny` R50+ViT preset with a wider decoder, GAP, no dropout.

  * `stride` 16, 8 or 4: the preset's hybrid with 3, 2 or 1 ResNet stages (a 2x2, 4x4 or 8x8
    token map on 32x32 scenes); the decoder keeps the last 5, 4 or 3 of `DECODER_WIDTHS`.
  * Decoder widths (64, 32, 32, 16, 16) instead of the preset's (32, 16, 16, 8, 8): predicting
    the noise at 1/1 and 1/2 needs more than 8 channels there (docs/demo.md).
  * `classifier='none'`: the supervised stage classifies the mean of the tokens (GAP), which
    trains faster from scratch than a class token.
  * No dropout: with it the compiled update step would depend on `config.seed` (the dropout key
    is a constant of the program), and fine-tuning runs of different seeds could not share one
    compilation.
  """
  if stride not in OUTPUT_STRIDES:
    raise ValueError(f'stride={stride!r}: expected one of {OUTPUT_STRIDES}.')
  num_stages = int(math.log2(stride)) + 1  # One decoder stage per x2 upsampling, and 1/stride.
  return models.get_config('tiny', output_stride=stride, dropout_rate=0.0, classifier='none',
                           decoder={'base_widths': DECODER_WIDTHS[-num_stages:],
                                    'num_groups': 8})


def get_config(arg=None):
  """The config of one demo run; see the module docstring for the arguments."""
  arg = _parse(arg)
  if arg.stage not in STAGES:
    raise ValueError(f'stage={arg.stage!r}: expected one of {STAGES}.')
  if arg.init not in paper.INITS:
    raise ValueError(f'init={arg.init!r}: expected one of {paper.INITS}.')
  data_dir = arg.data_dir or fileio.join(arg.root, 'tfds')
  smoke = arg.runlocal

  config = common.get_base_config()
  config.model = model_config(arg.stride)
  config.input.data_dir = data_dir
  config.input.crop_size = (32, 32)  # The scenes' size.
  config.input.shuffle_buffer = 4096  # Larger than every train split: a full shuffle.
  config.input.flip = False  # A mirrored digit is not a digit.
  config.optimizer.name = 'adam'
  config.wd = 0.0
  config.log_every_steps = 2 if smoke else 50
  config.keep_checkpoints = 1

  eval_batch = 8 if smoke else 100
  val_split = 'validation[:16]' if smoke else 'validation'

  if arg.stage == 'supervised':
    # Stand-in for the ImageNet-21k encoder: encoder + token mean + head on single digits.
    config.task = 'classify'
    config.num_classes = 10
    config.input.dataset = 'digit_scenes_classification'
    # Mild crops: smaller ones cut the one digit off, and a short run learns faster without.
    config.input.inception_crop = (0.8, 1.0)
    config.input.batch_size = 8 if smoke else 32
    # Long enough for a strong stand-in encoder on 32x32 scenes (measurements: docs/demo.md).
    config.total_steps = 3 if smoke else 1500
    config.lr = 2e-3
    config.schedule = (('.*', dict(decay_type='cosine', warmup_steps=1 if smoke else 20)),)
    config.evals.val = common.eval_config('digit_scenes_classification', val_split,
                                          batch_size=eval_batch, data_dir=data_dir, resize=32)
  elif arg.stage in ('ddep', 'dep'):
    config.task = 'denoise'
    config.input.dataset = 'digit_scenes_unlabeled'
    config.input.inception_crop = (0.8, 1.0)
    config.input.batch_size = 8 if smoke else 32
    # Steps and lr at which the decoder behind the frozen encoder learns to denoise (docs/demo.md).
    config.total_steps = 3 if smoke else 1000
    config.lr = 3e-3
    config.denoising.noise_type = 'scaled'  # Eq. 5/6, predicting the noise (Table 1).
    config.denoising.noise_std = NOISE_STD
    config.denoising.predict_target = 'noise'
    schedule = dict(decay_type='cosine', warmup_steps=1 if smoke else 20)
    if arg.stage == 'ddep':
      # §4: the encoder stays at its supervised weights; only the decoder learns to denoise.
      config.schedule = (('encoder/.*', None), ('.*', schedule))
      config.init_from.checkpoint = fileio.join(arg.root, 'pretrain', 'supervised')
      config.init_from.params = ('encoder/.*',)
    else:
      config.schedule = (('.*', schedule),)  # §3: everything from random initialisation.
    # Checkpoints at every step of the smoke run let tests see the frozen encoder over time.
    config.checkpoint_every_steps = 1 if smoke else 1000
    config.keep_checkpoints = 5 if smoke else 1
    config.evals.val = common.eval_config('digit_scenes', val_split, batch_size=eval_batch,
                                          data_dir=data_dir, resize=32)
  else:
    config.task = 'segment'
    if arg.classes not in SEGMENTATION_DATASETS:
      raise ValueError(f'classes={arg.classes!r}: expected one of '
                       f'{tuple(SEGMENTATION_DATASETS)}.')
    dataset = SEGMENTATION_DATASETS[arg.classes]
    config.num_classes = datasets.get_spec(dataset).num_classes
    config.seed = arg.subset_seed
    config.input.dataset = dataset
    config.input.label_fraction = float(arg.label_fraction)
    config.input.subset_seed = arg.subset_seed
    config.input.batch_size = 8 if smoke else 16
    # The digits already vary in size (16-26 px) and a rescaled scene cut to 32x32 loses them.
    config.input.scale_range = (1.0, 1.0)
    # 300 steps of 16 (96 epochs of the 50 scenes at 5 %): DDeP's decoder is still catching up
    # at 300 (1,000 steps: docs/demo.md, issue 19's hypothesis 3), but 500 already took the demo
    # over its 20 minutes on 2 cores.
    config.total_steps = 2 if smoke else 300
    config.lr = 1e-3
    config.schedule = (('.*', dict(decay_type='cosine', warmup_steps=0 if smoke else 20)),)
    # Background is ~89 % of the pixels; weighted 1, it hides digit identity (docs/demo.md).
    config.class_weights = BACKGROUND_WEIGHTED[:config.num_classes]
    if arg.init != 'none':
      config.init_from.checkpoint = fileio.join(arg.root, 'pretrain', arg.init)
      # The supervised baseline has no decoder to carry (its run classifies); the heads are
      # always fresh (other classes / outputs).
      config.init_from.params = (('encoder/.*',) if arg.init == 'supervised'
                                 else ('encoder/.*', 'decoder/.*'))
    config.evals.val = common.eval_config(dataset, val_split, batch_size=eval_batch,
                                          data_dir=data_dir)
  config.lock()
  return config


def get_sweep(hyper, arg=None):
  """The fine-tuning runs: every initialisation x label fraction x subset (`experiments.sweep`).

  The label fraction and subset go into the config argument, as `init` does; each run is tagged
  `init`, `label_fraction`, `subset_seed`, the row, column and repetition keys of the table.
  """
  arg = _parse(arg)
  fractions = SMOKE_LABEL_FRACTIONS if arg.runlocal else LABEL_FRACTIONS
  return hyper.product([
      hyper.sweep('arg.init', paper.INITS),
      hyper.sweep('arg.label_fraction', fractions),
      hyper.sweep('arg.subset_seed', subset_seeds(arg)),
  ])
