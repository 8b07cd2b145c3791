"""The paper's numbers, in one place: every config file reads them from here.

Brempong et al., 2022, *Decoder Denoising Pretraining for Semantic Segmentation*; § numbers,
tables and figures are the paper's. A leaf module: it imports nothing.
"""

# Fine-tuning initialisations (Fig. 6 rows): random; ImageNet-21k encoder; denoising-pretrained
# encoder + decoder (§3); supervised encoder + denoising-pretrained decoder (§4).
INITS = ('none', 'supervised', 'dep', 'ddep')
# The released ImageNet-21k encoder of TransUNet / vision_transformer (gs://vit_models/imagenet21k).
RELEASED_ENCODER = 'R50+ViT-B_16.npz'

# -- Stage 3: fine-tuning ----------------------------------------------------------------------
# §5.1: "Adam ... cosine learning rate decay". The paper gives no warm-up; MMSegmentation's
# transformer schedules warm up linearly over the first 1500 iterations.
FINETUNE_WARMUP_STEPS = 1500
# Single runs: one point of the grid that the sweeps search (§5.1: lr and wd in [1e-5, 3e-4]).
FINETUNE_LR = 1e-4
FINETUNE_WD = 1e-4

# -- Stage 2: denoising pretraining (configs/ddep_pretrain.py) --------------------------------
# §5.1: "The learning rate is 6e-5 for the 1x and 3x width decoders, and 1e-4 for the 2x".
DDEP_LEARNING_RATES = {1: 6e-5, 2: 1e-4, 3: 6e-5}
NOISE_STD = 0.22  # §4.1, Fig. 5: the best sigma for scaled noise.
DEP_NOISE_STD = 0.8  # Table 2.
DDEP_EPOCHS = 100.0  # §5.1.
DEP_EPOCHS = 6000.0  # Table 2.
# Fig. 5 (left) gives no sigmas, nor the paper its image range: 0.22 on [-1, 1], its [0, 1]
# readings 0.44 and 0.11 (configs/ddep_pretrain.py), and Table 2's 0.8.
NOISE_STD_GRID = (0.11, 0.15, 0.22, 0.3, 0.44, 0.8)
# Table 3: decoder pretraining on ImageNet-21k vs on images of (or close to) each target dataset.
TABLE3_DATASETS = ('imagenet21k_fall11', 'voc2012_images', 'ade20k', 'cityscapes_fine_coarse')
