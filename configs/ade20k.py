r"""Stage 3 on ADE20K: Fig. 7, Table 3 and Fig. 5 (ADE20K).

Fine-tunes the whole TransUNet with pixel cross-entropy on the 20210 ADE20K (SceneParsing 150)
train images, or a labelled subset, and reports mIoU over the 150 classes on the 2000 val images.

Paper protocol (§5.1): Adam, cosine decay, lr and weight decay swept in [1e-5, 3e-4]; random
512x512 crops and left-right flips; evaluation with scales (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
and flips. The paper does not give the schedule or the evaluation resolution: we follow
MMSegmentation's ADE20K setup (160k iterations, batch 16, random rescale 0.5-2.0 of the
keep-ratio scale (2048, 512), transformer warm-up of 1500 steps; images resized to a short side
of 512 for evaluation, with 512x512 sliding windows at stride 341), so objects are trained at the
scale they are evaluated at. The metric is computed at that resolution. Label amounts: 100 %
(20210, 10 runs), 20 % (4042, 5), 10 % (2021, 10), 5 % (1010, 10), 1 % (202, 10).

Arguments (`:k=v,...`):
  init=ddep            none | supervised | dep | ddep.
  decoder_width=1      1 or 3 (§4.3).
  init_ckpt=           the run to start from: a ddep_pretrain.py run (init=ddep), or a
                       supervised_imagenet21k.py run (init=supervised, instead of npz); absolute,
                       or relative to pretrain_root.
  pretrain_root=       where the pretraining sweeps ran (`<pretrain_root>/<sweep>/<run>`).
  npz=R50+ViT-B_16.npz the released ImageNet-21k encoder (init=supervised).
  label_fraction= | label_count=   labelled subset (default: all); subset_seed=0.
  model=transunet      or r50_unet.      multiscale=True   scales 0.5 ... 1.75.
  sweep=fig7           which paper sweep `get_sweep` expands (below).
  runlocal=False       one CPU step of the tiny twin model; data_dir=<TFDS data dir>.

Single runs (DDeP 1x on 10 % of the labels; the supervised 3x baseline):

  python -m ddep_jax.main --config=configs/ade20k.py:init=ddep,label_fraction=0.1,\
pretrain_root=$PRETRAIN,init_ckpt=main/decoder_width=1 --workdir=$WORK/ade20k/ddep_1x_10pc_0
  python -m ddep_jax.main \
      --config=configs/ade20k.py:init=supervised,decoder_width=3,npz=$CKPT/R50+ViT-B_16.npz \
      --workdir=$WORK/ade20k/supervised_3x_full

Sweeps (first run the pretraining sweeps they name, see configs/ddep_pretrain.py; tables with
`python -m experiments.collect_results --workdirs='$WORK/ade20k/fig7/*' --out=$WORK/tables
--name=fig7 --row_key=init,decoder_width --col_key=label_fraction`):

  sweep=fig7 (pretraining sweep `main`): 6 rows x 45 label runs x 16 (lr, wd) = 4320.
  python -m experiments.sweep --config=configs/ade20k.py:sweep=fig7,\
pretrain_root=$PRETRAIN,npz=$CKPT/R50+ViT-B_16.npz --workdir_root=$WORK/ade20k/fig7

    Fig. 7, ADE20K val mIoU       100 %    20 %    10 %    5 %    1 %
    No pretraining 1x             19.43    5.26    4.07    2.80    1.87
    Supervised 1x                 48.92   40.77   23.05   10.84    5.14
    DDeP 1x                       49.96   42.76   35.75   27.29   10.77
    No pretraining 3x             16.67    5.88    4.20    2.91    1.90
    Supervised 3x                 49.60   41.65   33.04   16.40    5.31
    DDeP 3x                       50.88   43.26   39.01   32.30   16.30

  sweep=table3 (pretraining sweep `dataset`): 2 rows x 30 x 16 = 960.
  python -m experiments.sweep --config=configs/ade20k.py:sweep=table3,pretrain_root=$PRETRAIN \
      --workdir_root=$WORK/ade20k/table3

    Table 3, decoder pretrained on   100 %    10 %     5 %
    ADE20K                           48.92    36.14    28.49
    ImageNet-21k                     49.37    37.14    29.74

  sweep=fig5_noise_std (pretraining sweep `noise_std`): 6 rows x 10 x 16 = 960 (Fig. 5 left,
  1 % labels, averaged with pascal_context.py's same sweep: best sigma 0.22; our images are in
  [-1, 1], and the sigmas include 0.44, the paper's 0.22 if its images were in [0, 1]).
  python -m experiments.sweep --config=configs/ade20k.py:sweep=fig5_noise_std,\
pretrain_root=$PRETRAIN --workdir_root=$WORK/ade20k/fig5_noise_std

  sweep=fig5_noise_type (pretraining sweep `noise_type`): 2 rows x 40 x 16 = 1280.
  python -m experiments.sweep --config=configs/ade20k.py:sweep=fig5_noise_type,\
pretrain_root=$PRETRAIN --workdir_root=$WORK/ade20k/fig5_noise_type

    Fig. 5 (right)                 100 %    10 %     5 %     1 %
    Simple noise (Eq. 1)           48.88    34.21    24.07     9.17
    Scaled noise (Eq. 5)           48.97    34.99    26.86    10.80

Slices (global batches must be multiples of the device count; the trainer and the TPU launcher
check this before any step and print the override): train batch 16 and eval batch 16 run as is
on up to 16 devices, e.g. v4-32 (16 chips, 4 hosts), v5litepod-16 (16 chips, 4 hosts), v5p-32
(16 chips, 4 hosts), and on v4-8/16, v5litepod-4/8, v5p-8/16. On 32 devices and more pass
`--config.input.batch_size=<devices> --config.evals.val.batch_size=<devices>`.

CPU smoke run: `python -m ddep_jax.main --config=configs/ade20k.py:init=none,runlocal=True,\
data_dir=$TFDS --workdir=/tmp/ade20k_smoke`.
"""

