"""What the experiment configs share: models, the fine-tuning stage, sweeps, `runlocal`, paths.

The experiment files say *which* runs the paper made; this module holds the pieces they have in
common, so that each fact is written once:

* `model_config`: the TransUNet (R50+ViT-B/16 encoder) or the ResNet-50 U-Net (Table 7), with a
  1x / 2x / 3x decoder (§4.3).
* `FinetuneSetup`, `finetune_arg`, `finetune_config`: stage 3, pixel cross-entropy fine-tuning
  from one of the four initialisations of Fig. 6 (`init=none|supervised|dep|ddep`), used by
  `cityscapes.py`, `pascal_context.py` and `ade20k.py`.
* `row`, `label_runs`, `finetune_sweep`, `pretrain_run`: the paper's fine-tuning protocol (§5.1)
  as sweeps: rows of a table x labelled amounts with their repetitions x the lr x wd grid, and the
  work directory of the pretraining run a row starts from.
* `runlocal`: shrinks any config to a one-step CPU smoke run.
* `resolve_path`, `check_choice`: checkpoint paths and argument checks.

How the stages find each other. A sweep of an earlier stage is run with
`--workdir_root=<pretrain_root>/<sweep name>`, so every pretraining run lives at
`<pretrain_root>/<sweep name>/<run name>`, the run name a function of the run's tags alone
(`hyper.run_name`, e.g. `main/decoder_width=2`): `pretrain_run` computes it from the tags,
without expanding the earlier stage's sweep. Fine-tuning sweeps take `pretrain_root` in their
argument and point each run at the right one (`init_ckpt`); single runs may pass `init_ckpt`
as an absolute path instead.

The experiment files import this module as `from configs import stages`; it imports only
`configs.common` and `configs.paper`, never an experiment file.
"""

import dataclasses
import posixpath
from typing import Any, Sequence

import ml_collections

from configs import common
from configs import paper
from ddep_jax import inference
from ddep_jax import models
from ddep_jax.data import datasets

# `model` argument -> (paper preset, tiny CPU preset of the same architecture for runlocal).
MODEL_PRESETS = {
    'transunet': ('R50+ViT-B_16', 'tiny'),        # §2, Fig. 2: TransUNet, R50+ViT-B/16 encoder.
    'r50_unet': ('R50-UNet', 'tiny-R50-UNet'),    # Table 7: U-Net with a ResNet-50 encoder.
}
# Parameters a fine-tuning run carries from a (D)DeP run: encoder and decoder, except the FiLM
# layers and noise embedding of a noise-conditioned decoder (§4.4), which need a noise level that
# segmentation does not have. For an unconditioned decoder this is every decoder parameter.
DECODER_PARAMS = r'decoder/(?!noise_embedding/)(?!.*/film/).*'
# The sweep of configs/supervised_imagenet21k.py: its runs live under
# <pretrain_root>/supervised/<run name>.
SUPERVISED_SWEEP = 'supervised'

# Label amounts outside `experiments.hyper.PROTOCOLS` (Table 2's 60 and 30 Cityscapes images,
# Table 3's "5 %" of Cityscapes) get the paper's repetitions of its other small amounts.
EXTRA_AMOUNT_RUNS = 10

# runlocal: batch 8 (one example per device of the 8-device CPU test mesh), 32x32 crops, the
# first 2 examples of each eval split (TFDS refuses slices longer than the split).
LOCAL_BATCH_SIZE = 8
LOCAL_CROP_SIZE = (32, 32)
LOCAL_EVAL_EXAMPLES = 2

# MMSegmentation's ADE20K scale (2048, 512): a short side of S = 512 with the long side at most 4S.
REFERENCE_LONG_PER_SHORT = 4
# Whole-image evaluation of 512x512-crop models (Pascal Context, ADE20K): the paper gives no
# windows; these are MMSegmentation's slide inference for them (stride 2/3 of the window). The
# runlocal twin keeps the geometry at 32 px.
SLIDING_512 = dict(mode='sliding', crop_size=(512, 512), stride=(341, 341), flip=True)
LOCAL_SLIDING = dict(mode='sliding', crop_size=(32, 32), stride=(21, 21), flip=True)


