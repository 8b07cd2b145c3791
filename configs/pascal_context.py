r"""Stage 3 on Pascal Context: Table 6 / Fig. 1, Tables 3, 4 and 7, Fig. 5 (Pascal Context).

Fine-tunes the whole model with pixel cross-entropy on the 4998 train images (or a labelled
subset) of Pascal Context (59 classes, background ignored) and reports mIoU on the 5105 val
images. For the 60-class variant add `--config.input.dataset=pascal_context_60
--config.evals.val.dataset=pascal_context_60 --config.num_classes=60`.

Paper protocol (§5.1): Adam, cosine decay, lr and weight decay swept in [1e-5, 3e-4]; random
512x512 crops and left-right flips; evaluation with scales (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
and flips (Table 7: no multi-scale). The paper does not give the schedule or the inference
windows: we follow MMSegmentation's Pascal Context schedule (80k iterations, batch 16, random
rescale 0.5-2.0 of the stored image, which is the scale evaluated here, transformer warm-up of
1500 steps) and its sliding windows (512x512, stride 341) at the original image resolution.
Label amounts: 100 % (4998, 10 runs), 20 % (1000, 5), 10 % (500, 10), 5 % (250, 10), 1 % (50,
10); each run draws its own subset and model seed.

Arguments (`:k=v,...`):
  init=ddep            none | supervised | dep | ddep.
  decoder_width=1      1 or 3 (§4.3).
  init_ckpt=           the run to start from: a ddep_pretrain.py run (init=ddep), or a
                       supervised_imagenet21k.py run (init=supervised, instead of npz); absolute,
                       or relative to pretrain_root.
  pretrain_root=       where the pretraining sweeps ran (`<pretrain_root>/<sweep>/<run>`).
  npz=R50+ViT-B_16.npz the released ImageNet-21k encoder (init=supervised).
  label_fraction= | label_count=   labelled subset (default: all); subset_seed=0.
  model=transunet      or r50_unet (Table 7).   multiscale=True   scales 0.5 ... 1.75.
  sweep=table6         which paper sweep `get_sweep` expands (below).
  runlocal=False       one CPU step of the tiny twin model; data_dir=<TFDS data dir>.

Single runs (DDeP 3x on 5 % of the labels, 2nd subset; the supervised 1x baseline):

  python -m ddep_jax.main --config=configs/pascal_context.py:init=ddep,decoder_width=3,\
label_fraction=0.05,subset_seed=1,pretrain_root=$PRETRAIN,init_ckpt=main/decoder_width=3 \
      --workdir=$WORK/pascal_context/ddep_3x_5pc_1
  python -m ddep_jax.main \
      --config=configs/pascal_context.py:init=supervised,npz=$CKPT/R50+ViT-B_16.npz \
      --workdir=$WORK/pascal_context/supervised_1x_full

Sweeps (first run the pretraining sweeps they name, see configs/ddep_pretrain.py; tables with
`python -m experiments.collect_results --workdirs='$WORK/pascal_context/table6/*'
--out=$WORK/tables --name=table6 --row_key=init,decoder_width --col_key=label_fraction`, or
`--row_key=init_ckpt` for the sweeps whose rows are pretraining runs):

  sweep=table6 (pretraining sweep `main`): 6 rows x 45 label runs x 16 (lr, wd) = 4320.
  python -m experiments.sweep --config=configs/pascal_context.py:sweep=table6,\
pretrain_root=$PRETRAIN,npz=$CKPT/R50+ViT-B_16.npz --workdir_root=$WORK/pascal_context/table6

    Table 6 (1x rows = Fig. 1)    100 %    20 %    10 %    5 %    1 %
    No pretraining 1x             16.78    7.21    5.69    4.53    2.57
    Supervised 1x                 59.74   42.15   36.28   30.86   12.45
    DDeP 1x                       60.95   52.81   48.64   42.20   19.90
    No pretraining 3x             17.22    7.32    6.16    4.97    2.95
    Supervised 3x                 61.25   51.49   44.71   37.52   12.53
    DDeP 3x                       62.04   55.28   51.55   46.29   24.69

  sweep=table7 (ResNet-50 U-Net, no multi-scale; stage-1 sweep `supervised`, pretraining sweep
  `r50_unet`): 3 rows x 45 x 16 = 2160.
  python -m experiments.sweep --config=configs/pascal_context.py:sweep=table7,\
pretrain_root=$PRETRAIN --workdir_root=$WORK/pascal_context/table7

    Table 7 (R50 U-Net, 1x)       100 %    20 %    10 %    5 %    1 %
    No pretraining                19.01    8.46    6.72    5.30    2.73
    Supervised                    45.21   24.55   19.27   14.97    6.09
    DDeP                          46.07   30.38   26.39   21.12    9.63

  sweep=table3 (pretraining sweep `dataset`): 2 rows x 30 x 16 = 960.
  python -m experiments.sweep --config=configs/pascal_context.py:sweep=table3,\
pretrain_root=$PRETRAIN --workdir_root=$WORK/pascal_context/table3

    Table 3, decoder pretrained on   100 %    10 %     5 %
    Pascal VOC                       60.13    49.95    44.30
    ImageNet-21k                     60.57    50.61    45.13

  sweep=table4 (3x decoder; pretraining sweep `gamma`): 2 rows x 25 x 16 = 800.
  python -m experiments.sweep --config=configs/pascal_context.py:sweep=table4,\
pretrain_root=$PRETRAIN --workdir_root=$WORK/pascal_context/table4

    Table 4 (3x)                   100 % (4998)   20 % (1000)   10 % (500)
    DDeP gamma ~ U(0.9, 0.95)          59.71          52.53         49.23
    DDeP gamma = 0.95                  59.97          53.36         49.84

  sweep=fig5_noise_std (pretraining sweep `noise_std`): 6 rows x 10 x 16 = 960. Fig. 5 (left)
  plots mIoU at 1 % labels, averaged with ade20k.py's same sweep, against sigma: best at 0.22
  (on images in [-1, 1], as here; 0.44 here if the paper's images were in [0, 1]: both swept).
  python -m experiments.sweep --config=configs/pascal_context.py:sweep=fig5_noise_std,\
pretrain_root=$PRETRAIN --workdir_root=$WORK/pascal_context/fig5_noise_std

  sweep=fig5_noise_type (pretraining sweep `noise_type`): 2 rows x 40 x 16 = 1280.
  python -m experiments.sweep --config=configs/pascal_context.py:sweep=fig5_noise_type,\
pretrain_root=$PRETRAIN --workdir_root=$WORK/pascal_context/fig5_noise_type

    Fig. 5 (right)                 100 %    10 %     5 %     1 %
    Simple noise (Eq. 1)           59.64    44.70    39.14    18.05
    Scaled noise (Eq. 5)           60.00    48.27    41.93    19.69

Slices (global batches must be multiples of the device count; the trainer and the TPU launcher
check this before any step and print the override): train batch 16 and eval batch 16 run as is
on up to 16 devices, e.g. v4-32 (16 chips, 4 hosts), v5litepod-16 (16 chips, 4 hosts), v5p-32
(16 chips, 4 hosts), and on v4-8/16, v5litepod-4/8, v5p-8/16. On 32 devices and more pass
`--config.input.batch_size=<devices> --config.evals.val.batch_size=<devices>`.

CPU smoke run: `python -m ddep_jax.main --config=configs/pascal_context.py:init=none,\
runlocal=True,data_dir=$TFDS --workdir=/tmp/pascal_context_smoke`.
"""

