r"""Stage 1: supervised ImageNet-21k pretraining of the encoder (Fig. 1, left: "First, we train
the encoder as a supervised classifier").

For the TransUNet you do not need to run this: the paper's encoder is the released R50+ViT-B/16
ImageNet-21k classifier (`gsutil cp gs://vit_models/imagenet21k/R50+ViT-B_16.npz .`), which
`ddep_pretrain.py` and the fine-tuning configs load with `npz=<path>`. This config reproduces
how that checkpoint was trained, and trains the ResNet-50 encoder of Table 7's U-Net, for which
no checkpoint in this layout is released:

  python -m ddep_jax.main --config=configs/supervised_imagenet21k.py:model=r50_unet \
      --workdir=$PRETRAIN/supervised/model=r50_unet

or, as a sweep that puts the runs where the later stages look for them (`pretrain_root`):

  python -m experiments.sweep --config=configs/supervised_imagenet21k.py \
      --workdir_root=$PRETRAIN/supervised --only='model=r50_unet'

Slices: train batch 4096 and eval batch 1024 run as is on any slice of up to 1024 devices whose
count divides 1024 (v4-32, v5litepod-16 and v5p-32 included).

Arguments (`:k=v,...`):
  model=transunet|r50_unet   R50+ViT-B/16 classifier (class token, 768-d `pre_logits`, as the
                             released file) or the ResNet-50 (global average pool).
  dataset=imagenet21k_fall11 any classification dataset of the registry (`imagenet21k_winter21`).
  runlocal=False             one step of the tiny twin model on CPU; data_dir=<TFDS data dir>.

Recipe (not the DDeP paper's; it uses released weights): ViT paper (Dosovitskiy et al. 2021,
App. B.1 and Table 3, ImageNet-21k rows): Adam (0.9, 0.999), batch 4096, lr 1e-3 with 10k linear
warm-up steps then linear decay, weight decay 0.03, dropout 0.1, gradient clipping at norm 1,
90 epochs at 224x224 with inception crops and flips. The original Flax optimizer multiplied the
weight decay by the learning rate; our decoupled decay (`ddep_jax.optimizer`, 'adamw') is
therefore 1e-3 * 0.03 = 3e-5. Loss: sigmoid cross-entropy, as big_vision's ImageNet-21k configs
(the labels are not mutually exclusive). The first 25,600 images are held out for evaluation
(big_vision holds out `full[:51200]`), since ImageNet-21k has a single split.

Target: the released checkpoint; its quality shows downstream as the "Supervised" rows of
Fig. 6 and Tables 2, 6, 7 (e.g. Cityscapes full 80.36 mIoU, Pascal Context 100 % 59.74).
"""

from configs import common
from configs import stages
from ddep_jax.data import datasets

HOLDOUT = 25_600  # Evaluation images cut off the front of the single ImageNet-21k split.
LOCAL_HOLDOUT = 2


def _parse(arg):
  arg = common.parse_arg(arg, model='transunet', dataset='imagenet21k_fall11', runlocal=False,
                         data_dir='')
  stages.check_choice('model', arg.model, tuple(stages.MODEL_PRESETS))
  return arg


def get_config(arg=None):
  """Supervised classification pretraining of the encoder on ImageNet-21k."""
  arg = _parse(arg)
  spec = datasets.get_spec(arg.dataset)
  if spec.kind != datasets.CLASSIFICATION or spec.num_classes is None:
    raise ValueError(f'Config argument dataset={arg.dataset!r}: supervised pretraining needs a '
                     f'classification dataset with known classes, e.g. imagenet21k_fall11.')
  config = common.get_base_config()
  config.task = 'classify'
  config.num_classes = spec.num_classes
  config.model = stages.model_config(arg.model, 1, runlocal=arg.runlocal)
  if arg.model == 'transunet':
    # vision_transformer's ImageNet-21k classifiers have a `pre_logits` layer of the hidden size.
    config.model.encoder.representation_size = config.model.encoder.hidden_size
  config.classification_loss = 'sigmoid'

  holdout = LOCAL_HOLDOUT if arg.runlocal else HOLDOUT
  data_dir = arg.data_dir or None
  config.input.dataset = arg.dataset
  config.input.split = f'train[{holdout}:]'
  config.input.batch_size = 4096
  config.input.data_dir = data_dir  # crop_size None: 224x224 inception crops + flips.

  config.optimizer.name = 'adamw'
  config.lr = 1e-3
  config.wd = 3e-5
  config.grad_clip_norm = 1.0
  config.schedule = (('.*', dict(decay_type='linear', warmup_steps=10_000)),)
  config.total_epochs = 90.0
  config.total_steps = 0
  config.checkpoint_every_steps = 5000
  config.keep_checkpoints = 2

  config.evals.val = common.eval_config(arg.dataset, f'train[:{holdout}]', batch_size=1024,
                                        every_steps=10_000, data_dir=data_dir)
  if arg.runlocal:
    stages.runlocal(config)
    config.evals.val.split = f'train[:{holdout}]'
    config.evals.val.resize = stages.LOCAL_CROP_SIZE[0]
  config.lock()
  return config


def sweep_runs(hyper, name=stages.SUPERVISED_SWEEP):
  """The stage-1 runs: one per encoder (the TransUNet one only reproduces the released file)."""
  if name != stages.SUPERVISED_SWEEP:
    raise ValueError(f'supervised_imagenet21k.py has one sweep, {stages.SUPERVISED_SWEEP!r}; '
                     f'got {name!r}.')
  return hyper.sweep('arg.model', ['r50_unet', 'transunet'])


def get_sweep(hyper, arg=None):
  _parse(arg)
  return sweep_runs(hyper)