from configs import stages

CONFIG_FILE = 'configs/ade20k.py'
SWEEPS = {
    'fig7': lambda hyper, arg: stages.decoder_width_sweep(
        hyper, arg, CONFIG_FILE, SETUP.protocol, widths=(1, 3)),
    'table3': lambda hyper, arg: stages.pretrain_variant_sweep(
        hyper, arg, CONFIG_FILE, SETUP.protocol, 'dataset',
        [dict(dataset=d) for d in ('ade20k', 'imagenet21k_fall11')], [1.0, 0.1, 0.05]),
    'fig5_noise_std': lambda hyper, arg: stages.noise_std_sweep(
        hyper, arg, CONFIG_FILE, SETUP.protocol),
    'fig5_noise_type': lambda hyper, arg: stages.noise_type_sweep(
        hyper, arg, CONFIG_FILE, SETUP.protocol),
}
SETUP = stages.FinetuneSetup(
    dataset='ade20k',
    protocol='ade20k',
    batch_size=16,  # MMSegmentation's ADE20K schedule: batch 16, 160k iterations.
    total_steps=160_000,
    eval_protocol=stages.SLIDING_512,
    eval_resize=512,  # Short side 512, as MMSegmentation's Resize(2048, 512, keep_ratio).
    eval_batch_size=16,  # One image per device of a 16-device slice; results do not depend on it.
    multiscale=True,
    local_eval_resize=32,
    local_eval_protocol=stages.LOCAL_SLIDING,
    sweeps=SWEEPS,
)


def get_config(arg=None):
  """Fine-tuning on ADE20K; see the module docstring for the arguments."""
  return stages.finetune_config(stages.finetune_arg(arg, SETUP), SETUP)


def get_sweep(hyper, arg=None):
  return stages.named_sweep(hyper, arg, SETUP)
