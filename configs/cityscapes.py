r"""Stage 3 on Cityscapes: Fig. 6 / Table 5, Tables 1, 2 and 3 (Cityscapes rows).

Fine-tunes the whole TransUNet with pixel cross-entropy on Cityscapes `train_fine` (all 2975
images or a labelled subset) and reports mIoU on `val_fine` (19 classes).

Paper protocol (§5.1): Adam, cosine decay, lr and weight decay swept in [1e-5, 3e-4]; random
1024x1024 crops and left-right flips; evaluation on the full 1024x2048 frames as two 1024x1024
halves, each averaged with its flip (`ddep_jax.inference.CITYSCAPES_HALVES`), no multi-scale.
The paper does not give the fine-tuning length, batch or warm-up: we follow MMSegmentation's
Cityscapes schedule (80k iterations, batch 8, random rescale 0.5-2.0) with its transformer
warm-up (1500 linear steps). Label amounts: full (2975, 10 runs), 1/4 (744, 4), 1/8 (372, 6),
1/30 (100, 10); each run draws its own subset (`subset_seed`) and model seed.

Arguments (`:k=v,...`):
  init=ddep            none | supervised | dep | ddep (the rows of Fig. 6).
  decoder_width=1      1 or 2 (§4.3).
  init_ckpt=           the run to start from: a ddep_pretrain.py run (init=ddep, init=dep), or a
                       supervised_imagenet21k.py run (init=supervised, instead of npz); absolute,
                       or relative to pretrain_root.
  pretrain_root=       where the pretraining sweeps ran (`<pretrain_root>/<sweep>/<run>`).
  npz=R50+ViT-B_16.npz the released ImageNet-21k encoder (init=supervised).
  label_count= | label_fraction=   labelled subset (default: all); subset_seed=0.
  model=transunet      or r50_unet.      multiscale=False   scales 0.5 ... 1.75 at evaluation.
  sweep=fig6           which paper sweep `get_sweep` expands (below).
  runlocal=False       one CPU step of the tiny twin model; data_dir=<TFDS data dir>.

Single runs (DDeP 2x decoder on 1/30 of the labels, 4th subset; the supervised baseline):

  python -m ddep_jax.main --config=configs/cityscapes.py:init=ddep,decoder_width=2,\
label_count=100,subset_seed=3,pretrain_root=$PRETRAIN,init_ckpt=main/decoder_width=2 \
      --workdir=$WORK/cityscapes/ddep_2x_100_3
  python -m ddep_jax.main \
      --config=configs/cityscapes.py:init=supervised,npz=$CKPT/R50+ViT-B_16.npz \
      --workdir=$WORK/cityscapes/supervised_1x_full

Sweeps (first run the pretraining sweeps they name, see configs/ddep_pretrain.py; then
`python -m experiments.collect_results --workdirs='$WORK/cityscapes/fig6/*' --out=$WORK/tables
--name=fig6 --row_key=init,decoder_width --col_key=label_count` makes the table):

  sweep=fig6 (pretraining sweeps `main`, `dep`): 7 rows x 30 label runs x 16 (lr, wd) = 3360.
  python -m experiments.sweep --config=configs/cityscapes.py:sweep=fig6,\
pretrain_root=$PRETRAIN,npz=$CKPT/R50+ViT-B_16.npz --workdir_root=$WORK/cityscapes/fig6

    Fig. 6, Cityscapes val mIoU   full (2975)  1/4 (744)  1/8 (372)  1/30 (100)
    No pretraining 1x                 63.47      39.63      34.74       25.79
    Supervised 1x                     80.36      75.55      72.56       54.72
    DeP 1x                            79.07      74.68      70.36       61.79
    DDeP 1x                           80.72      76.38      73.21       64.48
    No pretraining 2x                 62.25      37.72      33.73       24.93
    Supervised 2x                     80.50      75.57      72.84       60.36
    DDeP 2x (= Table 5, "Ours")       80.91      76.86      73.81       64.75

  sweep=table1 (pretraining sweep `dep`, simple noise): 2 rows x 30 x 16 = 960.
  python -m experiments.sweep --config=configs/cityscapes.py:sweep=table1,\
pretrain_root=$PRETRAIN --workdir_root=$WORK/cityscapes/table1

    Table 1 (DeP target)          full (2975)  1/4 (744)  1/8 (372)  1/30 (100)
    Predict x (image)                 70.44      60.87      55.44       41.40
    Predict eps (noise)               75.01      67.26      61.94       48.36

  sweep=table2 (pretraining sweep `dep`: simple noise, sigma 0.8, predicting the noise):
  3 rows x 34 label runs x 16 = 1632. The paper's columns are 2975, 744, 60 and 30 images; it
  gives no repetitions for 60 and 30, which get 10.
  python -m experiments.sweep --config=configs/cityscapes.py:sweep=table2,\
pretrain_root=$PRETRAIN,npz=$CKPT/R50+ViT-B_16.npz --workdir_root=$WORK/cityscapes/table2

    Table 2                         2975      744       60       30
    No pretraining                  63.47     39.63     21.23    18.52
    Supervised                      80.36     75.55     41.33    35.51
    Denoising pretraining (DeP)     77.14     68.87     42.79    37.55

  sweep=table3 (pretraining sweep `dataset`): 2 rows x 26 label runs x 16 = 832. The paper
  labels the columns 100 %, 10 %, 5 %; its "10 %" DDeP number equals Fig. 6's 1/8 (372 images),
  so we use 2975, 372 and 149 (5 %, 10 runs).
  python -m experiments.sweep --config=configs/cityscapes.py:sweep=table3,\
pretrain_root=$PRETRAIN --workdir_root=$WORK/cityscapes/table3

    Table 3, decoder pretrained on       100 %    10 %     5 %
    Cityscapes (fine & coarse)           80.53    72.67    62.23
    ImageNet-21k                         80.72    73.21    66.51

Slices (global batches must be multiples of the device count; the trainer and the TPU launcher
check this before any step and print the override): train batch 8 (MMSegmentation's schedule)
and eval batch 16 run as is on up to 8 devices: v4-8/16, v5litepod-4/8, v5p-8/16. On the
16-device slices v4-32, v5litepod-16 and v5p-32 (4 hosts each) pass
`--config.input.batch_size=16`, which doubles the schedule's batch (keep lr and steps, or halve
total_steps for the same epochs); on 32 devices and more raise both batches to the device count.

CPU smoke run: `python -m ddep_jax.main --config=configs/cityscapes.py:init=none,runlocal=True,\
data_dir=$TFDS --workdir=/tmp/cityscapes_smoke`.
"""

