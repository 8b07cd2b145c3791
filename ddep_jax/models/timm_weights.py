"""timm checkpoints (the ImageNet-21k weights as PyTorch state dicts) -> vision_transformer names.

Most code that needs the paper's R50+ViT-B/16 today takes it from timm on the Hugging Face Hub
(`timm/vit_base_r50_s16_224.orig_in21k`; pure ViT-B/16: `timm/vit_base_patch16_224.orig_in21k`
or `.augreg_in21k`). Their state dicts hold the tensors of the released `.npz` files under
PyTorch names and layouts; `convert_timm_params` maps every one of them onto this package's
tree (`encoder/...`, `head/...`), so `pretrained.merge_pretrained` loads them as it loads an `.npz`:

| timm | here |
|---|---|
| `patch_embed.backbone.stem.conv.weight` (OIHW) | `encoder/conv_root/kernel` (HWIO) |
| `patch_embed.backbone.stem.norm.{weight,bias}` | `encoder/gn_root/{scale,bias}` |
| `patch_embed.backbone.stages.{s}.blocks.{b}.conv{n}` / `norm{n}` | `encoder/block{s+1}/unit{b+1}/conv{n}` / `gn{n}` |
| `....downsample.{conv,norm}` | `....conv_proj`, `....gn_proj` |
| `patch_embed.proj.{weight,bias}` | `encoder/embedding/{kernel,bias}` |
| `cls_token`, `pos_embed` (class slot first) | `encoder/cls`, `encoder/Transformer/posembed_input/pos_embedding` |
| `blocks.{i}.norm1`, `norm2` | `encoderblock_{i}/LayerNorm_0`, `LayerNorm_1` |
| `blocks.{i}.attn.qkv` (fused, `[3 * D, D]`) | `encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value}` (`[D, heads, D / heads]`) |
| `blocks.{i}.attn.proj` | `....MultiHeadDotProductAttention_0/out` (`[heads, D / heads, D]`) |
| `blocks.{i}.mlp.fc1`, `fc2` | `encoderblock_{i}/MlpBlock_0/Dense_0`, `Dense_1` |
| `norm` | `encoder/Transformer/encoder_norm` |
| `head` (absent from the `in21k` files), `pre_logits.fc` (older timm) | `head`, `head/pre_logits` |

A tensor with no place in that table (layer scale, register tokens, q/k norms, a pre-activation
ResNet's final norm, ...) is an error naming it and its shape: nothing is skipped silently.

Semantics. This package keeps vision_transformer's (the weights were trained in it): weight
standardisation `(w - mean) / (std + 1e-5)`, GroupNorm eps 1e-6, tanh-approximated GELU. timm's
`vit_base_r50_s16_224` standardises with `(w - mean) / sqrt(var + 1e-8)`, uses GroupNorm eps 1e-5
and exact GELU, so its forward drifts slightly from the original model's (docs/design.md,
"Pretrained encoders", gives the measured figures); the tensors themselves are the same.

Reading needs no torch for `.safetensors`: the format is a contract simple enough to read here
(`read_safetensors`), including the bfloat16 files the Hub often holds, which the `safetensors`
package's numpy API refuses. `.pth` / `.bin` state dicts are PyTorch pickles: they are read with
`torch.load(weights_only=True)`, which unpickles tensors and containers only, and need torch.
Floating tensors of every source are returned as float32.
"""

import json
import re
from typing import Any, Callable, Mapping, Optional

from etils import epath
import flax
import ml_dtypes
import numpy as np

HUB_PREFIX = 'hf-hub:'
HUB_FILENAME = 'model.safetensors'
SAFETENSORS_SUFFIXES = ('.safetensors',)
TORCH_SUFFIXES = ('.pth', '.pt', '.bin')


def _kernel_oihw(w):
  """PyTorch conv weight `[O, I, H, W]` -> flax kernel `[H, W, I, O]`."""
  return np.transpose(w, (2, 3, 1, 0))


def _dense(w):
  """PyTorch Linear weight `[out, in]` -> flax Dense kernel `[in, out]`."""
  return np.transpose(w)