# ------------------------------------------------------------------------------------------------
# Small helpers.
# ------------------------------------------------------------------------------------------------


def resolve_path(path: str, pretrain_root: str) -> str:
  """`path` under `pretrain_root` when it is relative and a root is given, else `path`."""
  if not path or not pretrain_root or path.startswith('/') or '://' in path:
    return path
  return posixpath.join(pretrain_root, path)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  if value not in choices:
    raise ValueError(f'Config argument {name}={value!r}: expected one of {tuple(choices)}.')


def model_config(model: str, decoder_width: float, *, runlocal: bool,
                 **overrides) -> ml_collections.ConfigDict:
  """The `config.model` section: the paper's model, or its tiny twin for CPU smoke runs."""
  check_choice('model', model, tuple(MODEL_PRESETS))
  if not decoder_width > 0:
    raise ValueError(f'Config argument decoder_width={decoder_width}: must be > 0 (the paper uses '
                     '1, 2 and 3; §4.3).')
  preset = MODEL_PRESETS[model][1 if runlocal else 0]
  return models.get_config(preset, decoder_width=float(decoder_width), **overrides)


def runlocal(config: ml_collections.ConfigDict) -> None:
  """Shrinks a config built with a tiny model to a one-step CPU smoke run.

  Batch 8 and 32x32 crops, one step with no warm-up, a checkpoint and the final evaluations on
  the first 2 examples of each eval split (in a batch of 8). Eval image sizes and inference
  windows are dataset specific and set by the caller.
  """
  config.input.batch_size = LOCAL_BATCH_SIZE
  config.input.crop_size = LOCAL_CROP_SIZE
  config.input.shuffle_buffer = 16
  config.input.threadpool_size = 4
  config.total_steps = 1
  config.total_epochs = 0.0
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1
  config.schedule = tuple((regex, None if schedule is None else dict(schedule, warmup_steps=0))
                          for regex, schedule in config.schedule)
  for eval_config in config.evals.values():
    eval_config.batch_size = LOCAL_BATCH_SIZE
    eval_config.split = f'{eval_config.split.split("[")[0]}[:{LOCAL_EVAL_EXAMPLES}]'
    eval_config.every_steps = None


# ------------------------------------------------------------------------------------------------
# Stage 3: fine-tuning on a segmentation dataset.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FinetuneSetup:
  """What a fine-tuning config file fixes about its dataset.

  Attributes:
    dataset: registry name (`ddep_jax.data.datasets`); gives the classes and the train crop
      (1024x1024 Cityscapes, 512x512 ADE20K / Pascal Context, §5.1).
    protocol: key of `experiments.hyper.PROTOCOLS` (label amounts and repetitions, §5.1).
    batch_size, total_steps: the schedule (the paper is silent; MMSegmentation's).
    eval_protocol: `mode`, `crop_size`, `stride`, `flip` of the inference (`ddep_jax.inference`).
    eval_resize: `resize` of the eval input (None: original resolution).
    eval_batch_size: global eval batch.
    multiscale: default of the `multiscale` argument (scales 0.5 ... 1.75, §5.1).
    local_eval_resize, local_eval_protocol: the same at runlocal size.
    local_scale_range: runlocal train rescale range (None: the full-size one); Cityscapes frames
      are 1024x2048, so smoke crops come from strongly downscaled frames.
    sweeps: the file's paper sweeps, {name: fn(hyper, parsed arg)} (`get_sweep`'s `sweep=`
      argument); the first is the default.
  """
  dataset: str
  protocol: str
  batch_size: int
  total_steps: int
  eval_protocol: dict
  eval_resize: Any
  eval_batch_size: int
  multiscale: bool
  local_eval_resize: Any
  local_eval_protocol: dict
  sweeps: dict
  local_scale_range: tuple | None = None


