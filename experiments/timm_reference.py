"""timm's ViT and R50+ViT with random weights: the reference of the timm loader's parity checks.

Used by tests/models/test_timm_weights.py (tiny models of the same timm classes) and by
experiments/benchmarks/timm_parity.py (the full-size `vit_base_r50_s16_224`). Nothing is
downloaded: every model is built with `pretrained=False` or from timm's classes directly.

timm 1.0 imports torchvision at module level (`FrozenBatchNorm2d`, data transforms) though its
ViT / ResNetV2 code never calls it, and PyPI's torchvision does not import beside the CPU build
of torch that the tests use. `import_timm` therefore puts a stand-in `torchvision` into
`sys.modules` when none is installed; the model code that runs is timm's own.
"""

import enum
import functools
import importlib.util
import sys
import types


def _install_torchvision_stand_in():
  """Registers empty `torchvision` modules answering every name timm imports at module level."""
  def module(name):
    mod = types.ModuleType(name)
    mod.__path__ = []  # A package, so that submodule imports resolve through sys.modules.

    def getattr_(attr):
      if attr.startswith('__'):
        raise AttributeError(attr)
      return type(attr, (), {'__module__': name})  # A class nobody instantiates here.
    mod.__getattr__ = getattr_
    return mod

  names = ('torchvision', 'torchvision.ops', 'torchvision.ops.misc', 'torchvision.transforms',
           'torchvision.transforms.functional', 'torchvision.datasets')
  mods = {name: module(name) for name in names}
  for name, mod in mods.items():
    parent, _, child = name.rpartition('.')
    if parent:
      setattr(mods[parent], child, mod)
  # timm.data builds a dict keyed by these members at import time.
  interpolation = enum.Enum('InterpolationMode', {
      'NEAREST': 'nearest', 'NEAREST_EXACT': 'nearest-exact', 'BILINEAR': 'bilinear',
      'BICUBIC': 'bicubic', 'BOX': 'box', 'HAMMING': 'hamming', 'LANCZOS': 'lanczos'})
  mods['torchvision.transforms'].InterpolationMode = interpolation
  mods['torchvision.transforms.functional'].InterpolationMode = interpolation
  sys.modules.update(mods)


def import_timm():
  """Returns the `timm` module (with a torchvision stand-in where torchvision is absent)."""
  if 'timm' not in sys.modules and importlib.util.find_spec('torchvision') is None:
    _install_torchvision_stand_in()
  import timm  # pylint: disable=g-import-not-at-top
  return timm


def vit_std_conv():
  """timm's StdConv2dSame with vision_transformer's standardisation `(w - mean) / (std + 1e-5)`.

  timm's hybrid uses `(w - mean) / sqrt(var + 1e-8)`; the weights were trained with this one.
  """
  import_timm()
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from timm.layers import std_conv  # pylint: disable=g-import-not-at-top

  class VitStdConv2dSame(std_conv.StdConv2dSame):

    def forward(self, x):
      if self.same_pad:
        x = std_conv.pad_same(x, self.kernel_size, self.stride, self.dilation)
      w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
      w = w / (torch.std(w, dim=(1, 2, 3), keepdim=True, unbiased=False) + 1e-5)
      return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

  return VitStdConv2dSame


def build_vit(*, hybrid: bool, img_size=224, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
              layers=(3, 4, 9), width_factor=1.0, num_classes=0, vit_semantics=True):
  """timm's VisionTransformer (pure ViT-x/16 or with HybridEmbed over ResNetV2), random weights.

  With `hybrid=True` and the defaults this is `timm.create_model('vit_base_r50_s16_224')`'s
  architecture; smaller sizes give a tiny model of the same classes and key layout.

  Args:
    vit_semantics: True builds it with vision_transformer's semantics (weight standardisation
      `std + 1e-5`, GroupNorm eps 1e-6, tanh GELU), what this package's encoder computes; False
      with timm's defaults for `vit_base_r50_s16_224` (`sqrt(var + 1e-8)`, eps 1e-5, exact GELU).
  """
  timm = import_timm()
  import torch  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
  from timm.models import resnetv2  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  del timm
  if vit_semantics:
    conv_layer, gn_eps = vit_std_conv(), 1e-6
    act_layer = functools.partial(torch.nn.GELU, approximate='tanh')
  else:
    conv_layer, gn_eps = functools.partial(StdConv2dSame, eps=1e-8), 1e-5
    act_layer = None  # timm's default: exact GELU.
  kwargs = dict(img_size=img_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                mlp_ratio=mlp_ratio, num_classes=num_classes, class_token=True,
                global_pool='token', act_layer=act_layer)
  if hybrid:
    backbone = resnetv2.ResNetV2(
        layers=layers, num_classes=0, global_pool='', preact=False, stem_type='same',
        width_factor=width_factor, conv_layer=conv_layer,
        norm_layer=functools.partial(GroupNormAct, num_groups=32, eps=gn_eps))
    kwargs.update(patch_size=1, embed_layer=functools.partial(HybridEmbed, backbone=backbone))
  else:
    kwargs.update(patch_size=16)
  return vision_transformer.VisionTransformer(**kwargs).eval()


def stage_features(model, images):
  """timm hybrid's ResNet features `{'stem': ..., 'block1': ..., ...}` as NHWC numpy arrays."""
  import torch  # pylint: disable=g-import-not-at-top
  backbone = model.patch_embed.backbone
  out = {}
  with torch.no_grad():
    x = torch.as_tensor(images).permute(0, 3, 1, 2)
    x = backbone.stem.norm(backbone.stem.conv(x))
    out['stem'] = x
    x = backbone.stem.pool(x)
    for i, stage in enumerate(backbone.stages):
      x = stage(x)
      out[f'block{i + 1}'] = x
  return {k: v.permute(0, 2, 3, 1).numpy() for k, v in out.items()}


def logits(model, images):
  """timm's class logits for NHWC float32 numpy images."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return model(torch.as_tensor(images).permute(0, 3, 1, 2)).numpy()


def randomize_(model, seed=0):
  """Re-draws every parameter so that norms and biases are not the trivial 1 / 0 (in place)."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2 and not name.endswith(('pos_embed', 'cls_token')):
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
      elif name.endswith('weight'):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
  return model
