"""The `config.model` section: defaults and named presets.

`default_config()` is R50+ViT-B/16 (vision_transformer's `R50+ViT-B_16`, TransUNet's encoder) with
the 1x DDeP decoder. `get_config(name, **overrides)` returns a preset:

| name | encoder | decoder |
|---|---|---|
| `R50+ViT-B_16` (default) | R50 (3, 4, 9) + ViT-B (768, 12 layers, 12 heads, MLP 3072) | DDeP 1x |
| `R50+ViT-Ti_16` | R50 (3, 4, 9) + ViT-Ti (192, 12, 3, 768) | DDeP 1x |
| `R50+ViT-S_16` | R50 (3, 4, 9) + ViT-S (384, 12, 6, 1536) | DDeP 1x |
| `R50+ViT-L_16` | R50 (3, 4, 9) + ViT-L (1024, 24, 16, 4096) | DDeP 1x |
| `R50+ViT-B_16-TransUNet` | as `R50+ViT-B_16` | TransUNet's (512 -> 256, 128, 64, 16) |
| `ViT-B_16` | pure ViT-B/16 (16x16 patches, no skips) | DDeP 1x |
| `ViT-L_16` | pure ViT-L/16 (1024, 24 layers, 16 heads, MLP 4096; no skips) | DDeP 1x |
| `R50-UNet` | ResNet-50 (3, 4, 6, 3), GN + WS (paper Table 7) | DDeP 1x |
| `tiny`, `tiny-R50-UNet` | tiny CPU test models (32x32 inputs in about a second) | tiny |

`R50+ViT-L_16` keeps the /16 hybrid stem of B/16 so that the same five-stage decoder and skips
apply. It is *not* vision_transformer's `R50+ViT-L_32`, whose ResNet has 4 stages (3, 4, 6, 3) and
output stride 32; that checkpoint does not load into this preset. The Ti and S hybrids likewise
have no released ImageNet-21k checkpoint with this exact layout (AugReg's `R_Ti_16` has a
stem-only ResNet); they are for scaling studies from scratch or from your own encoder.

Dropout follows vision_transformer: 0.1 for the R50 hybrids B (and L), 0.0 for Ti, S and the pure
ViT-B/16; attention dropout 0.0.

`get_config(name, output_stride=8)` or `4` scales a TransUNet preset's token grid with small
images: a hybrid keeps the first 2 or 1 of its ResNet stages (stride 8 or 4, patch 1), a pure
ViT takes 8x8 or 4x4 patches, and the decoder keeps the widths of the stages it still has (the
last 4 or 3 of `base_widths`: it starts at the encoder's stride, see `model.py`). E.g.
`get_config('tiny', output_stride=4)` gives an 8x8 token map on 32x32 images. No released
checkpoint has these layouts (loading an R50 file names its extra stages).
"""

import math

import ml_collections

PRESETS = ('R50+ViT-B_16', 'R50+ViT-Ti_16', 'R50+ViT-S_16', 'R50+ViT-L_16',
           'R50+ViT-B_16-TransUNet', 'ViT-B_16', 'ViT-L_16', 'R50-UNet', 'tiny',
           'tiny-R50-UNet')

# hidden_size, num_layers, num_heads, mlp_dim, dropout_rate of the transformer sizes.
_VIT_SIZES = {
    'Ti': (192, 12, 3, 768, 0.0),
    'S': (384, 12, 6, 1536, 0.0),
    'B': (768, 12, 12, 3072, 0.1),
    'L': (1024, 24, 16, 4096, 0.1),
}


def default_config() -> ml_collections.ConfigDict:
  """Returns the locked `config.model` section for R50+ViT-B/16 with the 1x DDeP decoder."""
  config = ml_collections.ConfigDict()
  # 'transunet': ViT (pure or hybrid) encoder; 'r50_unet': ResNet-50 U-Net (Table 7).
  config.name = 'transunet'

  config.encoder = ml_collections.ConfigDict()
  config.encoder.resnet = ml_collections.ConfigDict()
  # (3, 4, 9) bottleneck units: 1/16 after 3 stages, as vision_transformer's R50+ViT-B_16;
  # () for a pure ViT; (3, 4, 6, 3) for the ResNet-50 U-Net.
  config.encoder.resnet.num_layers = (3, 4, 9)
  config.encoder.resnet.width_factor = 1.0
  config.encoder.patch_size = (1, 1)  # On the 1/16 ResNet map; (16, 16) on pixels for pure ViT.
  config.encoder.hidden_size = 768
  config.encoder.num_layers = 12
  config.encoder.num_heads = 12
  config.encoder.mlp_dim = 3072
  config.encoder.dropout_rate = 0.1
  config.encoder.attention_dropout_rate = 0.0
  # 'auto' / 'xla' / 'cudnn': jax.nn.dot_product_attention (implementation None / 'xla' /
  # 'cudnn': cuDNN flash attention on GPUs, bfloat16 only); 'flax': the unfused flax attention,
  # the only one with attention dropout.
  config.encoder.attention_implementation = 'auto'
  # 'token': class token in the sequence (how the ImageNet-21k checkpoints were trained);
  # 'none': no class token (the posembed's class slot is dropped when loading).
  config.encoder.classifier = 'token'
  # `pre_logits` width of the classification head (768 for the ImageNet-21k checkpoints).
  config.encoder.representation_size = ml_collections.config_dict.placeholder(int)

  config.decoder = ml_collections.ConfigDict()
  config.decoder.variant = 'ddep'  # 'ddep' or 'transunet' (the original TransUNet decoder).
  config.decoder.decoder_width = 1.0  # Multiplies every stage width: 1x, 2x, 3x (§4.3).
  config.decoder.base_widths = (1024, 512, 256, 128, 64)  # Stages at 1/16 ... 1/1 (§4.3).
  config.decoder.noise_conditioning = False  # Condition on gamma through FiLM (§4.4).
  config.decoder.num_groups = 32  # GroupNorm groups (gcd with the width of each layer).

  config.head_kernel_size = 1  # Of the dense (denoising / segmentation) head's conv.
  config.dtype = 'float32'  # Compute dtype: 'float32' or 'bfloat16'; params stay float32.
  # Rematerialise in the backward pass (less memory, more FLOPs): 'none'; 'encoder' (each
  # residual unit and transformer layer); 'decoder' (each decoder stage); 'all' (both).
  config.remat = 'none'
  config.lock()
  return config