def train_reference_size(eval_resize) -> tuple[int, int] | None:
  """The `input.reference_size` of the train rescale that matches an eval `resize`.

  An int S (short side S) gives MMSegmentation's keep-ratio scale (4S, S), e.g. (2048, 512), so
  the 0.5-2.0 rescale is relative to the scale evaluation sees; None (original resolution) and
  fixed (h, w) sizes leave it relative to the stored image.
  """
  if isinstance(eval_resize, int):
    return (REFERENCE_LONG_PER_SHORT * eval_resize, eval_resize)
  return None


def finetune_arg(arg: str | None, setup: FinetuneSetup) -> ml_collections.ConfigDict:
  """Parses the argument of a fine-tuning config (see the dataset files for the meaning)."""
  arg = common.parse_arg(
      arg, init='ddep', decoder_width=1, model='transunet', init_ckpt='', pretrain_root='',
      npz=paper.RELEASED_ENCODER, label_fraction=None, label_count=None, subset_seed=0,
      multiscale=setup.multiscale, sweep=next(iter(setup.sweeps)), runlocal=False, data_dir='')
  check_choice('init', arg.init, paper.INITS)
  check_choice('model', arg.model, tuple(MODEL_PRESETS))
  check_choice('sweep', arg.sweep, tuple(setup.sweeps))
  if arg.label_fraction is not None and arg.label_count is not None:
    raise ValueError(f'Config arguments label_fraction={arg.label_fraction} and label_count='
                     f'{arg.label_count}: give at most one.')
  return arg


def named_sweep(hyper, arg: str | None, setup: FinetuneSetup):
  """The sweep named by the argument's `sweep=` (a fine-tuning file's `get_sweep`)."""
  parsed = finetune_arg(arg, setup)
  return setup.sweeps[parsed.sweep](hyper, parsed)


def finetune_config(arg: ml_collections.ConfigDict, setup: FinetuneSetup
                    ) -> ml_collections.ConfigDict:
  """Stage 3: the whole model fine-tuned with pixel cross-entropy (§5.1)."""
  config = common.get_base_config()
  config.task = 'segment'
  config.num_classes = datasets.get_spec(setup.dataset).num_classes
  config.model = model_config(arg.model, arg.decoder_width, runlocal=arg.runlocal)
  data_dir = arg.data_dir or None

  # §5.1: random crops (the dataset's 1024 / 512 default) and left-right flips; the random
  # rescale is MMSegmentation's ratio_range (0.5, 2.0), relative to the evaluation's scale.
  config.input.dataset = setup.dataset
  config.input.split = 'train'
  config.input.batch_size = setup.batch_size
  config.input.scale_range = (0.5, 2.0)
  config.input.reference_size = train_reference_size(setup.eval_resize)
  config.input.flip = True
  config.input.label_fraction = arg.label_fraction
  config.input.label_count = arg.label_count
  config.input.subset_seed = arg.subset_seed
  config.input.data_dir = data_dir

  # §5.1: Adam, cosine decay; lr and wd are swept in [1e-5, 3e-4] (`get_sweep`).
  config.optimizer.name = 'adam'
  config.lr = paper.FINETUNE_LR
  config.wd = paper.FINETUNE_WD
  config.schedule = (
      ('.*', dict(decay_type='cosine', warmup_steps=paper.FINETUNE_WARMUP_STEPS)),)
  config.total_steps = setup.total_steps
  config.total_epochs = 0.0
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 2
  _set_init(config, arg)

  scales = inference.MULTI_SCALE_SCALES if arg.multiscale else (1.0,)
  config.evals.val = common.eval_config(
      setup.dataset, 'validation', batch_size=setup.eval_batch_size, scales=scales,
      resize=setup.eval_resize, data_dir=data_dir, **setup.eval_protocol)

  if arg.runlocal:
    runlocal(config)
    if setup.local_scale_range:
      config.input.scale_range = setup.local_scale_range
    val = config.evals.val
    val.resize = setup.local_eval_resize
    config.input.reference_size = train_reference_size(setup.local_eval_resize)
    for key, value in setup.local_eval_protocol.items():
      val[key] = value
    # One scale: every scale traces the model again, and compiling is most of a CPU smoke run.
    val.scales = (1.0,)
  config.lock()
  return config


