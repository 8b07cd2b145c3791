"""Tests for the ViT / hybrid encoder: shapes, skips, position-embedding resizing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddep_jax import models
from ddep_jax.models import model as model_lib
from ddep_jax.models import vit


def bilinear_half_pixel_np(grid, out_h, out_w):
  """Bilinear resize with half-pixel centres and edge clamping (no antialiasing), float64."""
  in_h, in_w = grid.shape[:2]

  def taps(out_size, in_size):
    src = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
    lo = np.floor(src).astype(int)
    return lo, np.minimum(lo + 1, in_size - 1), src - lo

  y0, y1, fy = taps(out_h, in_h)
  x0, x1, fx = taps(out_w, in_w)
  g = np.asarray(grid, np.float64)
  top = g[y0][:, x0] * (1 - fx)[None, :, None] + g[y0][:, x1] * fx[None, :, None]
  bottom = g[y1][:, x0] * (1 - fx)[None, :, None] + g[y1][:, x1] * fx[None, :, None]
  return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def test_position_embeddings_resized_on_the_fly_for_another_grid():
  rng = np.random.default_rng(0)
  posemb = rng.normal(size=(1, 1 + 2 * 2, 4)).astype(np.float32)  # Class slot + 2x2 grid.
  tokens = rng.normal(size=(3, 1 + 4 * 3, 4)).astype(np.float32)  # Applied to a 4x3 grid.
  out = vit.AddPositionEmbs((4, 3), num_prefix_tokens=1).apply(
      {'params': {'pos_embedding': posemb}}, tokens)
  grid = bilinear_half_pixel_np(posemb[0, 1:].reshape(2, 2, 4), 4, 3).reshape(1, 12, 4)
  expected = tokens + np.concatenate([posemb[:, :1], grid], axis=1)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=1e-6)
  # Same grid: plain addition.
  same = vit.AddPositionEmbs((2, 2), 1).apply({'params': {'pos_embedding': posemb}},
                                              tokens[:, :5])
  np.testing.assert_array_equal(np.asarray(same), tokens[:, :5] + posemb)


def test_position_embeddings_resized_for_a_grid_of_the_same_token_count():
  # A 4x4 table applied to a 2x8 grid (16 tokens both): resized by shape, not reused as is.
  rng = np.random.default_rng(1)
  posemb = rng.normal(size=(1, 1 + 4 * 4, 4)).astype(np.float32)
  tokens = rng.normal(size=(2, 1 + 2 * 8, 4)).astype(np.float32)
  out = vit.AddPositionEmbs((2, 8), num_prefix_tokens=1).apply(
      {'params': {'pos_embedding': posemb}}, tokens)
  grid = bilinear_half_pixel_np(posemb[0, 1:].reshape(4, 4, 4), 2, 8).reshape(1, 16, 4)
  expected = tokens + np.concatenate([posemb[:, :1], grid], axis=1)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(out) - (tokens + posemb)).max() > 0.1  # The old, reused layout.
  # A non-square stored grid (2x3) is read as the input's grid when the counts match.
  posemb_2x3 = rng.normal(size=(1, 1 + 6, 4)).astype(np.float32)
  same = vit.AddPositionEmbs((2, 3), 1).apply({'params': {'pos_embedding': posemb_2x3}},
                                              tokens[:, :7])
  np.testing.assert_array_equal(np.asarray(same), tokens[:, :7] + posemb_2x3)
  # Initialising a non-square grid with a square token count would store an ambiguous table.
  with pytest.raises(ValueError, match='2x8 token grid has a square number of tokens.*4x4'):
    vit.AddPositionEmbs((2, 8), 1).init(jax.random.key(0), tokens)


def test_non_square_stored_grid_cannot_be_resized_on_the_fly():
  posemb = np.zeros((1, 1 + 2 * 3, 4), np.float32)
  with pytest.raises(ValueError, match='non-square grid of 6 tokens.*4x4.*resample_posemb'):
    vit.AddPositionEmbs((4, 4), 1).apply({'params': {'pos_embedding': posemb}},
                                         np.zeros((1, 17, 4), np.float32))


@pytest.mark.parametrize('height,width', [(32, 32), (32, 48)])
def test_hybrid_encoder_features_and_skips(height, width):
  encoder = model_lib.build_encoder(models.get_config('tiny'))
  images = jnp.zeros((2, height, width, 3))
  token_map, skips, aux = jax.eval_shape(
      lambda: encoder.init_with_output(jax.random.key(0), images, train=False)[0])
  h, w = height // 16, width // 16
  assert token_map.shape == (2, h, w, 32)
  assert aux['stem'].shape == (2, height // 2, width // 2, 32)
  assert aux['block1'].shape == (2, height // 4, width // 4, 128)
  assert aux['block2'].shape == (2, height // 8, width // 8, 256)
  assert aux['block3'].shape == (2, h, w, 512)
  assert aux['tokens'].shape == (2, 1 + h * w, 32)  # Class token kept in the sequence.
  assert aux['encoded'].shape == (2, 32)
  assert skips[0] is None and skips[4] is None
  assert [s.shape for s in skips[1:4]] == [aux['block2'].shape, aux['block1'].shape,
                                           aux['stem'].shape]


def test_token_map_is_the_sequence_without_class_token(random_params):
  config = models.get_config('tiny', encoder={'resnet': {'num_layers': ()}}, patch_size=(16, 16))
  encoder = model_lib.build_encoder(config)
  images = np.random.default_rng(0).uniform(-1, 1, (1, 32, 48, 3)).astype(np.float32)
  params = random_params(encoder, images, train=False)
  token_map, skips, aux = encoder.apply({'params': params}, images, train=False)
  assert skips == (None,) * 5  # Pure ViT: no skips.
  assert params['embedding']['kernel'].shape == (16, 16, 3, 32)
  # Row-major: token 1 + (i * w + j) is position (i, j) of the 2x3 map.
  np.testing.assert_array_equal(np.asarray(token_map[0, 1, 2]), np.asarray(aux['tokens'][0, 6]))
  np.testing.assert_array_equal(np.asarray(aux['encoded'][0]), np.asarray(aux['tokens'][0, 0]))


def test_no_class_token_variant_has_no_cls_parameter():
  config = models.get_config('tiny', classifier='none')
  encoder = model_lib.build_encoder(config)
  params = jax.eval_shape(lambda: encoder.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False))['params']
  assert 'cls' not in params
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 4, 32)


@pytest.mark.parametrize('shape', [(1, 40, 32, 3), (1, 32, 32, 1)])
def test_bad_image_shapes_raise_clear_errors(shape):
  model = models.build_model(models.get_config('tiny'), task='segment', num_classes=3)
  match = r'multiples of 16 .*got 40x32.*48x32' if shape[1] == 40 else r'\[B, H, W, 3\]'
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def test_fused_attention_equals_flax_attention_with_the_same_parameter_names():
  rng = np.random.default_rng(0)
  tokens = rng.normal(size=(2, 17, 32)).astype(np.float32)
  blocks = {impl: vit.Encoder1DBlock(64, 4, 0.0, 0.0, attention_implementation=impl)
            for impl in ('flax', 'auto', 'xla')}
  params = blocks['flax'].init(jax.random.key(0), tokens, True)['params']
  attention = params['MultiHeadDotProductAttention_0']
  assert sorted(attention) == ['key', 'out', 'query', 'value']  # vision_transformer's names.
  assert attention['query']['kernel'].shape == (32, 4, 8)
  reference = blocks['flax'].apply({'params': params}, tokens, True)
  for impl in ('auto', 'xla'):
    shapes = jax.eval_shape(lambda b=blocks[impl]: b.init(jax.random.key(0), tokens, True))
    assert jax.tree.structure(shapes['params']) == jax.tree.structure(params)
    out = blocks[impl].apply({'params': params}, tokens, True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="one of \\('auto', 'xla', 'cudnn', 'flax'\\)"):
    vit.attention_fn('fused')


def test_fused_attention_refuses_attention_dropout():
  config = models.get_config('tiny', attention_dropout_rate=0.1)
  model = models.build_model(config, task='denoise')
  with pytest.raises(ValueError, match="no attention dropout.*attention_implementation='flax'"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
