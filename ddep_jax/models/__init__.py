"""Models: hybrid R50+ViT / ViT encoder, U-Net decoder, heads, TransUNet, ResNet-50 U-Net.

    from ddep_jax import models
    model = models.build_model(models.get_config('R50+ViT-B_16'), task='segment', num_classes=19)

See docs/design.md ("Model") for the call contract and `pretrained.py` for ImageNet-21k `.npz`
loading.
"""

from ddep_jax.models.model import build_model
from ddep_jax.models.presets import default_config
from ddep_jax.models.presets import get_config
from ddep_jax.models.presets import PRESETS

__all__ = ['build_model', 'default_config', 'get_config', 'PRESETS']
