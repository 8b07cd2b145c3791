"""Whole models: encoder + decoder + head (TransUNet, ResNet-50 U-Net) and encoder + classifier.

    model = build_model(config.model, task='segment', num_classes=19)
    variables = model.init({'params': key, 'dropout': key}, images, train=False)
    out, aux = model.apply(variables, images, train=True, encoder_train=False,
                           noise_level=gamma, rngs={'dropout': key})

The parameter tree is split at the top into `encoder`, `decoder` (dense tasks only) and `head`;
only `head` depends on the task and the number of classes.

The TransUNet's decoder follows its encoder's output stride (ResNet stem and stages x patch size:
`2 ** (1 + len(encoder.resnet.num_layers)) * patch_size`, or `patch_size` for a pure ViT): one
stage at the token map's scale, then one per x2 upsampling, each fed the encoder feature of its
scale. `decoder.base_widths` needs one width per stage; `get_config(name, output_stride=s)`
derives the encoder and widths from a preset.

Hybrids with patch (1, 1), stage 0 on the token map:

| stride | ResNet stages | decoder stages (skip) | 1x base_widths |
|---|---|---|---|
| 16 | 3 (paper) | 1/16, 1/8 (block2), 1/4 (block1), 1/2 (stem), 1/1 | (1024, 512, 256, 128, 64) |
| 8 | 2 | 1/8, 1/4 (block1), 1/2 (stem), 1/1 | (512, 256, 128, 64) |
| 4 | 1 | 1/4, 1/2 (stem), 1/1 | (256, 128, 64) |

A hybrid with a larger patch (e.g. 2 stages and patch 2, stride 16) gets the skips of the
scales its ResNet reaches; a pure ViT gets none. The ResNet-50 U-Net always has five stages
(block4 @1/32 enters the 1/16 stage upsampled, with block3).
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from ddep_jax import constants
from ddep_jax.models import decoder as decoder_lib
from ddep_jax.models import heads
from ddep_jax.models import resnet
from ddep_jax.models import vit

MODEL_NAMES = ('transunet', 'r50_unet')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
REMAT_POLICIES = ('none', 'encoder', 'decoder', 'all')


class UNet(nn.Module):
  """Encoder -> U-Net decoder -> per-pixel head. The TransUNet with a `ViTEncoder`."""

  encoder: nn.Module
  decoder: nn.Module
  head: nn.Module

  def __call__(self, images, *, train: bool, encoder_train: Optional[bool] = None,
               noise_level=None):
    """Returns `(out [B, H, W, C] float32, aux)`; see the module docstring."""
    encoder_train = train if encoder_train is None else encoder_train
    x, skips, aux = self.encoder(images, train=encoder_train)
    features = self.decoder(x, skips, noise_level=noise_level)
    if features.shape[1:3] != images.shape[1:3]:
      raise ValueError(f'The decoder output is {features.shape[1]}x{features.shape[2]} for a '
                       f'{images.shape[1]}x{images.shape[2]} input: the decoder needs one stage '
                       f'per x2 upsampling of the encoder output stride (check '
                       f'model.encoder.patch_size, resnet.num_layers and decoder.base_widths).')
    aux['decoder'] = features
    return self.head(features), aux


class Classifier(nn.Module):
  """Encoder -> class-token output -> optional `pre_logits` -> `head` (vision_transformer)."""

  encoder: nn.Module
  head: nn.Module

  def __call__(self, images, *, train: bool, encoder_train: Optional[bool] = None,
               noise_level=None):
    """Returns `(logits [B, num_classes] float32, aux)`; `noise_level` is unused."""
    del noise_level
    encoder_train = train if encoder_train is None else encoder_train
    _, _, aux = self.encoder(images, train=encoder_train)
    logits, aux['pre_logits'] = self.head(aux['encoded'])
    return logits, aux


def build_encoder(model_config: ml_collections.ConfigDict) -> nn.Module:
  """Returns the encoder module of `model_config` (unbound)."""
  enc = model_config.encoder
  dtype = _dtype(model_config)
  if model_config.name == 'transunet':
    return vit.ViTEncoder(
        hidden_size=enc.hidden_size, num_layers=enc.num_layers, num_heads=enc.num_heads,
        mlp_dim=enc.mlp_dim, patch_size=tuple(enc.patch_size),
        resnet_num_layers=tuple(enc.resnet.num_layers),
        resnet_width_factor=enc.resnet.width_factor, dropout_rate=enc.dropout_rate,
        attention_dropout_rate=enc.attention_dropout_rate, classifier=enc.classifier,
        dtype=dtype, remat=_remat(model_config, 'encoder'),
        attention_implementation=enc.attention_implementation)
  if model_config.name == 'r50_unet':
    return resnet.ResNetEncoder(num_layers=tuple(enc.resnet.num_layers),
                                width_factor=enc.resnet.width_factor, dtype=dtype,
                                remat=_remat(model_config, 'encoder'))
  raise ValueError(f'model.name must be one of {MODEL_NAMES}; got {model_config.name!r}.')


def build_model(model_config: ml_collections.ConfigDict, *, task: str,
                num_classes: Optional[int] = None) -> nn.Module:
  """Builds the model for `task` in ('classify', 'denoise', 'segment').

  Args:
    model_config: the `config.model` section (`presets.default_config()` / `get_config()`).
    task: 'denoise' -> `[B, H, W, 3]`; 'segment' -> `[B, H, W, num_classes]` logits;
      'classify' -> `[B, num_classes]` logits from the encoder alone (no decoder).
    num_classes: classes of the segmentation / classification head; ignored for 'denoise'.

  Returns:
    An unbound `flax.linen.Module` called as `model.apply(variables, images, train=...,
    encoder_train=None, noise_level=None, rngs=...)` -> `(out float32, aux)`.
  """
  if task not in constants.TASKS:
    raise ValueError(f'task must be one of {constants.TASKS}; got {task!r}.')
  if task != 'denoise' and (not isinstance(num_classes, int) or num_classes < 1):
    raise ValueError(f'task={task!r} needs num_classes >= 1 (the head width); got {num_classes!r}.')
  dtype = _dtype(model_config)
  encoder = build_encoder(model_config)
  if task == 'classify':
    head = heads.ClassificationHead(num_classes, model_config.encoder.representation_size,
                                    dtype=dtype)
    return Classifier(encoder=encoder, head=head)

  if (isinstance(encoder, vit.ViTEncoder)
      and encoder.output_stride not in decoder_lib.OUTPUT_STRIDES):
    raise ValueError(f'The U-Net decoder takes encoders of output stride '
                     f'{decoder_lib.OUTPUT_STRIDES}, but this encoder has output stride '
                     f'{encoder.output_stride} (model.encoder.resnet.num_layers='
                     f'{tuple(model_config.encoder.resnet.num_layers)}, patch_size='
                     f'{tuple(model_config.encoder.patch_size)}); with patch (1, 1) use 1, 2 or 3 '
                     f'ResNet stages (stride 4, 8, 16), or no ResNet with patch (4, 4), (8, 8) '
                     f'or (16, 16).')
  decoder_lib.check_base_widths(tuple(model_config.decoder.base_widths), encoder.decoder_scales)
  dec = model_config.decoder
  decoder = decoder_lib.Decoder(
      variant=dec.variant, decoder_width=dec.decoder_width, base_widths=tuple(dec.base_widths),
      noise_conditioning=dec.noise_conditioning, num_groups=dec.num_groups, dtype=dtype,
      remat=_remat(model_config, 'decoder'))
  num_outputs = 3 if task == 'denoise' else num_classes
  kernel_size = (model_config.head_kernel_size,) * 2
  head = heads.DenseHead(num_outputs, kernel_size, dtype=dtype)
  return UNet(encoder=encoder, decoder=decoder, head=head)


def _dtype(model_config):
  if model_config.dtype not in DTYPES:
    raise ValueError(f'model.dtype must be one of {tuple(DTYPES)}; got {model_config.dtype!r}.')
  return DTYPES[model_config.dtype]


def _remat(model_config, part: str) -> bool:
  """Whether `part` ('encoder' or 'decoder') is rematerialised under `model.remat`."""
  if model_config.remat not in REMAT_POLICIES:
    raise ValueError(f'model.remat must be one of {REMAT_POLICIES}; got {model_config.remat!r}.')
  return model_config.remat in (part, 'all')
