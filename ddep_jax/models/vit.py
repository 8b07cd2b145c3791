"""Vision Transformer encoder, pure or hybrid (R50+ViT), with vision_transformer's names.

Parameter layout under `encoder/` (Linen names, which `pretrained.py` converts the released
pre-Linen `.npz` names into): `conv_root`, `gn_root`, `block{1,2,3}/...` (hybrid only),
`embedding` (the patch projection: 1x1 on the 1/16 ResNet map, 16x16/16 on pixels for the pure
ViT), `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
MlpBlock_0/Dense_{0,1}}`, `Transformer/encoder_norm`.
"""

import math
from typing import Any, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from ddep_jax.models import resnet


class AddPositionEmbs(nn.Module):
  """Adds learned position embeddings, resampled on the fly when the token grid changes.

  The parameter `pos_embedding` is `(1, num_prefix_tokens + h * w, D)` for the grid seen at
  init (the checkpoint format). Applied to another grid (multi-scale or full-frame inference),
  the grid part is resized bilinearly to the new `(h, w)` whenever the grids differ, even with
  equal token counts; this needs the stored grid to be square (its shape cannot be recovered
  from `h * w` otherwise). To fine-tune at a new size, resample once when loading instead
  (`pretrained.resample_position_embedding`, which every loader of parameters uses).
  """

  grid_size: Sequence[int]
  num_prefix_tokens: int

  @nn.compact
  def __call__(self, x):
    height, width = self.grid_size
    if self.has_variable('params', 'pos_embedding'):
      # Read directly: `self.param` would insist on the init shape for this input's grid.
      posemb = self.get_variable('params', 'pos_embedding')
    else:
      side = math.isqrt(height * width)
      if height != width and side * side == height * width:
        raise ValueError(
            f'A {height}x{width} token grid has a square number of tokens, so its position '
            f'embedding would later be read as {side}x{side}. Use an image (crop) size whose '
            'token grid is square, or whose token count is not a perfect square.')
      posemb = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),  # from BERT.
                          (1, x.shape[1], x.shape[2]), jnp.float32)
    prefix, grid = posemb[:, :self.num_prefix_tokens], posemb[:, self.num_prefix_tokens:]
    side = math.isqrt(grid.shape[1])
    # Compare grids, not token counts: a 4x4 table read as 2x8 would scramble the positions. A
    # non-square stored grid has no recoverable shape; it is taken as the input's when counts match.
    stored_grid = (side, side) if side * side == grid.shape[1] else None
    if stored_grid != (height, width) and not (stored_grid is None
                                               and grid.shape[1] == height * width):
      if stored_grid is None:
        raise ValueError(
            f'pos_embedding holds a non-square grid of {grid.shape[1]} tokens, so it cannot be '
            f'resized on the fly to the {height}x{width} grid of this input. Resample it for '
            f'this size with ddep_jax.models.pretrained.resample_posemb and re-initialise.')
      grid = einops.rearrange(grid, 'b (h w) d -> b h w d', h=side)
      grid = jax.image.resize(grid, (1, height, width, grid.shape[-1]), 'bilinear',
                              antialias=False)
      posemb = jnp.concatenate(
          [prefix, einops.rearrange(grid, 'b h w d -> b (h w) d')], axis=1)
    return x + posemb.astype(x.dtype)


ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'flax')


