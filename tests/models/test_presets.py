"""Tests for the `config.model` defaults, presets and overrides."""

import pytest

from ddep_jax import models


def test_default_is_r50_vit_b16_with_1x_ddep_decoder():
  config = models.default_config()
  assert config.name == 'transunet'
  assert tuple(config.encoder.resnet.num_layers) == (3, 4, 9)
  assert tuple(config.encoder.patch_size) == (1, 1)
  assert (config.encoder.hidden_size, config.encoder.num_layers, config.encoder.num_heads,
          config.encoder.mlp_dim) == (768, 12, 12, 3072)
  assert config.encoder.classifier == 'token' and config.encoder.representation_size is None
  assert config.decoder.variant == 'ddep' and config.decoder.decoder_width == 1
  assert tuple(config.decoder.base_widths) == (1024, 512, 256, 128, 64)
  assert config.decoder.noise_conditioning is False
  assert (config.dtype, config.remat) == ('float32', 'none')
  assert config.encoder.attention_implementation == 'auto'
  assert models.get_config().to_dict() == config.to_dict()
  with pytest.raises(AttributeError):
    config.decoder.decoder_widht = 2  # Locked: a typo is an error.


@pytest.mark.parametrize('name,sizes', [
    ('R50+ViT-Ti_16', (192, 12, 3, 768)),
    ('R50+ViT-S_16', (384, 12, 6, 1536)),
    ('R50+ViT-L_16', (1024, 24, 16, 4096)),
])
def test_vit_sizes(name, sizes):
  enc = models.get_config(name).encoder
  assert (enc.hidden_size, enc.num_layers, enc.num_heads, enc.mlp_dim) == sizes
  assert tuple(enc.resnet.num_layers) == (3, 4, 9)


def test_other_presets():
  vit = models.get_config('ViT-B_16').encoder
  assert tuple(vit.resnet.num_layers) == () and tuple(vit.patch_size) == (16, 16)
  r50 = models.get_config('R50-UNet')
  assert r50.name == 'r50_unet' and tuple(r50.encoder.resnet.num_layers) == (3, 4, 6, 3)
  transunet = models.get_config('R50+ViT-B_16-TransUNet')
  assert transunet.decoder.variant == 'transunet'
  assert tuple(transunet.decoder.base_widths) == (512, 256, 128, 64, 16)
  assert models.get_config('tiny-R50-UNet').name == 'r50_unet'
  assert set(models.PRESETS) >= {'R50+ViT-B_16', 'ViT-B_16', 'R50-UNet', 'tiny', 'tiny-R50-UNet'}


def test_overrides_by_field_name_and_section():
  config = models.get_config('R50+ViT-B_16', decoder_width=3, dtype='bfloat16',
                             encoder={'num_layers': 6}, noise_conditioning=True)
  assert config.decoder.decoder_width == 3 and config.dtype == 'bfloat16'
  assert config.encoder.num_layers == 6 and config.decoder.noise_conditioning
  assert tuple(config.encoder.resnet.num_layers) == (3, 4, 9)


def test_override_and_preset_errors():
  with pytest.raises(ValueError, match=r"'num_layers' is ambiguous.*encoder.resnet.num_layers"):
    models.get_config('tiny', num_layers=2)
  with pytest.raises(ValueError, match=r"'decoder_widht' is not a model config field"):
    models.get_config('tiny', decoder_widht=2)
  with pytest.raises(ValueError, match=r"Unknown model preset 'R50\+ViT-H_16'"):
    models.get_config('R50+ViT-H_16')