from configs import stages

CONFIG_FILE = 'configs/pascal_context.py'


def _table7(hyper, arg):
  stages.require_pretrain_root(arg, CONFIG_FILE)
  supervised = stages.pretrain_run(hyper, stages.SUPERVISED_SWEEP, model='r50_unet')
  ddep = stages.pretrain_run(hyper, 'r50_unet', model='r50_unet')
  # "we train a standard U-Net with a ResNet50 encoder ... (without multi-scale evaluation)".
  fixed = dict(model='r50_unet', multiscale=False)
  rows = [stages.row(hyper, 'none', 1, **fixed),
          stages.row(hyper, 'supervised', 1, supervised, **fixed),
          stages.row(hyper, 'ddep', 1, ddep, **fixed)]
  return stages.finetune_sweep(hyper, rows, stages.label_runs(hyper, SETUP.protocol))


SWEEPS = {
    'table6': lambda hyper, arg: stages.decoder_width_sweep(
        hyper, arg, CONFIG_FILE, SETUP.protocol, widths=(1, 3)),
    'table3': lambda hyper, arg: stages.pretrain_variant_sweep(
        hyper, arg, CONFIG_FILE, SETUP.protocol, 'dataset',
        [dict(dataset=d) for d in ('voc2012_images', 'imagenet21k_fall11')], [1.0, 0.1, 0.05]),
    'table4': lambda hyper, arg: stages.pretrain_variant_sweep(
        hyper, arg, CONFIG_FILE, SETUP.protocol, 'gamma',
        [dict(gamma_range=(0.9, 0.95)), dict(gamma=0.95)], [1.0, 0.2, 0.1], decoder_width=3),
    'table7': _table7,
    'fig5_noise_std': lambda hyper, arg: stages.noise_std_sweep(
        hyper, arg, CONFIG_FILE, SETUP.protocol),
    'fig5_noise_type': lambda hyper, arg: stages.noise_type_sweep(
        hyper, arg, CONFIG_FILE, SETUP.protocol),
}
SETUP = stages.FinetuneSetup(
    dataset='pascal_context_59',
    protocol='pascal_context',
    batch_size=16,  # MMSegmentation's Pascal Context schedule: batch 16, 80k iterations.
    total_steps=80_000,
    eval_protocol=stages.SLIDING_512,
    eval_resize=None,  # Original resolution (at most 500 px: one window at scale 1).
    eval_batch_size=16,  # One image per device of a 16-device slice; results do not depend on it.
    multiscale=True,
    local_eval_resize=32,
    local_eval_protocol=stages.LOCAL_SLIDING,
    sweeps=SWEEPS,
)


def get_config(arg=None):
  """Fine-tuning on Pascal Context; see the module docstring for the arguments."""
  return stages.finetune_config(stages.finetune_arg(arg, SETUP), SETUP)


def get_sweep(hyper, arg=None):
  return stages.named_sweep(hyper, arg, SETUP)