def _same(w):
  return w


# (regex on the timm key, replacement giving the path here, value transform). The first match wins.
_RULES: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray]], ...] = (
    (r'cls_token', r'encoder/cls', _same),
    (r'pos_embed', r'encoder/Transformer/posembed_input/pos_embedding', _same),
    (r'patch_embed\.proj\.weight', r'encoder/embedding/kernel', _kernel_oihw),
    (r'patch_embed\.proj\.bias', r'encoder/embedding/bias', _same),
    (r'patch_embed\.backbone\.stem\.conv\.weight', r'encoder/conv_root/kernel', _kernel_oihw),
    (r'patch_embed\.backbone\.stem\.norm\.weight', r'encoder/gn_root/scale', _same),
    (r'patch_embed\.backbone\.stem\.norm\.bias', r'encoder/gn_root/bias', _same),
    (r'patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.conv(\d)\.weight',
     r'encoder/block{s}/unit{b}/conv\3/kernel', _kernel_oihw),
    (r'patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm(\d)\.weight',
     r'encoder/block{s}/unit{b}/gn\3/scale', _same),
    (r'patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm(\d)\.bias',
     r'encoder/block{s}/unit{b}/gn\3/bias', _same),
    (r'patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.downsample\.conv\.weight',
     r'encoder/block{s}/unit{b}/conv_proj/kernel', _kernel_oihw),
    (r'patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.downsample\.norm\.weight',
     r'encoder/block{s}/unit{b}/gn_proj/scale', _same),
    (r'patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.downsample\.norm\.bias',
     r'encoder/block{s}/unit{b}/gn_proj/bias', _same),
    (r'blocks\.(\d+)\.norm1\.weight',
     r'encoder/Transformer/encoderblock_\1/LayerNorm_0/scale', _same),
    (r'blocks\.(\d+)\.norm1\.bias', r'encoder/Transformer/encoderblock_\1/LayerNorm_0/bias', _same),
    (r'blocks\.(\d+)\.norm2\.weight',
     r'encoder/Transformer/encoderblock_\1/LayerNorm_1/scale', _same),
    (r'blocks\.(\d+)\.norm2\.bias', r'encoder/Transformer/encoderblock_\1/LayerNorm_1/bias', _same),
    (r'blocks\.(\d+)\.mlp\.fc1\.weight',
     r'encoder/Transformer/encoderblock_\1/MlpBlock_0/Dense_0/kernel', _dense),
    (r'blocks\.(\d+)\.mlp\.fc1\.bias',
     r'encoder/Transformer/encoderblock_\1/MlpBlock_0/Dense_0/bias', _same),
    (r'blocks\.(\d+)\.mlp\.fc2\.weight',
     r'encoder/Transformer/encoderblock_\1/MlpBlock_0/Dense_1/kernel', _dense),
    (r'blocks\.(\d+)\.mlp\.fc2\.bias',
     r'encoder/Transformer/encoderblock_\1/MlpBlock_0/Dense_1/bias', _same),
    (r'norm\.weight', r'encoder/Transformer/encoder_norm/scale', _same),
    (r'norm\.bias', r'encoder/Transformer/encoder_norm/bias', _same),
    (r'head\.weight', r'head/kernel', _dense),
    (r'head\.bias', r'head/bias', _same),
    (r'pre_logits\.fc\.weight', r'head/pre_logits/kernel', _dense),
    (r'pre_logits\.fc\.bias', r'head/pre_logits/bias', _same),
)
_ATTENTION_RE = re.compile(r'blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)')
_ATTENTION_PATH = 'encoder/Transformer/encoderblock_{}/MultiHeadDotProductAttention_0'


def _place(key: str) -> Optional[tuple[str, Callable[[np.ndarray], np.ndarray]]]:
  """Returns (path here, transform) for a non-attention timm key, or None."""
  for pattern, replacement, transform in _RULES:
    match = re.fullmatch(pattern, key)
    if match:
      path = match.expand(replacement)
      if '{s}' in path:  # timm counts stages and blocks from 0, vision_transformer from 1.
        path = path.format(s=int(match.group(1)) + 1, b=int(match.group(2)) + 1)
      return path, transform
  return None