from configs import stages
from ddep_jax import inference

CONFIG_FILE = 'configs/cityscapes.py'
TABLE2_COUNTS = (2975, 744, 60, 30)
TABLE3_COUNTS = (2975, 372, 149)


def _dep_run(hyper, predict_target='noise', noise_type='simple'):
  return stages.pretrain_run(hyper, 'dep', noise_type=noise_type, predict_target=predict_target)


def _fig6(hyper, arg):
  dep = stages.row(hyper, 'dep', 1, _dep_run(hyper, noise_type='scaled'))
  return hyper.chainit([
      stages.decoder_width_sweep(hyper, arg, CONFIG_FILE, SETUP.protocol, widths=(1, 2)),
      stages.finetune_sweep(hyper, [dep], stages.label_runs(hyper, SETUP.protocol)),
  ])


def _table1(hyper, arg):
  return stages.pretrain_variant_sweep(
      hyper, arg, CONFIG_FILE, SETUP.protocol, 'dep',
      [dict(noise_type='simple', predict_target=t) for t in ('image', 'noise')], None, init='dep')


def _table2(hyper, arg):
  stages.require_pretrain_root(arg, CONFIG_FILE)
  rows = [stages.row(hyper, 'none', 1), stages.row(hyper, 'supervised', 1),
          stages.row(hyper, 'dep', 1, _dep_run(hyper))]
  return stages.finetune_sweep(hyper, rows,
                               stages.label_runs(hyper, SETUP.protocol, TABLE2_COUNTS))


def _table3(hyper, arg):
  return stages.pretrain_variant_sweep(
      hyper, arg, CONFIG_FILE, SETUP.protocol, 'dataset',
      [dict(dataset=d) for d in ('cityscapes_fine_coarse', 'imagenet21k_fall11')], TABLE3_COUNTS)


SWEEPS = {'fig6': _fig6, 'table1': _table1, 'table2': _table2, 'table3': _table3}
SETUP = stages.FinetuneSetup(
    dataset='cityscapes',
    protocol='cityscapes',
    batch_size=8,  # MMSegmentation's Cityscapes schedule: batch 8, 80k iterations.
    total_steps=80_000,
    eval_protocol=dict(inference.CITYSCAPES_HALVES),
    eval_resize=None,  # The full 1024x2048 frames.
    eval_batch_size=16,  # One image per device of a 16-device slice; results do not depend on it.
    multiscale=False,  # §5.2: "we do not perform evaluation at multiple scales on Cityscapes".
    local_eval_resize=(32, 64),  # The halves protocol in miniature: two 32x32 windows.
    local_eval_protocol=dict(mode='sliding', crop_size=(32, 32), stride=(32, 32), flip=True),
    local_scale_range=(0.02, 0.04),
    sweeps=SWEEPS,
)


def get_config(arg=None):
  """Fine-tuning on Cityscapes; see the module docstring for the arguments."""
  return stages.finetune_config(stages.finetune_arg(arg, SETUP), SETUP)


def get_sweep(hyper, arg=None):
  return stages.named_sweep(hyper, arg, SETUP)