def attention_fn(implementation: str):
  """The `attention_fn` of `nn.MultiHeadDotProductAttention` for `implementation`.

  'auto', 'xla', 'cudnn': `jax.nn.dot_product_attention` (implementation None / 'xla' / 'cudnn';
  cuDNN's fused flash attention needs a GPU and bfloat16), softmax in float32, no attention
  dropout. 'flax': `flax.linen.dot_product_attention`, the unfused einsum -> softmax -> einsum,
  which supports attention dropout.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'model.encoder.attention_implementation must be one of '
                     f'{ATTENTION_IMPLEMENTATIONS}; got {implementation!r}.')
  if implementation == 'flax':
    return nn.dot_product_attention
  fused_implementation = None if implementation == 'auto' else implementation

  def fused(query, key, value, mask=None, dropout_rate=0.0, deterministic=True):
    if dropout_rate > 0 and not deterministic:
      raise ValueError(f'attention_implementation={implementation!r} has no attention dropout; '
                       f'set model.encoder.attention_implementation="flax" or '
                       f'model.encoder.attention_dropout_rate=0.')
    return jax.nn.dot_product_attention(query, key, value, mask=mask,
                                        implementation=fused_implementation)

  return fused


class MlpBlock(nn.Module):
  """Transformer feed-forward block: Dense -> GELU -> dropout -> Dense -> dropout."""

  mlp_dim: int
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    dense = lambda features: nn.Dense(  # noqa: E731
        features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6))
    y = nn.gelu(dense(self.mlp_dim)(x))
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
    y = dense(x.shape[-1])(y)
    return nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer layer: x + Attn(LN(x)), then + MLP(LN(.))."""

  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  attention_implementation: str = 'auto'

  @nn.compact
  def __call__(self, inputs, deterministic: bool):
    x = nn.LayerNorm(dtype=self.dtype)(inputs)
    # Parameters stay `query`, `key`, `value`, `out` whatever the implementation (checkpoints).
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(), broadcast_dropout=False,
        dropout_rate=self.attention_dropout_rate, deterministic=deterministic,
        attention_fn=attention_fn(self.attention_implementation),
        force_fp32_for_softmax=True)(x, x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = x + inputs
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, dtype=self.dtype)(y, deterministic=deterministic)
    return x + y


class Transformer(nn.Module):
  """Position embeddings, dropout, `num_layers` encoder blocks, final LayerNorm."""

  num_layers: int
  mlp_dim: int
  num_heads: int
  grid_size: Sequence[int]
  num_prefix_tokens: int
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  remat: bool = False
  attention_implementation: str = 'auto'

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = AddPositionEmbs(self.grid_size, self.num_prefix_tokens, name='posembed_input')(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    # `deterministic` is positional argument 2 (after self, x) so that remat treats it as static.
    # prevent_cse stays True (big_vision sets it False only under nn.scan): in this Python loop,
    # without the optimization barriers XLA's CSE may merge the backward pass's recomputation
    # with the forward pass and keep every activation, undoing the remat (jax.checkpoint's docs).
    block_cls = (nn.remat(Encoder1DBlock, static_argnums=(2,))
                 if self.remat else Encoder1DBlock)
    for i in range(self.num_layers):
      x = block_cls(self.mlp_dim, self.num_heads, self.dropout_rate, self.attention_dropout_rate,
                    dtype=self.dtype, attention_implementation=self.attention_implementation,
                    name=f'encoderblock_{i}')(x, not train)
    return nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x)


