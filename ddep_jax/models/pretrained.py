"""ImageNet-21k encoder checkpoints: vision_transformer / TransUNet `.npz` files, and timm's copies.

`load_pretrained` is the one entry point (`config.init_from.npz`): an `.npz` (below), a timm
`.safetensors` / `.pth` / `.bin` state dict, or `hf-hub:timm/<name>`; timm's layout is converted
by `timm_weights.py`.

The released files (`R50+ViT-B_16.npz`, `ViT-B_16.npz`, ... from gs://vit_models/imagenet21k/;
TransUNet uses the same `R50+ViT-B_16.npz`) are flat `np.savez` archives keyed by '/'-joined
parameter paths:

* `conv_root/kernel`, `gn_root/{scale,bias}`, `block{i}/unit{k}/{conv*,gn*}/...` (hybrids),
  `embedding/{kernel,bias}`, `cls`, `Transformer/posembed_input/pos_embedding`,
  `Transformer/encoder_norm/...`;
* pre-Linen names inside the transformer layers: `Transformer/encoderblock_{i}/{LayerNorm_0,
  MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3}` (Linen numbers submodules per
  class: `LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0`);
* GroupNorm `scale` / `bias` stored as `(1, 1, 1, C)` in the older files;
* the classifier at the top: `pre_logits/{kernel,bias}` (representation 768 for ImageNet-21k)
  and `head/{kernel,bias}` (21843 classes).

`load_pretrained` reads such a file, converts it to this package's tree (`encoder/...`,
`head/pre_logits/...`, `head/{kernel,bias}`), resamples the position embedding to the model's
token grid, and merges it into freshly initialised parameters. Dropping the classifier is
explicit (`drop_head=True`); anything else that does not fit raises one error naming every
offending path with both shapes.
"""

import io
import math
import re
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import flax
from flax.training import checkpoints as flax_checkpoints
import ml_collections
import numpy as np
import scipy.ndimage

from ddep_jax import fileio
from ddep_jax import parameters
from ddep_jax.models import model as model_lib
from ddep_jax.models import timm_weights

POSEMB_PATH = 'encoder/Transformer/posembed_input/pos_embedding'
CLS_PATH = 'encoder/cls'

# The GroupNorm modules of the ResNet: `gn_root`, `gn_proj`, `gn1`, `gn2`, `gn3`.
GROUPNORM_RE = re.compile(r'(^|/)gn(\d+|_root|_proj)/(scale|bias)$')
_DOWNLOAD_HINT = ('Download the ImageNet-21k checkpoint, e.g. '
                  '`gsutil cp gs://vit_models/imagenet21k/R50+ViT-B_16.npz .`, and point '
                  '`config.init_from.npz` at it; or use timm\'s copy of the same weights: '
                  '`config.init_from.npz=hf-hub:timm/vit_base_r50_s16_224.orig_in21k` (README, '
                  '"Pretrained encoders").')


def read_npz(path: str) -> dict[str, Any]:
  """Reads an `.npz` (local or gs://) into a nested dict of numpy arrays, keys as stored."""
  path = str(path)
  if not fileio.exists(path):
    raise FileNotFoundError(f'Pretrained checkpoint not found: {path}. {_DOWNLOAD_HINT}')
  with np.load(io.BytesIO(fileio.read_bytes(path)), allow_pickle=False) as npz:
    flat = {tuple(key.split('/')): npz[key] for key in npz.files}
  return flax.traverse_util.unflatten_dict(flat)