def get_config(name: str = 'R50+ViT-B_16', *, output_stride: int = 16,
               **overrides) -> ml_collections.ConfigDict:
  """Returns the preset `name` at `output_stride` (16, 8 or 4) with `overrides` applied.

  Overrides name a field either at the top level (`dtype='bfloat16'`), by its unique name inside
  a section (`decoder_width=2`, `hidden_size=384`, `num_layers=6` is ambiguous -> use
  `encoder={'num_layers': 6}`), or as a dict for a section (`decoder={'decoder_width': 3}`).
  `output_stride` (not a config field: the config holds the encoder that has it) is applied
  before the overrides, so `base_widths=...` replaces the shortened widths.
  """
  config = default_config()
  enc, dec = config.encoder, config.decoder
  if name.startswith('R50+ViT-'):
    size = name[len('R50+ViT-'):].split('_')[0]
    if size not in _VIT_SIZES or name not in PRESETS:
      raise ValueError(f'Unknown model preset {name!r}; choose one of {PRESETS}.')
    (enc.hidden_size, enc.num_layers, enc.num_heads, enc.mlp_dim,
     enc.dropout_rate) = _VIT_SIZES[size]
    if name == 'R50+ViT-B_16-TransUNet':
      dec.variant = 'transunet'
      dec.base_widths = (512, 256, 128, 64, 16)
      config.head_kernel_size = 3  # TransUNet's SegmentationHead is a 3x3 conv.
  elif name in ('ViT-B_16', 'ViT-L_16'):
    enc.resnet.num_layers = ()
    enc.patch_size = (16, 16)
    enc.dropout_rate = 0.0
    if name == 'ViT-L_16':  # vision_transformer's ViT-L_16 (dropout 0.1).
      (enc.hidden_size, enc.num_layers, enc.num_heads, enc.mlp_dim,
       enc.dropout_rate) = _VIT_SIZES['L']
  elif name == 'R50-UNet':
    config.name = 'r50_unet'
    enc.resnet.num_layers = (3, 4, 6, 3)
  elif name in ('tiny', 'tiny-R50-UNet'):
    # 32-channel root (GroupNorm(32) in the encoder needs a multiple of 32) and one unit per
    # stage; a one-layer, 32-wide transformer; a narrow decoder.
    enc.resnet.width_factor = 0.5
    enc.resnet.num_layers = (1, 1, 1)
    enc.hidden_size, enc.num_layers, enc.num_heads, enc.mlp_dim = 32, 1, 2, 64
    dec.base_widths = (32, 16, 16, 8, 8)
    dec.num_groups = 4
    if name == 'tiny-R50-UNet':
      config.name = 'r50_unet'
      enc.resnet.num_layers = (1, 1, 1, 1)
  else:
    raise ValueError(f'Unknown model preset {name!r}; choose one of {PRESETS}.')
  if output_stride != 16:
    _scale_output_stride(config, name, output_stride)
  _apply_overrides(config, overrides)
  return config


def _scale_output_stride(config: ml_collections.ConfigDict, name: str, output_stride: int):
  """Shortens the stride-16 preset `name` to `output_stride` (see the module docstring)."""
  if output_stride not in (4, 8):
    raise ValueError(f'get_config(output_stride=...) must be 16, 8 or 4; got {output_stride!r}.')
  if config.name != 'transunet':
    raise ValueError(f'get_config({name!r}, output_stride={output_stride}): the ResNet-50 '
                     f'U-Net ({name}) has a fixed stride-32 encoder and five decoder stages; '
                     f'output_stride applies to the ViT / hybrid presets.')
  enc, dec = config.encoder, config.decoder
  levels = int(math.log2(output_stride))  # x2 upsamplings: the decoder has levels + 1 stages.
  if enc.resnet.num_layers:
    enc.resnet.num_layers = tuple(enc.resnet.num_layers)[:levels - 1]
  else:
    enc.patch_size = (output_stride, output_stride)
  dec.base_widths = tuple(dec.base_widths)[-(levels + 1):]


def _apply_overrides(config: ml_collections.ConfigDict, overrides: dict):
  """Sets each override on the unique field of that name (see `get_config`)."""
  sections = {'': config, 'encoder.': config.encoder, 'encoder.resnet.': config.encoder.resnet,
              'decoder.': config.decoder}
  for key, value in overrides.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      config[key].update(value)
      continue
    owners = [prefix for prefix, section in sections.items()
              if key in section and not isinstance(section[key], ml_collections.ConfigDict)]
    if len(owners) != 1:
      every = sorted(prefix + k for prefix, s in sections.items() for k in s.keys()
                     if not isinstance(s[k], ml_collections.ConfigDict))
      reason = 'is ambiguous' if owners else 'is not a model config field'
      raise ValueError(f'Override {key!r} {reason}; fields: {every}. Pass a section dict, e.g. '
                       f"encoder={{'{key}': ...}}, for an ambiguous name.")
    sections[owners[0]][key] = value