class ViTEncoder(nn.Module):
  """Hybrid R50+ViT (TransUNet's encoder) or pure ViT.

  With `resnet_num_layers=(3, 4, 9)` and `patch_size=(1, 1)` this is vision_transformer's
  `R50+ViT-B_16`: ResNet root + 3 stages to 1/16, a 1x1 `embedding`, class token, transformer.
  With `resnet_num_layers=()` and `patch_size=(16, 16)` it is the pure ViT-B/16 (no skips).
  Fewer ResNet stages or smaller patches give a smaller `output_stride`: `(3,)` stops at 1/4 and
  `(3, 4)` at 1/8 (each stage after the first halves the resolution), so a 32x32 image gives an
  8x8 or 4x4 token map.

  Returns `(x, skips, aux)`: `x` the token map `[B, H/s, W/s, hidden]` (`s = output_stride`;
  class token removed), `skips` one per decoder stage at the scales `decoder_scales` (s, s/2,
  ..., 1): None at 1/s (the token map is the stage's input) and at 1/1, otherwise the ResNet
  feature of that scale (stem @1/2, block1 @1/4, block2 @1/8, block3 @1/16) or None where the
  encoder has none (all None for the pure ViT). At stride 16 with 3 stages: (None, block2,
  block1, stem, None). `aux` holds `stem`, `block{i}`, `tokens` (the whole sequence incl. the
  class token) and `encoded` (the class-token output, or the mean token without a class token).
  """

  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  patch_size: Sequence[int] = (1, 1)
  resnet_num_layers: Sequence[int] = (3, 4, 9)
  resnet_width_factor: float = 1.0
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  classifier: str = 'token'
  dtype: Any = jnp.float32
  remat: bool = False
  attention_implementation: str = 'auto'

  @property
  def output_stride(self) -> int:
    """Input pixels per token along each axis (16 for the paper's presets)."""
    resnet_stride = 2 ** (1 + len(self.resnet_num_layers)) if self.resnet_num_layers else 1
    return resnet_stride * self.patch_size[0]

  @property
  def decoder_scales(self) -> tuple[int, ...]:
    """Scale of each decoder stage this encoder feeds: `output_stride`, half of it, ..., 1.

    Empty when the stride is not a power of two (no decoder of x2 upsamplings fits; the encoder
    still serves a classifier).
    """
    stride = self.output_stride
    if stride & (stride - 1):
      return ()
    return tuple(stride >> i for i in range(stride.bit_length()))

  @nn.compact
  def __call__(self, images, *, train: bool):
    if self.classifier not in ('token', 'none'):
      raise ValueError(f"encoder.classifier must be 'token' or 'none'; got {self.classifier!r}.")
    if self.patch_size[0] != self.patch_size[1]:
      raise ValueError(f'encoder.patch_size must be square; got {self.patch_size}.')
    resnet.check_image_shape(images.shape, self.output_stride, 'transunet')
    if self.attention_implementation != 'flax' and self.attention_dropout_rate > 0:
      raise ValueError(f'model.encoder.attention_implementation='
                       f'{self.attention_implementation!r} has no attention dropout, but '
                       f'attention_dropout_rate={self.attention_dropout_rate}: use '
                       f"attention_implementation='flax' or attention_dropout_rate=0.")
    x = images.astype(self.dtype)
    aux = {}
    if self.resnet_num_layers:
      aux = resnet.resnet_features(x, num_layers=self.resnet_num_layers,
                                   width_factor=self.resnet_width_factor, dtype=self.dtype,
                                   remat=self.remat)
      x = aux[f'block{len(self.resnet_num_layers)}']

    x = nn.Conv(self.hidden_size, self.patch_size, strides=self.patch_size, padding='VALID',
                dtype=self.dtype, name='embedding')(x)
    batch, height, width, _ = x.shape
    x = einops.rearrange(x, 'b h w d -> b (h w) d')
    num_prefix_tokens = 0
    if self.classifier == 'token':
      # The ImageNet-21k checkpoints were trained with the class token in the sequence; keeping
      # it keeps the encoder's features those of the checkpoint.
      cls = self.param('cls', nn.initializers.zeros, (1, 1, self.hidden_size), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (batch, 1, 1)), x], axis=1)
      num_prefix_tokens = 1
    x = Transformer(self.num_layers, self.mlp_dim, self.num_heads, (height, width),
                    num_prefix_tokens, self.dropout_rate, self.attention_dropout_rate,
                    dtype=self.dtype, remat=self.remat,
                    attention_implementation=self.attention_implementation,
                    name='Transformer')(x, train=train)
    aux['tokens'] = x
    aux['encoded'] = x[:, 0] if num_prefix_tokens else jnp.mean(x, axis=1)
    token_map = einops.rearrange(x[:, num_prefix_tokens:], 'b (h w) d -> b h w d', h=height)

    # Decoder skips by scale (see the class docstring): the hybrid's stem sits at 1/2 and block
    # `k` at 1/2**(k+1); the token map's own scale gets none. A pure ViT has none.
    by_scale = {2: aux.get('stem')}
    by_scale.update({2**(k + 2): aux[f'block{k + 1}'] for k in range(len(self.resnet_num_layers))})
    skips = tuple(None if scale == self.output_stride else by_scale.get(scale)
                  for scale in self.decoder_scales)
    return token_map, skips, aux