def convert_vit_params(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Converts a vision_transformer checkpoint tree into `{'encoder': ..., 'head': ...}`.

  Renames pre-Linen transformer submodules to Linen names (`flax.training.checkpoints.
  convert_pre_linen`; already-Linen files pass unchanged), squeezes `(1, 1, 1, C)` GroupNorm
  parameters to `(C,)`, and moves the top-level `pre_logits` and `head` under `head/`
  (`head/pre_logits/...`, `head/kernel`, `head/bias`). `head` is absent if the file has none.
  """
  tree = flax_checkpoints.convert_pre_linen(dict(tree))
  flat = flax.traverse_util.flatten_dict(tree, sep='/')
  out = {}
  for path, value in flat.items():
    value = np.asarray(value)
    if GROUPNORM_RE.search(path) and value.ndim == 4 and value.shape[:3] == (1, 1, 1):
      value = value.reshape(value.shape[-1])
    if path.startswith('pre_logits/'):
      path = 'head/' + path
    elif not path.startswith('head/'):
      path = 'encoder/' + path
    out[path] = value
  return flax.traverse_util.unflatten_dict(out, sep='/')


def resample_posemb(posemb: np.ndarray, new_grid: Sequence[int], *, has_class_token: bool,
                    keep_class_token: bool, old_grid: Optional[Sequence[int]] = None) -> np.ndarray:
  """Resamples a `(1, N, D)` position embedding to the `new_grid` (h, w) of tokens.

  The class slot (first token, when `has_class_token`) is kept or dropped, then the grid part is
  interpolated with `scipy.ndimage.zoom(order=1)`, as vision_transformer does. `old_grid`
  defaults to the square grid of the stored tokens.

  Returns:
    `(1, keep_class_token + h * w, D)` float32.
  """
  posemb = np.asarray(posemb, np.float32)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f'pos_embedding must be (1, tokens, D); got {posemb.shape}.')
  if keep_class_token and not has_class_token:
    raise ValueError('The model has a class token but the checkpoint position embedding has no '
                     'class slot; set model.encoder.classifier="none" or load a checkpoint with '
                     'a class token.')
  num_prefix = 1 if has_class_token else 0
  prefix, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  if old_grid is None:
    side = math.isqrt(grid.shape[0])
    if side * side != grid.shape[0]:
      raise ValueError(f'pos_embedding has {grid.shape[0]} grid tokens, not a square grid; pass '
                       f'old_grid=(h, w).')
    old_grid = (side, side)
  old_h, old_w = old_grid
  new_h, new_w = new_grid
  if old_h * old_w != grid.shape[0]:
    raise ValueError(f'old_grid {tuple(old_grid)} does not match the {grid.shape[0]} grid '
                     f'tokens of pos_embedding {posemb.shape}.')
  grid = grid.reshape(old_h, old_w, -1)
  if (old_h, old_w) != (new_h, new_w):
    grid = scipy.ndimage.zoom(grid, (new_h / old_h, new_w / old_w, 1), order=1)
  grid = grid.reshape(1, new_h * new_w, -1)
  parts = [prefix, grid] if keep_class_token else [grid]
  return np.concatenate(parts, axis=1).astype(np.float32)


def token_grid(model_config: ml_collections.ConfigDict, image_size: Sequence[int]
               ) -> tuple[int, int]:
  """The (h, w) token grid of the ViT encoder of `model_config` on images of `image_size` (H, W)."""
  stride = model_lib.build_encoder(model_config).output_stride
  return (image_size[0] // stride, image_size[1] // stride)


def resample_position_embedding(loaded: Mapping[str, Any], model_params: Mapping[str, Any],
                                grid_size: Optional[Sequence[int]] = None) -> dict[str, Any]:
  """`loaded` with its position embedding resampled to the model's token grid, once, at load.

  Checkpoints come at other resolutions than the run (ImageNet-21k and DDeP at 224, fine-tuning
  on 512 or 1024 crops), so the stored grid (taken as square) is interpolated as
  vision_transformer does when fine-tuning at a new resolution (`resample_posemb`). The class
  slot is read when `loaded` has a class token and kept when the model has one. `loaded` comes
  back as it is when the shapes agree already, or differ in more than the token count (then
  `parameters.merge_params` names both shapes).

  Args:
    loaded: parameters to put into the model (an earlier stage's, or `convert_vit_params`').
    model_params: the model's parameters (or their shapes).
    grid_size: the model's token grid (h, w) (`token_grid`); by default the square grid of the
      model's `pos_embedding`.
  """
  loaded_flat = parameters.flatten(loaded)
  model_flat = parameters.flatten(model_params)
  if POSEMB_PATH not in loaded_flat or POSEMB_PATH not in model_flat:
    return dict(loaded)
  old, new = np.shape(loaded_flat[POSEMB_PATH]), np.shape(model_flat[POSEMB_PATH])
  if old == new or len(old) != 3 or len(new) != 3 or old[-1] != new[-1]:
    return dict(loaded)
  keep_class_token = CLS_PATH in model_flat
  if grid_size is None:
    num_grid = new[1] - int(keep_class_token)
    side = math.isqrt(num_grid)
    if side * side != num_grid:
      raise ValueError(f'{POSEMB_PATH}: the model grid of {num_grid} tokens is not square; '
                       f'pass image_size=(H, W) to load_pretrained (or the token grid '
                       f'(H/16, W/16) as grid_size).')
    grid_size = (side, side)
  logging.info('Resampling %s from %s to grid %s.', POSEMB_PATH, old, tuple(grid_size))
  loaded_flat[POSEMB_PATH] = resample_posemb(
      loaded_flat[POSEMB_PATH], grid_size, has_class_token=CLS_PATH in loaded_flat,
      keep_class_token=keep_class_token)
  return parameters.unflatten(loaded_flat)


def merge_pretrained(init_params: Mapping[str, Any], loaded: Mapping[str, Any], *,
                     drop_head: bool, grid_size: Optional[Sequence[int]] = None
                     ) -> dict[str, Any]:
  """Merges `loaded` (e.g. `convert_vit_params` output) into freshly initialised parameters.

  Every top-level section of `loaded` (`encoder`, `head`, ...) replaces the one of `init_params`
  path by path (`parameters.merge_params`); sections absent from `loaded` (the `decoder`) keep
  their initial values. The position embedding is resampled to the model's grid first
  (`resample_position_embedding`), and a class token the model does not have is dropped.

  Args:
    init_params: the model's parameters from `model.init` (their shapes are the contract).
    loaded: parameters to put in, same layout as `init_params`.
    drop_head: True keeps the model's freshly initialised `head` (and `pre_logits`) and ignores
      the checkpoint's classifier: what fine-tuning on a new task or a dense model needs. False
      loads the checkpoint's head too (evaluating an ImageNet-21k classifier); its shapes must
      then match.
    grid_size: the model's token grid (h, w) for resampling the position embedding; by default
      the square grid of the model's `pos_embedding`.

  Returns:
    A new nested dict like `init_params`.

  Raises:
    parameters.ParamsMismatchError naming every path in the checkpoint but not in the model, in
    the model but not in the checkpoint, or with mismatched shapes (both shapes given).
  """
  loaded_flat = parameters.flatten(
      resample_position_embedding(loaded, init_params, grid_size))
  if drop_head:
    dropped = sorted(k for k in loaded_flat if k.startswith('head/'))
    if dropped:
      logging.info('merge_pretrained: drop_head=True, not loading %s', dropped)
    loaded_flat = {k: v for k, v in loaded_flat.items() if not k.startswith('head/')}
  if CLS_PATH in loaded_flat and CLS_PATH not in parameters.flatten(init_params):
    # The model runs without a class token: its position embedding slot went too (above).
    logging.info('merge_pretrained: the model has no class token; dropping %s.', CLS_PATH)
    del loaded_flat[CLS_PATH]
  sections = {k.split('/')[0] for k in loaded_flat}
  if not drop_head:  # Loading the head was asked for: the checkpoint must have it.
    sections.add('head')
  try:
    return parameters.merge_params(init_params, parameters.unflatten(loaded_flat),
                                   [re.escape(s) + '(/.*)?' for s in sorted(sections)])
  except parameters.ParamsMismatchError as e:
    if not any(k.startswith('head/') for k in e.paths):
      raise
    raise parameters.ParamsMismatchError(
        f'{e}\nTo fine-tune with a new head (or a dense model), pass drop_head=True; to '
        'evaluate the ImageNet-21k classifier, build a classify model with '
        'model.encoder.representation_size=768 and num_classes=21843.', e.paths) from None


def load_pretrained(init_params: Mapping[str, Any], path: str,
                    model_config: Optional[ml_collections.ConfigDict] = None, *, drop_head: bool,
                    image_size: Optional[Sequence[int]] = None) -> dict[str, Any]:
  """Loads pretrained encoder weights from any of the sources below into the model's parameters.

  Argument order as big_vision's `load(init_params, init_file, model_cfg)`. `path` is one of:

  * a vision_transformer / TransUNet `.npz` (`R50+ViT-B_16.npz`; local path or gs://);
  * a timm state dict: `.safetensors` (read without torch), `.pth` / `.bin` (needs torch; read
    with `weights_only=True`), converted by `timm_weights.convert_timm_params`;
  * `hf-hub:timm/<name>`, e.g. `hf-hub:timm/vit_base_r50_s16_224.orig_in21k`: that repo's
    `model.safetensors` from the Hugging Face Hub cache (downloaded when the network allows).

  Args:
    init_params: `model.init(...)['params']` of the model to load into (host arrays are best:
      the result is numpy and the caller shards it).
    path: the checkpoint, as above.
    model_config: the `config.model` section; with `image_size`, gives the token grid.
    drop_head: see `merge_pretrained`; required, so that dropping the classifier is a
      decision.
    image_size: (H, W) the model runs at, for a non-square position-embedding grid.

  Returns:
    `init_params` with `encoder` (and `head` unless dropped) from the checkpoint.
  """
  grid_size = None
  if image_size is not None:
    if model_config is None:
      raise ValueError('load_pretrained(image_size=...) needs model_config for the encoder '
                       'output stride.')
    grid_size = token_grid(model_config, image_size)
  loaded, sources = read_pretrained(path, init_params)
  try:
    return merge_pretrained(init_params, loaded, drop_head=drop_head, grid_size=grid_size)
  except ValueError as e:
    message = str(e)
    named = [f'  {p} <- {key}' for p, key in sources.items() if p in message]
    if named:
      message += '\nConverted from these tensors of the file:\n' + '\n'.join(named)
    raise ValueError(f'Loading {path}: {message}') from None


def read_pretrained(path: str, init_params: Optional[Mapping[str, Any]] = None
                    ) -> tuple[dict[str, Any], dict[str, str]]:
  """Reads any source of `load_pretrained` into this package's layout, not yet merged.

  Returns:
    `(tree, sources)`: `{'encoder': ..., 'head': ...}` and, for timm files, `{path here: the
    file's key and shape}` (empty for `.npz` files, whose keys are the paths).
  """
  if path.startswith(timm_weights.HUB_PREFIX):
    path = timm_weights.hub_file(path)
  if path.lower().endswith('.npz'):
    return convert_vit_params(read_npz(path)), {}
  return timm_weights.convert_timm_params(timm_weights.read_state_dict(path),
                                          num_heads=_num_heads(init_params, path))


def _num_heads(init_params: Optional[Mapping[str, Any]], path: str) -> int:
  """The attention heads of the model, read off its first query kernel `[D, heads, D / heads]`."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(init_params or {}), sep='/')
  for key, value in flat.items():
    if key.endswith('MultiHeadDotProductAttention_0/query/kernel'):
      return np.shape(value)[1]
  raise ValueError(f'{path}: a timm checkpoint needs the parameters of a ViT encoder to load '
                   f'into (their query kernels give the number of attention heads).')
