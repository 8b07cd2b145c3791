r"""Stage 2: decoder denoising pretraining (DDeP, §4) and denoising pretraining (DeP, §3).

DDeP: the encoder stays frozen at its supervised ImageNet-21k weights and only the decoder learns
to predict the noise added to unlabelled images, Eq. 6:
`|| g(f(sqrt(gamma) x + sqrt(1 - gamma) eps)) - eps ||^2`, gamma = 1 / (1 + sigma^2).
DeP (`dep=True`): the whole model, randomly initialised, trained the same way.

Paper settings (§5.1): batch 512, 100 epochs, 224x224 (inception crops and flips), Adam, cosine
decay; lr 6e-5 for the 1x and 3x decoders, 1e-4 for the 2x; scaled noise with sigma = 0.22
(Fig. 5); predicting the noise (Table 1). Images are in [-1, 1] (what the ImageNet-21k encoder
expects), so sigma = 0.22 is applied to [-1, 1] images. The paper never states its range; its
Fig. 4 clips noisy images to [0, 1], where the same noise would read sigma = 0.11 (and the paper's
0.22, if meant on [0, 1] images, is our 0.44): the `noise_std` sweep holds 0.11, 0.22 and 0.44.
DeP as in Table 2: sigma 0.8 (the default with dep=True), all Cityscapes images (we take train +
test and keep validation for evaluation), 6000 epochs. The paper gives no warm-up,
weight decay or DeP learning rate: we use 1000 warm-up steps, no decay, and the DDeP rate.

Single run (the 1x DDeP decoder of Fig. 6 / Table 6 / Fig. 7):

  python -m ddep_jax.main \
      --config=configs/ddep_pretrain.py:decoder_width=1,npz=$CKPT/R50+ViT-B_16.npz \
      --workdir=$PRETRAIN/main/decoder_width=1

Sweeps. Run each with `--workdir_root=$PRETRAIN/<sweep>`: the fine-tuning configs
(`cityscapes.py`, `pascal_context.py`, `ade20k.py`) find the runs there from
`pretrain_root=$PRETRAIN`. Which paper results each one feeds:

  sweep       runs                                             used by
  main        DDeP on ImageNet-21k, decoder_width 1, 2, 3      Fig. 6, Tables 5, 6, Fig. 7
  dep         DeP on Cityscapes, sigma 0.8: simple noise        Table 1 (both), Table 2 (noise),
              predicting image / noise, scaled noise           Fig. 6 DeP row (scaled)
  noise_std   DDeP 1x, scaled sigma in paper.NOISE_STD_GRID    Fig. 5 left (1 % labels)
  noise_type  DDeP 1x, simple vs scaled noise, sigma 0.22       Fig. 5 right
  dataset     DDeP 1x on ImageNet-21k, VOC 2012, ADE20K,        Table 3
              Cityscapes fine + coarse
  gamma       DDeP 3x, gamma = 0.95 vs gamma ~ U(0.9, 0.95)     Table 4
  r50_unet    DDeP on the ResNet-50 U-Net (encoder from         Table 7
              supervised_imagenet21k.py:model=r50_unet)

  python -m experiments.sweep \
      --config=configs/ddep_pretrain.py:sweep=main,npz=$CKPT/R50+ViT-B_16.npz \
      --workdir_root=$PRETRAIN/main
  python -m experiments.sweep --config=configs/ddep_pretrain.py:sweep=dep \
      --workdir_root=$PRETRAIN/dep
  python -m experiments.sweep \
      --config=configs/ddep_pretrain.py:sweep=noise_std,npz=$CKPT/R50+ViT-B_16.npz \
      --workdir_root=$PRETRAIN/noise_std
  python -m experiments.sweep \
      --config=configs/ddep_pretrain.py:sweep=noise_type,npz=$CKPT/R50+ViT-B_16.npz \
      --workdir_root=$PRETRAIN/noise_type
  python -m experiments.sweep \
      --config=configs/ddep_pretrain.py:sweep=dataset,npz=$CKPT/R50+ViT-B_16.npz \
      --workdir_root=$PRETRAIN/dataset
  python -m experiments.sweep \
      --config=configs/ddep_pretrain.py:sweep=gamma,npz=$CKPT/R50+ViT-B_16.npz \
      --workdir_root=$PRETRAIN/gamma
  python -m experiments.sweep \
      --config=configs/ddep_pretrain.py:sweep=r50_unet,pretrain_root=$PRETRAIN \
      --workdir_root=$PRETRAIN/r50_unet

Slices: train batch 512 and eval batch 256 run as is on any slice of up to 256 devices whose
count divides 256, e.g. v4-32, v5litepod-16, v5p-32 (16 devices each) up to v4-512 / v5p-512.

The 2x / 3x decoders on many devices: `--config.mesh="(('data', -1), ('fsdp', 4))"
--config.sharding_rules="(('decoder/.*', 'fsdp'), ('.*', 'replicate'))"`; bfloat16 compute:
`--config.model.dtype=bfloat16`.

Arguments (`:k=v,...`; tuples as `a+b`):
  decoder_width=1          1, 2 or 3 (§4.3); sets the paper's lr.
  dep=False                True: DeP, the whole model from scratch (default dataset cityscapes).
  dataset=                 registry name; default imagenet21k_fall11 (DDeP) / cityscapes (DeP).
  noise_type=scaled        scaled (Eq. 5/6) or simple (Eq. 1).
  noise_std=0.22           sigma on [-1, 1] images (dep=True: 0.8, Table 2); or instead
                           gamma=0.95, or gamma_range=0.9+0.95 (Table 4).
  predict_target=noise     noise (Eq. 3/6) or image (Eq. 2).
  noise_conditioning=False condition the decoder on gamma (§4.4).
  model=transunet          or r50_unet (Table 7), whose encoder comes from encoder_ckpt.
  npz=R50+ViT-B_16.npz     the released ImageNet-21k encoder (DDeP with the TransUNet).
  encoder_ckpt=            a supervised_imagenet21k.py run to take the encoder from instead
                           (relative paths are under pretrain_root).
  sweep=main               which sweep `get_sweep` expands (table above).
  runlocal=False           one CPU step of the tiny twin model; data_dir=<TFDS data dir>.
"""

