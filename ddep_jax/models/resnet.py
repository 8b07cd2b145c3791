"""ResNet with weight-standardised convolutions and GroupNorm (vision_transformer semantics).

The hybrid R50+ViT encoder and the ResNet-50 U-Net (paper Table 7) share this backbone. Parameter
names are those of google-research/vision_transformer (`conv_root`, `gn_root`,
`block{i}/unit{k}/{conv1,gn1,...,conv_proj,gn_proj}`), so the released ImageNet-21k `.npz`
files load without a renaming table. Semantics follow the JAX original, not the PyTorch
TransUNet port: SAME padding everywhere, a SAME 3x3/2 max-pool, GroupNorm(32, eps 1e-6) on every
norm including `gn_proj`, and standardisation `(w - mean) / (std + 1e-5)`.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

# Statistics of weight standardisation run over the kernel's spatial and input axes (HWIO).
_STANDARDIZE_AXES = (0, 1, 2)
_STANDARDIZE_EPS = 1e-5


def weight_standardize(kernel: jnp.ndarray, axis=_STANDARDIZE_AXES, eps=_STANDARDIZE_EPS):
  """Returns `(kernel - mean) / (std + eps)`, statistics over `axis` (per output channel)."""
  kernel = kernel - jnp.mean(kernel, axis=axis, keepdims=True)
  return kernel / (jnp.std(kernel, axis=axis, keepdims=True) + eps)


class StdConv(nn.Conv):
  """Convolution whose kernel is weight-standardised every time it is used.

  The stored parameter is the raw kernel (as in the checkpoints); standardisation happens in
  float32 before the kernel is cast to the compute dtype.
  """

  def param(self, name: str, init_fn: Callable[..., Any], *init_args, **init_kwargs):
    value = super().param(name, init_fn, *init_args, **init_kwargs)
    if name == 'kernel':
      value = weight_standardize(value)
    return value


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1 -> 3x3 (carries the stride) -> 1x1 (x4 channels), post-activation."""

  features: int
  strides: Sequence[int] = (1, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, name: StdConv(  # noqa: E731
        f, k, strides=s, use_bias=False, padding='SAME', dtype=self.dtype, name=name)
    norm = lambda name, **kw: nn.GroupNorm(  # noqa: E731
        num_groups=32, epsilon=1e-6, dtype=self.dtype, name=name, **kw)
    needs_projection = x.shape[-1] != self.features * 4 or tuple(self.strides) != (1, 1)

    residual = x
    if needs_projection:
      residual = conv(self.features * 4, (1, 1), self.strides, 'conv_proj')(residual)
      residual = norm('gn_proj')(residual)

    y = nn.relu(norm('gn1')(conv(self.features, (1, 1), (1, 1), 'conv1')(x)))
    y = nn.relu(norm('gn2')(conv(self.features, (3, 3), self.strides, 'conv2')(y)))
    y = conv(self.features * 4, (1, 1), (1, 1), 'conv3')(y)
    # Zero-initialised last norm scale: each unit starts as the identity (as vision_transformer).
    y = norm('gn3', scale_init=nn.initializers.zeros)(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """A stage of `block_size` bottleneck units; the first one carries `first_stride`."""

  block_size: int
  features: int
  first_stride: Sequence[int]
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    unit_cls = nn.remat(ResidualUnit) if self.remat else ResidualUnit
    for i in range(self.block_size):
      strides = self.first_stride if i == 0 else (1, 1)
      x = unit_cls(self.features, strides=strides, dtype=self.dtype, name=f'unit{i + 1}')(x)
    return x


def resnet_features(x, *, num_layers: Sequence[int], width_factor: float, dtype: Any,
                    remat: bool) -> dict[str, jnp.ndarray]:
  """Runs the root and the ResNet stages inside the calling module's scope.

  Called from a `@nn.compact` method, so that the submodules are named `conv_root`, `gn_root`,
  `block1`, ... directly under the caller (the checkpoint layout), not under an extra level.

  Returns:
    `{'stem': relu(gn_root(conv_root(x))) @1/2 (before the max-pool, the U-Net skip),
    'block1': @1/4, 'block2': @1/8, ...}`; stage `i` has `4 * width * 2**(i-1)` channels.
  """
  width = int(64 * width_factor)
  features = {}
  x = StdConv(width, (7, 7), strides=(2, 2), use_bias=False, padding='SAME', dtype=dtype,
              name='conv_root')(x)
  x = nn.relu(nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, name='gn_root')(x))
  features['stem'] = x
  x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
  for i, block_size in enumerate(num_layers):
    x = ResNetStage(block_size, width * 2**i, first_stride=(1, 1) if i == 0 else (2, 2),
                    dtype=dtype, remat=remat, name=f'block{i + 1}')(x)
    features[f'block{i + 1}'] = x
  return features


class ResNetEncoder(nn.Module):
  """ResNet-50 encoder of the U-Net in paper Table 7 (blocks (3, 4, 6, 3), output @1/32).

  Returns `(x, skips, aux)` as every encoder here: `x` the deepest map (block4 @1/32), `skips` the
  five decoder skips from 1/16 to 1/1 (block3, block2, block1, stem, None) and `aux` the named
  intermediates.
  """

  num_layers: Sequence[int] = (3, 4, 6, 3)
  width_factor: float = 1.0
  dtype: Any = jnp.float32
  remat: bool = False

  @property
  def decoder_scales(self) -> tuple[int, ...]:
    """Scale of each decoder stage this encoder feeds (block4 enters stage 0 upsampled)."""
    return (16, 8, 4, 2, 1)

  @nn.compact
  def __call__(self, images, *, train: bool):
    del train  # No dropout in the ResNet.
    if len(self.num_layers) != 4:
      raise ValueError(f'The ResNet U-Net encoder needs 4 stages (down to 1/32) to feed the '
                       f'5 decoder stages; got encoder.resnet.num_layers={self.num_layers}.')
    check_image_shape(images.shape, 32, 'r50_unet')
    feats = resnet_features(images.astype(self.dtype), num_layers=self.num_layers,
                            width_factor=self.width_factor, dtype=self.dtype, remat=self.remat)
    skips = (feats['block3'], feats['block2'], feats['block1'], feats['stem'], None)
    aux = dict(feats, encoded=jnp.mean(feats['block4'], axis=(1, 2)))  # GAP, for a classifier.
    return feats['block4'], skips, aux


def check_image_shape(shape, stride: int, model_name: str):
  """Raises a clear error when the image height/width is not a multiple of `stride`."""
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f'Images must be float [B, H, W, 3] in [-1, 1]; got shape {tuple(shape)}.')
  height, width = shape[1], shape[2]
  if height % stride or width % stride:
    raise ValueError(
        f'{model_name}: image height and width must be multiples of {stride} (the encoder '
        f'output stride); got {height}x{width}. Pad or crop the images, e.g. to '
        f'{-(-height // stride) * stride}x{-(-width // stride) * stride}.')