def _attention(layer: str, kind: str, param: str, value: np.ndarray, num_heads: int,
               key: str) -> dict[str, np.ndarray]:
  """Splits timm's fused qkv (or reshapes its proj) into flax's per-head attention params."""
  base = _ATTENTION_PATH.format(layer)
  if kind == 'qkv':
    if value.shape[0] % 3:
      raise ValueError(f'{key} {value.shape}: a fused qkv must have 3 * D rows.')
    hidden = value.shape[0] // 3
    if hidden % num_heads:
      raise ValueError(f'{key} {value.shape}: D = {hidden} is not divisible by '
                       f'model.encoder.num_heads = {num_heads}.')
    head_dim = hidden // num_heads
    out = {}
    # timm's rows are [q; k; v], each `D` rows ordered (head, head_dim).
    for name, part in zip(('query', 'key', 'value'), np.split(value, 3, axis=0)):
      if param == 'weight':  # [D_out, D_in] -> [D_in, heads, head_dim]
        out[f'{base}/{name}/kernel'] = part.T.reshape(part.shape[1], num_heads, head_dim)
      else:
        out[f'{base}/{name}/bias'] = part.reshape(num_heads, head_dim)
    return out
  if param == 'weight':  # proj: [D_out, D_in] -> [heads, head_dim, D_out]
    hidden = value.shape[1]
    if hidden % num_heads:
      raise ValueError(f'{key} {value.shape}: D = {hidden} is not divisible by '
                       f'model.encoder.num_heads = {num_heads}.')
    return {f'{base}/out/kernel': value.T.reshape(num_heads, hidden // num_heads, -1)}
  return {f'{base}/out/bias': value}


def convert_timm_params(state_dict: Mapping[str, Any], *, num_heads: int
                        ) -> tuple[dict[str, Any], dict[str, str]]:
  """Converts a timm ViT / R50+ViT state dict into `{'encoder': ..., 'head': ...}`.

  Args:
    state_dict: `{timm key: array}` (numpy, or anything `np.asarray` takes).
    num_heads: attention heads of the model (`model.encoder.num_heads`), to split qkv per head.

  Returns:
    `(tree, sources)`: the nested tree in this package's layout (float32, flax layouts), and
    `{path here: timm key}` for error messages.

  Raises:
    ValueError naming every timm key (and its shape) that has no place in the layout.
  """
  flat, sources, unplaced = {}, {}, []
  for key, value in state_dict.items():
    value = np.asarray(value, dtype=np.float32)
    match = _ATTENTION_RE.fullmatch(key)
    if match:
      placed = _attention(match.group(1), match.group(2), match.group(3), value, num_heads, key)
    else:
      rule = _place(key)
      if rule is None:
        unplaced.append(f'  {key} {tuple(value.shape)}')
        continue
      path, transform = rule
      placed = {path: transform(value)}
    for path, array in placed.items():
      flat[path] = array
      sources[path] = f'{key} {tuple(value.shape)}'
  if unplaced:
    raise ValueError('These timm tensors have no place in the vision_transformer layout (this '
                     'converter knows timm ViT and R50+ViT hybrids without layer scale, register '
                     'tokens or q/k norms):\n' + '\n'.join(unplaced))
  return flax.traverse_util.unflatten_dict(flat, sep='/'), sources


# The dtype names of the safetensors header; floating types are returned as float32.
_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
  """The tensors of a `.safetensors` file's bytes (floating ones as float32).

  The format (huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
  `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
  little-endian, C-ordered tensor data; offsets count from the end of the header.
  """
  if len(data) < 8:
    raise ValueError(f'{len(data)} bytes: too short for a header.')
  header_size = int.from_bytes(data[:8], 'little')
  if 8 + header_size > len(data):
    raise ValueError(f'its header claims {header_size} bytes; the file has {len(data)}.')
  try:
    header = json.loads(data[8:8 + header_size])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'its header is not JSON ({e}).') from None
  body = memoryview(data)[8 + header_size:]
  tensors = {}
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    dtype = _SAFETENSORS_DTYPES.get(entry.get('dtype'))
    if dtype is None:
      raise ValueError(f'tensor {name!r} has dtype {entry.get("dtype")!r}; readable: '
                       f'{sorted(_SAFETENSORS_DTYPES)}.')
    begin, end = entry['data_offsets']
    shape = tuple(entry['shape'])
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if end - begin != size or end > len(body):
      raise ValueError(f'tensor {name!r} ({entry["dtype"]} {list(shape)}) needs {size} bytes at '
                       f'[{begin}, {end}); the data holds {len(body)} (truncated file?).')
    stored = np.dtype(dtype)
    if stored.itemsize > 1 and dtype is not ml_dtypes.bfloat16:  # ml_dtypes are native-order.
      stored = stored.newbyteorder('<')
    array = np.frombuffer(body[begin:end], dtype=stored).reshape(shape)
    floating = dtype is ml_dtypes.bfloat16 or np.issubdtype(stored, np.floating)
    tensors[name] = array.astype(np.float32 if floating else stored.newbyteorder('='))
  return tensors


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` (no torch needed) or a `.pth` / `.bin` state dict into numpy arrays.

  `.pth` / `.bin` files are read with `torch.load(weights_only=True)`: tensors and plain
  containers only, no arbitrary objects. A checkpoint dict holding the weights under
  `state_dict`, `model` or `state_dict_ema` is unwrapped.
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'Pretrained checkpoint not found: {path}.')
  suffix = path.suffix.lower()
  if suffix in SAFETENSORS_SUFFIXES:
    try:
      return read_safetensors(path.read_bytes())
    except ValueError as e:
      raise ValueError(f'{path} is not a readable .safetensors file: {e}') from e
  if suffix in TORCH_SUFFIXES:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f'{path} is a PyTorch pickle; reading it needs torch '
                        f'(`pip install torch`, the CPU build is enough), or convert it once to '
                        f'.safetensors (safetensors.torch.save_file) and load that.') from None
    with path.open('rb') as f:
      loaded = torch.load(f, map_location='cpu', weights_only=True)
    for wrapper in ('state_dict', 'model', 'state_dict_ema'):
      if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
        loaded = loaded[wrapper]
        break
    if not isinstance(loaded, dict):
      raise ValueError(f'{path} holds a {type(loaded).__name__}, not a state dict.')
    return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
            for k, v in loaded.items() if isinstance(v, torch.Tensor)}
  raise ValueError(f'{path}: unknown checkpoint type {suffix!r}; expected .npz '
                   f'(vision_transformer), .safetensors, .pth or .bin (timm), or '
                   f'{HUB_PREFIX}timm/<name>.')


def hub_file(name: str) -> str:
  """Returns the local path of `hf-hub:<repo>`'s `model.safetensors`, downloading it if needed.

  Uses huggingface_hub's cache (`HF_HUB_CACHE`, `HF_HOME`); offline (`HF_HUB_OFFLINE=1` or no
  network) only a file already in the cache is found.
  """
  repo_id = name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else name
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f'{name}: loading from the Hugging Face Hub needs huggingface_hub '
                      f'(`pip install huggingface_hub`); or download '
                      f'https://huggingface.co/{repo_id}/resolve/main/{HUB_FILENAME} and point '
                      f'config.init_from.npz at the file.') from None
  try:
    return huggingface_hub.hf_hub_download(repo_id, HUB_FILENAME)
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f'{name}: could not get {HUB_FILENAME} of {repo_id} ({type(e).__name__}: {e}).\n'
        f'On a machine with network, fetch https://huggingface.co/{repo_id}/resolve/main/'
        f'{HUB_FILENAME} (or run `hf download {repo_id} {HUB_FILENAME}`, which puts it in the '
        f'Hub cache, here {constants.HF_HUB_CACHE}; copy that cache over or set HF_HUB_CACHE to '
        f'it), then set config.init_from.npz to the downloaded file, or keep {name} with the '
        f'cache in place.') from e
