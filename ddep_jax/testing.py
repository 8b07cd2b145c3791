"""Helpers for tests and smoke runs: checkpoints with the real key layout, written offline.

As vision_transformer's `test_utils.py`: `write_fake_npz` writes an ImageNet-21k `.npz` in the
released layout (pre-Linen names, `pre_logits`, `head`) with random values, so that loading
(`ddep_jax.models.pretrained`) is tested without downloading anything. Nothing in the library
imports this module.
"""

import io
from typing import Any, Mapping

import flax
import jax
import ml_collections
import numpy as np

from ddep_jax import fileio
from ddep_jax.models import model as model_lib
from ddep_jax.models import pretrained

# Linen -> released (pre-Linen) names inside `encoderblock_{i}`. Reading goes through flax's own
# `convert_pre_linen`, so the two directions are independent.
_PRE_LINEN_BLOCK_NAMES = {
    'LayerNorm_0': 'LayerNorm_0',
    'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
    'LayerNorm_1': 'LayerNorm_2',
    'MlpBlock_0': 'MlpBlock_3',
}


def to_released_names(params: Mapping[str, Any], *, groupnorm_4d: bool = False
                      ) -> dict[str, np.ndarray]:
  """Flat `{released npz key: array}` for this package's `encoder` / `head` parameters.

  The inverse of `pretrained.convert_vit_params`: pre-Linen names in the transformer layers,
  `pre_logits` and `head` at the top level, GroupNorm params as `(1, 1, 1, C)` when
  `groupnorm_4d`.
  """
  out = {}
  for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/').items():
    value = np.asarray(value)
    parts = path.split('/')
    if parts[0] == 'encoder':
      parts = parts[1:]
    elif parts[:2] == ['head', 'pre_logits']:
      parts = parts[1:]
    elif parts[0] != 'head':
      raise ValueError(f'{path}: only encoder/ and head/ parameters have a released name.')
    if len(parts) > 3 and parts[0] == 'Transformer' and parts[1].startswith('encoderblock_'):
      parts[2] = _PRE_LINEN_BLOCK_NAMES[parts[2]]
    key = '/'.join(parts)
    if groupnorm_4d and pretrained.GROUPNORM_RE.search(key):
      value = value.reshape(1, 1, 1, -1)
    out[key] = value
  return out


def write_fake_npz(path: str, model_config: ml_collections.ConfigDict, num_classes: int,
                   rng: np.random.Generator, *, image_size: int = 224,
                   groupnorm_4d: bool = False) -> dict[str, np.ndarray]:
  """Writes a checkpoint with the released key layout and random values (for tests).

  The layout is that of vision_transformer's classifier for `model_config` at `image_size`
  (square): its `encoder` plus `pre_logits` (if `encoder.representation_size`) and a
  `num_classes` `head`, under the released (pre-Linen) names. Kernels are N(0, 1/fan_in), norm
  scales 1 + N(0, 0.1^2), everything else N(0, 0.1^2), so that features are well scaled.

  Returns:
    The flat `{npz key: array}` that was written.
  """
  model = model_lib.build_model(model_config, task='classify', num_classes=num_classes)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  arrays = {}
  for key, spec in flax.traverse_util.flatten_dict(shapes['params'], sep='/').items():
    if key.endswith('/kernel'):
      value = rng.normal(size=spec.shape) / np.sqrt(np.prod(spec.shape[:-1]))
    elif key.endswith('/scale'):
      value = 1.0 + 0.1 * rng.normal(size=spec.shape)
    else:
      value = 0.1 * rng.normal(size=spec.shape)
    arrays[key] = value.astype(np.float32)
  released = to_released_names(flax.traverse_util.unflatten_dict(arrays, sep='/'),
                               groupnorm_4d=groupnorm_4d)
  buffer = io.BytesIO()
  np.savez(buffer, **released)
  fileio.write_bytes(str(path), buffer.getvalue())
  return released
