"""U-Net decoder of the TransUNet / ResNet-50 U-Net, optionally conditioned on the noise level.

One stage per scale from the encoder's output stride down to the input: five stages at 1/16,
1/8, 1/4, 1/2 and 1/1 for the paper's stride-16 encoders, four (1/8 ... 1/1) for a stride-8
hybrid, three (1/4, 1/2, 1/1) for a stride-4 one (`OUTPUT_STRIDES`; the encoder's
`decoder_scales` give the stages and `model.py` the mapping). Stage `i > 0` upsamples its input
x2 (bilinear, half-pixel centres as `jax.image.resize`; not PyTorch's align_corners),
concatenates the encoder skip of that scale (for the hybrid encoder block2 @1/8, block1 @1/4,
stem @1/2, none @1/1, as far as its stride reaches) and applies 3x3 conv -> GroupNorm -> ReLU
twice. Stage 0 runs on the encoder output (the ViT token map; for the ResNet-50 U-Net, block4
@1/32 upsampled x2 and concatenated with block3). Stage `i` has `decoder_width * base_widths[i]`
channels, one width per stage: 1x = [1024, 512, 256, 128, 64] at stride 16 (paper §4.3), 2x and
3x multiply every width.

`variant='transunet'` reproduces the original TransUNet decoder (Chen et al. 2021): stage 0 is a
single 3x3 conv (`conv_more`, 512 channels) and the four upsampling blocks have
(256, 128, 64, 16) channels; use it with `base_widths=(512, 256, 128, 64, 16)` (preset
`R50+ViT-B_16-TransUNet`).

Normalisation is GroupNorm, not TransUNet's BatchNorm: it does not depend on the batch size
(fine-tuning runs 1024x1024 crops with one or two images per device) and leaves no batch
statistics to thread through the train state. Each norm uses `gcd(num_groups, channels)` groups
so that narrow layers (TransUNet's 16 channels) stay valid.

Noise conditioning (paper §4.4, off by default): the per-example `gamma` is embedded
(sinusoidal, then a 2-layer MLP) and every decoder norm gets a FiLM scale and shift from it,
`norm(x) * (1 + scale) + shift`. The FiLM projections start at zero, so a conditioned decoder
starts as the unconditioned one.
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

VARIANTS = ('ddep', 'transunet')
# Output strides of the ViT / hybrid encoders the decoder takes: one stage per x2 upsampling
# plus the stage at the encoder's resolution.
OUTPUT_STRIDES = (4, 8, 16)
# The paper's 1x width of the stage at each scale (§4.3), for suggestions in error messages.
PAPER_WIDTHS = {16: 1024, 8: 512, 4: 256, 2: 128, 1: 64}


def check_base_widths(base_widths: Sequence[int], scales: Sequence[int]):
  """Raises a ValueError naming `model.decoder.base_widths` unless it has one width per stage."""
  if scales and len(base_widths) == len(scales):
    return
  if not scales:
    raise ValueError('The decoder needs at least one stage (one skip entry, None for none).')
  if len(base_widths) > len(scales):
    suggestion = tuple(base_widths[-len(scales):])
  else:
    suggestion = tuple(PAPER_WIDTHS.get(s, 64) for s in scales)
  stages = ', '.join(f'1/{s}' for s in scales)
  raise ValueError(
      f'model.decoder.base_widths={tuple(base_widths)} has {len(base_widths)} widths, but the '
      f'encoder feeds {len(scales)} decoder stages ({stages}: one at 1/{scales[0]}, the '
      f'encoder output, then one per x2 upsampling). Set model.decoder.base_widths to one width '
      f'per stage, e.g. {suggestion}.')


def upsample2x(x: jnp.ndarray) -> jnp.ndarray:
  """Bilinear x2 upsampling of `[B, H, W, C]` (half-pixel centres, edges clamped).

  Equal to `jax.image.resize(x, (B, 2H, 2W, C), 'bilinear')`, which multiplies by dense
  `[2n, n]` interpolation matrices at HIGHEST precision: 2n FLOPs per output value and axis,
  most of the decoder's upsampling cost at 512x512 and more (docs/performance.md). A x2 bilinear
  tap is fixed: output 2i is 3/4 x[i] + 1/4 x[i-1], output 2i+1 is 3/4 x[i] + 1/4 x[i+1].
  """
  return _upsample2x_axis(_upsample2x_axis(x, 1), 2)


def _upsample2x_axis(x: jnp.ndarray, axis: int) -> jnp.ndarray:
  n = x.shape[axis]
  first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
  last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
  before = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
  after = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
  even, odd = 0.75 * x + 0.25 * before, 0.75 * x + 0.25 * after
  out = jnp.stack([even, odd], axis=axis + 1)  # [..., n, 2, ...] -> [..., 2n, ...]
  return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:]).astype(x.dtype)


def sinusoidal_embedding(values: jnp.ndarray, dim: int, max_period: float = 10_000.) -> jnp.ndarray:
  """Transformer / DDPM sinusoidal embedding of a `[B]` float array -> `[B, dim]`."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = values.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class NoiseEmbedding(nn.Module):
  """Embeds the noise level `gamma` in [0, 1] (Eq. 5): sinusoidal(1000 * gamma) -> MLP."""

  features: int = 256

  @nn.compact
  def __call__(self, noise_level):
    # Scaled to [0, 1000] like DDPM timesteps, so the sinusoid frequencies resolve gamma values
    # that differ by 1e-3 (e.g. gamma ~ U(0.9, 0.95), §4.4).
    emb = sinusoidal_embedding(1000. * noise_level, self.features)
    emb = nn.swish(nn.Dense(self.features, name='dense0')(emb))
    return nn.Dense(self.features, name='dense1')(emb)