def _set_init(config: ml_collections.ConfigDict, arg: ml_collections.ConfigDict) -> None:
  """`config.init_from` for the initialisation `arg.init` (Fig. 6 rows)."""
  ckpt = resolve_path(arg.init_ckpt, arg.pretrain_root)
  init_from = config.init_from
  if arg.init == 'none':
    return  # No pretraining: everything randomly initialised.
  if arg.init == 'supervised':
    # Supervised ImageNet-21k encoder, random decoder: the released checkpoint, or the encoder of
    # a `supervised_imagenet21k.py` run (needed for the ResNet-50 U-Net of Table 7).
    if ckpt:
      init_from.checkpoint = ckpt
      init_from.params = ('encoder/.*',)
    elif arg.model == 'r50_unet':
      raise ValueError(
          'init=supervised with model=r50_unet needs init_ckpt=<work directory of a '
          'configs/supervised_imagenet21k.py:model=r50_unet run> (there is no released '
          'ImageNet-21k checkpoint of this encoder).')
    else:
      init_from.npz = arg.npz
    return
  # dep / ddep: encoder and decoder of a configs/ddep_pretrain.py run.
  if not ckpt:
    kind = 'dep=True' if arg.init == 'dep' else 'dep=False'
    raise ValueError(
        f'init={arg.init} needs the run it starts from: init_ckpt=<work directory of a '
        f'configs/ddep_pretrain.py:{kind} run> (absolute, or relative to pretrain_root=...). '
        f'Sweeps set it from pretrain_root; see the docstring of the config file.')
  init_from.checkpoint = ckpt
  init_from.params = ('encoder/.*', DECODER_PARAMS)


# ------------------------------------------------------------------------------------------------
# Sweeps (see experiments/hyper.py).
# ------------------------------------------------------------------------------------------------


def row(hyper, init: str, decoder_width: int, init_ckpt: str = '', *, tag_ckpt: bool = False,
        **fixed) -> list[dict]:
  """One row of a paper table: an initialisation and decoder width (tagged), as one run dict.

  `init_ckpt` is the pretraining run it starts from (tagged when rows differ only by it, e.g.
  Table 4's two noise schedules); `fixed` are further `arg.<name>` values that are not tags.
  """
  parts = [hyper.sweep('arg.init', [init]), hyper.sweep('arg.decoder_width', [decoder_width])]
  if init_ckpt:
    parts.append(hyper.sweep('arg.init_ckpt', [init_ckpt], tag=tag_ckpt))
  parts += [hyper.fixed(f'arg.{key}', value) for key, value in sorted(fixed.items())]
  return hyper.product(parts)


def label_runs(hyper, protocol: str, amounts: Sequence[float] | None = None) -> list[dict]:
  """The labelled amounts of a table with their repetitions (§5.1, `hyper.label_efficiency`).

  Amounts the protocol does not list get `EXTRA_AMOUNT_RUNS` repetitions.
  """
  if amounts is None:
    return hyper.label_efficiency(protocol)
  known = hyper.PROTOCOLS[protocol]
  return hyper.chainit([
      hyper.label_efficiency(protocol, labels=[amount]) if amount in known.runs else
      hyper.product([hyper.sweep(known.label_key, [amount]), hyper.repeats(EXTRA_AMOUNT_RUNS)])
      for amount in amounts])