from configs import common
from configs import paper
from configs import stages
from ddep_jax import objectives
from ddep_jax.data import datasets

WARMUP_STEPS = 1000

# Dataset -> (train split, split of the denoising-loss evaluation). ImageNet-21k and the VOC
# images have a single split: the evaluation then only monitors the fit on seen images.
SPLITS = {
    'imagenet21k_fall11': ('train', 'train[:10000]'),
    'imagenet21k_winter21': ('train', 'train[:10000]'),
    'cityscapes': ('train+test', 'validation'),
    'cityscapes_fine_coarse': ('train+train_extra', 'validation'),
    'ade20k': ('train', 'validation'),
    'voc2012_images': ('train', 'train[:1000]'),
}
DEFAULT_SPLITS = ('train', 'train[:1000]')


def _sweep_main(hyper):
  return hyper.sweep('arg.decoder_width', [1, 2, 3])


def _sweep_dep(hyper):
  return hyper.product([
      hyper.fixed('arg.dep', True),
      hyper.fixed('arg.noise_std', paper.DEP_NOISE_STD),
      hyper.chainit([
          hyper.product([hyper.sweep('arg.noise_type', ['simple']),
                         hyper.sweep('arg.predict_target', ['image', 'noise'])]),
          hyper.product([hyper.sweep('arg.noise_type', ['scaled']),
                         hyper.sweep('arg.predict_target', ['noise'])]),
      ]),
  ])


def _sweep_gamma(hyper):
  return hyper.product([
      hyper.fixed('arg.decoder_width', 3),
      hyper.chainit([hyper.sweep('arg.gamma', [0.95]),
                     hyper.sweep('arg.gamma_range', [(0.9, 0.95)])]),
  ])


def _sweep_r50_unet(hyper):
  encoder = stages.pretrain_run(hyper, stages.SUPERVISED_SWEEP, model='r50_unet')
  return hyper.product([hyper.sweep('arg.model', ['r50_unet']),
                        hyper.fixed('arg.encoder_ckpt', encoder)])


SWEEPS = {
    'main': _sweep_main,
    'dep': _sweep_dep,
    'noise_std': lambda hyper: hyper.sweep('arg.noise_std', paper.NOISE_STD_GRID),
    'noise_type': lambda hyper: hyper.sweep('arg.noise_type', ['simple', 'scaled']),
    'dataset': lambda hyper: hyper.sweep('arg.dataset', paper.TABLE3_DATASETS),
    'gamma': _sweep_gamma,
    'r50_unet': _sweep_r50_unet,
}