class ConvNormReLU(nn.Module):
  """3x3 conv -> GroupNorm -> (FiLM from the noise embedding) -> ReLU."""

  features: int
  num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, noise_emb=None):
    x = nn.Conv(self.features, (3, 3), padding='SAME', use_bias=False, dtype=self.dtype,
                name='conv')(x)
    x = nn.GroupNorm(num_groups=math.gcd(self.num_groups, self.features), epsilon=1e-6,
                     dtype=self.dtype, name='gn')(x)
    if noise_emb is not None:  # §4.4: gamma enters through the normalisation layers.
      film = nn.Dense(2 * self.features, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                      name='film')(nn.swish(noise_emb))
      scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
      x = x * (1 + scale) + shift
    return nn.relu(x)


class DecoderStage(nn.Module):
  """Optional x2 upsampling and skip concatenation, then `num_convs` ConvNormReLU layers."""

  features: int
  num_convs: int
  upsample: bool
  num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, skip, noise_emb):
    if self.upsample:
      x = upsample2x(x)
    if skip is not None:
      if skip.shape[1:3] != x.shape[1:3]:
        raise ValueError(f'Decoder stage {self.name}: the skip feature map is '
                         f'{skip.shape[1]}x{skip.shape[2]} but the upsampled decoder map is '
                         f'{x.shape[1]}x{x.shape[2]}; the encoder must halve the resolution '
                         f'between consecutive skips.')
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
    for j in range(self.num_convs):
      x = ConvNormReLU(self.features, self.num_groups, self.dtype, name=f'conv{j}')(x, noise_emb)
    return x


class Decoder(nn.Module):
  """The U-Net decoder: one stage per entry of `skips` (see the module docstring)."""

  variant: str = 'ddep'
  decoder_width: float = 1
  base_widths: Sequence[int] = (1024, 512, 256, 128, 64)
  noise_conditioning: bool = False
  num_groups: int = 32
  dtype: Any = jnp.float32
  remat: bool = False

  @property
  def widths(self) -> tuple[int, ...]:
    """Channels of the stages: `decoder_width * base_widths` (paper §4.3)."""
    return tuple(int(round(self.decoder_width * w)) for w in self.base_widths)

  @nn.compact
  def __call__(self, x, skips: Sequence[Optional[jnp.ndarray]], *, noise_level=None):
    """Decodes the encoder output `x` with `skips`, one per stage (None = no skip).

    Args:
      x: encoder output, `[B, H/s, W/s, C]` with `s = 2 ** (len(skips) - 1)` (or `[B, H/2s,
        W/2s, C]` when `skips[0]` is given, as the ResNet-50 U-Net's block4).
      skips: feature maps or None, one per stage from 1/s to 1/1 (the encoder's
        `decoder_scales`); stage 0 upsamples `x` x2 when it has one.
      noise_level: `gamma` `[B]` (or a scalar); required when `noise_conditioning` is on,
        ignored otherwise.

    Returns:
      `[B, H, W, widths[-1]]` features for the head.
    """
    if self.variant not in VARIANTS:
      raise ValueError(f'decoder.variant must be one of {VARIANTS}; got {self.variant!r}.')
    check_base_widths(self.base_widths, tuple(2**i for i in reversed(range(len(skips)))))
    noise_emb = None
    if self.noise_conditioning:
      if noise_level is None:
        raise ValueError('model.decoder.noise_conditioning=True needs the per-example noise '
                         'level: call model.apply(..., noise_level=gamma) with gamma of shape '
                         '[batch].')
      noise_level = jnp.asarray(noise_level, jnp.float32)
      if noise_level.shape not in ((), (1,), (x.shape[0],)):
        raise ValueError(f'noise_level must be a scalar or have shape [batch] = '
                         f'({x.shape[0]},); got {noise_level.shape}.')
      noise_level = jnp.broadcast_to(noise_level, (x.shape[0],))
      noise_emb = NoiseEmbedding(name='noise_embedding')(noise_level).astype(self.dtype)

    stage_cls = nn.remat(DecoderStage) if self.remat else DecoderStage
    x = x.astype(self.dtype)
    for i, (features, skip) in enumerate(zip(self.widths, skips)):
      # TransUNet's stage 0 is its single `conv_more`; every other stage has two convs.
      num_convs = 1 if (i == 0 and self.variant == 'transunet') else 2
      upsample = i > 0 or skip is not None
      x = stage_cls(features, num_convs, upsample, self.num_groups, self.dtype,
                    name=f'stage{i}')(x, skip, noise_emb)
    return x
