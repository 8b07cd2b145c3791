r"""Full-size parity of the timm loader: R50+ViT-B/16 (`vit_base_r50_s16_224`) vs timm's forward.

  PYTHONPATH=. python -m experiments.benchmarks.timm_parity [--batch=2] [--pure]

Builds timm's model with random weights (no download), saves its state dict as .safetensors,
times `pretrained.load_pretrained` on it (read + convert + merge), and prints the relative max
differences of the class logits and the ResNet stage features (block1/2/3) between this package's
encoder and timm's forward on the same float32 input: once with timm built with
vision_transformer's semantics (the mapping check) and once with timm's defaults (the drift).
The figures are quoted in docs/design.md ("Pretrained encoders").
"""

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from ddep_jax import models
from ddep_jax.models import model as model_lib
from ddep_jax.models import pretrained
from experiments import timm_reference

NUM_CLASSES = 1000


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--pure', action='store_true', help='ViT-B/16 instead of R50+ViT-B/16.')
  args = parser.parse_args()
  timm_reference.import_timm()
  from safetensors import torch as safetensors_torch  # pylint: disable=g-import-not-at-top

  hybrid = not args.pure
  exact = timm_reference.randomize_(
      timm_reference.build_vit(hybrid=hybrid, num_classes=NUM_CLASSES), seed=0)
  default = timm_reference.build_vit(hybrid=hybrid, num_classes=NUM_CLASSES, vit_semantics=False)
  default.load_state_dict(exact.state_dict())
  config = models.get_config('R50+ViT-B_16' if hybrid else 'ViT-B_16')
  model = model_lib.build_model(config, task='classify', num_classes=NUM_CLASSES)
  images = np.random.default_rng(0).uniform(-1, 1, (args.batch, 224, 224, 3)).astype(np.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images[:1])
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes['params'])

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'model.safetensors')
    safetensors_torch.save_file(exact.state_dict(), path)
    print(f'file: {os.path.getsize(path) / 2**20:.0f} MiB')
    start = time.perf_counter()
    params = pretrained.load_pretrained(init, path, drop_head=False)
    print(f'load_pretrained (read + convert + merge): {time.perf_counter() - start:.2f} s')

  logits, aux = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(params, images)
  for name, reference in (('vit semantics', exact), ('timm defaults', default)):
    expected = timm_reference.logits(reference, images)
    line = f'{name}: logits rel max diff {_rel(logits, expected):.2e}'
    if hybrid:
      features = timm_reference.stage_features(reference, images)
      line += ''.join(f', {k} {_rel(aux[k], features[k]):.2e}' for k in ('block1', 'block2',
                                                                         'block3'))
    print(line)


if __name__ == '__main__':
  main()