def finetune_sweep(hyper, rows: Sequence[list[dict]], labels: list[dict]) -> list[dict]:
  """Every row x every labelled run x the lr x wd grid (§5.1: best grid point per cell)."""
  return hyper.product([hyper.chainit(rows), labels, hyper.lr_wd_grid()])


def pretrain_run(hyper, sweep_name: str, **tags) -> str:
  """`<sweep name>/<run name>` of the run of an earlier stage's sweep that has these tags.

  A pure function of the tags: `experiments.sweep` names every work directory of a sweep
  `hyper.run_name(tags)` (run with `--workdir_root=<pretrain_root>/<sweep name>`), so `tags` must
  be all the tags of that run (e.g. `decoder_width=2` for `ddep_pretrain.py:sweep=main`).
  """
  return posixpath.join(sweep_name, hyper.run_name(tags))


def require_pretrain_root(arg: ml_collections.ConfigDict, config_file: str) -> None:
  """Fine-tuning sweeps that start from pretraining runs need to know where those live."""
  if not arg.pretrain_root:
    raise ValueError(
        f'{config_file}:sweep={arg.sweep} starts runs from pretraining runs: add '
        f'pretrain_root=<dir> to the config argument, the directory under which the earlier '
        f'sweeps ran (`python -m experiments.sweep --config=configs/ddep_pretrain.py:sweep=<name>'
        f' --workdir_root=<dir>/<name>`; see configs/ddep_pretrain.py).')


# ------------------------------------------------------------------------------------------------
# Sweeps of more than one dataset (Figs. 5, 6, 7, Tables 1, 3, 4, 6).
# ------------------------------------------------------------------------------------------------


def decoder_width_sweep(hyper, arg, config_file: str, protocol: str,
                        widths: Sequence[int]) -> list[dict]:
  """No pretraining / Supervised / DDeP at each decoder width (Fig. 6, Table 6, Fig. 7)."""
  require_pretrain_root(arg, config_file)
  rows = []
  for width in widths:
    ddep = pretrain_run(hyper, 'main', decoder_width=width)
    rows += [row(hyper, 'none', width), row(hyper, 'supervised', width),
             row(hyper, 'ddep', width, ddep)]
  return finetune_sweep(hyper, rows, label_runs(hyper, protocol))


def pretrain_variant_sweep(hyper, arg, config_file: str, protocol: str, sweep_name: str,
                           variants: Sequence[dict], amounts: Sequence[float] | None, *,
                           init: str = 'ddep', decoder_width: int = 1) -> list[dict]:
  """Fine-tuning from each of several runs of one pretraining sweep (Tables 1, 3, 4, Fig. 5).

  Each variant (the tags of a run of `sweep_name`, e.g. `dict(noise_type='simple')`) is a row,
  tagged by its `init_ckpt` (`<sweep>/<run name>`).
  """
  require_pretrain_root(arg, config_file)
  rows = [row(hyper, init, decoder_width, pretrain_run(hyper, sweep_name, **tags), tag_ckpt=True)
          for tags in variants]
  return finetune_sweep(hyper, rows, label_runs(hyper, protocol, amounts))


def noise_std_sweep(hyper, arg, config_file: str, protocol: str) -> list[dict]:
  """Fig. 5, left: DDeP with each noise magnitude, fine-tuned on 1 % of the labels."""
  return pretrain_variant_sweep(hyper, arg, config_file, protocol, 'noise_std',
                                [dict(noise_std=s) for s in paper.NOISE_STD_GRID], [0.01])


def noise_type_sweep(hyper, arg, config_file: str, protocol: str) -> list[dict]:
  """Fig. 5, right: simple (Eq. 1) vs scaled (Eq. 5) noise at 100, 10, 5 and 1 % labels."""
  return pretrain_variant_sweep(hyper, arg, config_file, protocol, 'noise_type',
                                [dict(noise_type='simple'), dict(noise_type='scaled')],
                                [1.0, 0.1, 0.05, 0.01])