def _parse(arg):
  arg = common.parse_arg(
      arg, decoder_width=1, dep=False, dataset='', noise_type='scaled', noise_std=None,
      gamma=None, gamma_range=None, predict_target='noise', noise_conditioning=False,
      model='transunet', npz=paper.RELEASED_ENCODER, encoder_ckpt='', pretrain_root='',
      sweep='main', runlocal=False, data_dir='')
  stages.check_choice('sweep', arg.sweep, tuple(SWEEPS))
  return arg


def get_config(arg=None):
  """Denoising pretraining of the decoder (DDeP) or of the whole model (DeP)."""
  arg = _parse(arg)
  config = common.get_base_config()
  config.task = 'denoise'
  config.model = stages.model_config(arg.model, arg.decoder_width, runlocal=arg.runlocal,
                                     noise_conditioning=arg.noise_conditioning)

  dataset = arg.dataset or ('cityscapes' if arg.dep else 'imagenet21k_fall11')
  datasets.get_spec(dataset)  # An unknown name fails here, listing the known ones.
  train_split, eval_split = SPLITS.get(dataset, DEFAULT_SPLITS)
  data_dir = arg.data_dir or None
  config.input.dataset = dataset
  config.input.split = train_split
  config.input.batch_size = 512  # crop_size None: 224x224 (§5.1).
  config.input.data_dir = data_dir

  denoising = config.denoising
  denoising.noise_type = arg.noise_type
  denoising.predict_target = arg.predict_target
  by_gamma = arg.gamma is not None or arg.gamma_range is not None
  # Table 2 (DeP) / Fig. 5 (DDeP).
  default_std = paper.DEP_NOISE_STD if arg.dep else paper.NOISE_STD
  denoising.noise_std = arg.noise_std if (arg.noise_std is not None or by_gamma) else default_std
  denoising.gamma = arg.gamma
  denoising.gamma_range = None if arg.gamma_range is None else tuple(arg.gamma_range)
  objectives.check_denoising_config(denoising)

  config.optimizer.name = 'adam'
  config.lr = paper.DDEP_LEARNING_RATES.get(arg.decoder_width, paper.DDEP_LEARNING_RATES[1])
  config.wd = 0.0
  schedule = dict(decay_type='cosine', warmup_steps=WARMUP_STEPS)
  # DDeP (§4): the encoder is frozen, so only the decoder (and head) learn; DeP trains all.
  config.schedule = (('.*', schedule),) if arg.dep else (('encoder/.*', None), ('.*', schedule))
  config.total_epochs = paper.DEP_EPOCHS if arg.dep else paper.DDEP_EPOCHS
  config.total_steps = 0
  config.checkpoint_every_steps = 5000
  config.keep_checkpoints = 2
  _set_encoder_init(config, arg)

  config.evals.val = common.eval_config(dataset, eval_split, batch_size=256, every_steps=10_000,
                                        data_dir=data_dir)
  if arg.runlocal:
    stages.runlocal(config)
    config.evals.val.resize = stages.LOCAL_CROP_SIZE[0]
  config.lock()
  return config


def _set_encoder_init(config, arg):
  encoder_ckpt = stages.resolve_path(arg.encoder_ckpt, arg.pretrain_root)
  if arg.dep:
    if encoder_ckpt:
      raise ValueError('dep=True trains the whole model from a random initialisation (§3); '
                       f'drop encoder_ckpt={encoder_ckpt!r}, or use dep=False (DDeP).')
    return
  if encoder_ckpt:
    config.init_from.checkpoint = encoder_ckpt
    config.init_from.params = ('encoder/.*',)
  elif arg.model == 'r50_unet':
    raise ValueError('DDeP with model=r50_unet needs encoder_ckpt=<work directory of a '
                     'configs/supervised_imagenet21k.py:model=r50_unet run> (no released '
                     'checkpoint has this encoder).')
  else:
    config.init_from.npz = arg.npz


def sweep_runs(hyper, name):
  """The runs of the stage-2 sweep `name` (see the module docstring)."""
  stages.check_choice('sweep', name, tuple(SWEEPS))
  return SWEEPS[name](hyper)


def get_sweep(hyper, arg=None):
  arg = _parse(arg)
  if arg.sweep == 'r50_unet' and not arg.pretrain_root:
    raise ValueError('configs/ddep_pretrain.py:sweep=r50_unet takes its encoder from the '
                     'supervised_imagenet21k.py run under <pretrain_root>/supervised: add '
                     'pretrain_root=<dir> to the config argument.')
  return sweep_runs(hyper, arg.sweep)
