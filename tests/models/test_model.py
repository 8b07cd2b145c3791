"""Tests for the whole models: API, parameter tree, counts, shapes, dtypes, dropout, remat."""

import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddep_jax import models
from ddep_jax import performance
import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _init_shapes(model, images, **kwargs):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False, **kwargs))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# -- Independent parameter counts (arithmetic from the architecture description) -------------


def _resnet_count(num_layers, width=64):
  total = 7 * 7 * 3 * width + 2 * width  # conv_root, gn_root.
  in_channels = width
  for i, units in enumerate(num_layers):
    f = width * 2**i
    for u in range(units):
      c = in_channels if u == 0 else 4 * f
      total += c * f + 2 * f + 9 * f * f + 2 * f + f * 4 * f + 2 * 4 * f  # conv1..gn3.
      if u == 0:
        total += c * 4 * f + 2 * 4 * f  # conv_proj, gn_proj.
    in_channels = 4 * f
  return total


def _vit_count(hidden, layers, mlp, tokens, resnet_channels):
  d = hidden
  per_layer = 2 * d + 4 * (d * d + d) + 2 * d + (d * mlp + mlp) + (mlp * d + d)
  embedding = resnet_channels * d + d
  return embedding + d + tokens * d + layers * per_layer + 2 * d  # cls, posemb, encoder_norm.


def _decoder_count(widths, in_channels, skip_channels):
  total, previous = 0, in_channels
  for width, skip in zip(widths, skip_channels):
    total += 9 * (previous + skip) * width + 2 * width + 9 * width * width + 2 * width
    previous = width
  return total


R50_VIT_B16_ENCODER = (_resnet_count((3, 4, 9))
                       + _vit_count(768, 12, 3072, tokens=1 + 14 * 14, resnet_channels=1024))


@pytest.mark.parametrize('decoder_width', [1, 2, 3])
def test_full_size_parameter_counts(decoder_width):
  config = models.get_config('R50+ViT-B_16', decoder_width=decoder_width)
  model = models.build_model(config, task='segment', num_classes=19)
  params = _init_shapes(model, jnp.zeros((1, 224, 224, 3)))['params']
  widths = [decoder_width * w for w in (1024, 512, 256, 128, 64)]
  assert _count(params['encoder']) == R50_VIT_B16_ENCODER
  assert _count(params['decoder']) == _decoder_count(widths, 768, (0, 512, 256, 64, 0))
  assert _count(params['head']) == widths[-1] * 19 + 19


def test_r50_unet_parameter_count():
  model = models.build_model(models.get_config('R50-UNet'), task='denoise')
  params = _init_shapes(model, jnp.zeros((1, 224, 224, 3)))['params']
  assert _count(params['encoder']) == _resnet_count((3, 4, 6, 3))
  # Stage 0: block4 (2048) upsampled to 1/16 and concatenated with block3 (1024).
  assert _count(params['decoder']) == _decoder_count((1024, 512, 256, 128, 64), 2048,
                                                     (1024, 512, 256, 64, 0))
  assert _count(params['head']) == 64 * 3 + 3


def test_full_size_non_square_cityscapes_frame_shapes():
  model = models.build_model(models.get_config(), task='segment', num_classes=19)
  images = jnp.zeros((1, 1024, 2048, 3))
  (out, aux), variables = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), images, train=False))
  assert out.shape == (1, 1024, 2048, 19) and out.dtype == jnp.float32
  assert aux['block3'].shape == (1, 64, 128, 1024)
  assert aux['tokens'].shape == (1, 1 + 64 * 128, 768)
  posemb = variables['params']['encoder']['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 1 + 64 * 128, 768)


def test_heads_are_the_only_task_dependent_parameters():
  config = models.get_config('tiny')
  images = jnp.zeros((1, 32, 32, 3))
  denoise = _init_shapes(models.build_model(config, task='denoise'), images)['params']
  segment = _init_shapes(models.build_model(config, task='segment', num_classes=7),
                         images)['params']
  classify = _init_shapes(models.build_model(config, task='classify', num_classes=7),
                          images)['params']
  assert set(denoise) == set(segment) == {'encoder', 'decoder', 'head'}
  assert set(classify) == {'encoder', 'head'}
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)  # noqa: E731
  assert shapes(denoise['encoder']) == shapes(segment['encoder']) == shapes(classify['encoder'])
  assert shapes(denoise['decoder']) == shapes(segment['decoder'])
  assert shapes(denoise['head']) == {'kernel': (1, 1, 8, 3), 'bias': (3,)}
  assert shapes(segment['head']) == {'kernel': (1, 1, 8, 7), 'bias': (7,)}
  assert shapes(classify['head']) == {'kernel': (32, 7), 'bias': (7,)}


def test_classification_head_pre_logits_and_outputs():
  config = models.get_config('tiny', representation_size=24)
  model = models.build_model(config, task='classify', num_classes=5)
  (logits, aux), variables = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), jnp.zeros((3, 32, 48, 3)), train=False))
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32
  assert aux['pre_logits'].shape == (3, 24)
  head = variables['params']['head']
  assert jax.tree.map(lambda x: x.shape, head) == {
      'pre_logits': {'kernel': (32, 24), 'bias': (24,)}, 'kernel': (24, 5), 'bias': (5,)}


@pytest.mark.parametrize('name,size', [('tiny', (32, 48)), ('tiny-R50-UNet', (64, 32))])
def test_bfloat16_compute_keeps_float32_params_and_outputs(name, size):
  config = models.get_config(name, dtype='bfloat16')
  model = models.build_model(config, task='segment', num_classes=4)
  (out, aux), variables = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, *size, 3)), train=False))
  assert out.shape == (2, *size, 4) and out.dtype == jnp.float32
  assert aux['block1'].dtype == jnp.bfloat16 and aux['decoder'].dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_remat_changes_neither_parameters_nor_gradients(random_params):
  pure_vit = dict(encoder={'resnet': {'num_layers': ()}}, patch_size=(16, 16))
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  plain = models.build_model(models.get_config('tiny', **pure_vit), task='segment', num_classes=3)
  remat = models.build_model(models.get_config('tiny', remat='all', **pure_vit), task='segment',
                             num_classes=3)
  assert (remat.encoder.remat, remat.decoder.remat) == (True, True)
  for policy, parts in (('encoder', (True, False)), ('decoder', (False, True)),
                        ('none', (False, False))):
    model = models.build_model(models.get_config('tiny', remat=policy), task='denoise')
    assert (model.encoder.remat, model.decoder.remat) == parts, policy
  params = random_params(plain, images, train=False)
  assert (jax.tree.structure(_init_shapes(remat, images)['params'])
          == jax.tree.structure(params))

  def loss_and_grads(model):
    loss = lambda p: jnp.sum(model.apply({'params': p}, images, train=False)[0] ** 2)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(params)

  (plain_loss, plain_grads), (remat_loss, remat_grads) = map(loss_and_grads, (plain, remat))
  np.testing.assert_allclose(float(remat_loss), float(plain_loss), rtol=1e-6)
  # Recomputation fuses differently: float32 rounding, measured on the scale of each gradient
  # (1e-5 absolute for the gradients that are zero up to rounding, e.g. biases before a norm).
  for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(remat_grads)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * np.max(np.abs(a)) + 1e-5)


def test_remat_places_a_cse_barrier_at_every_rematerialised_block():
  # jax.checkpoint keeps XLA from merging the recomputation into the forward pass with one
  # optimization barrier per rematerialised call in the backward pass; without them (e.g.
  # `prevent_cse=False` outside nn.scan) remat may save no memory at all.
  config = models.get_config('tiny')
  images = jnp.zeros((1, 32, 32, 3))
  plain = models.build_model(config, task='segment', num_classes=3)
  decoder_stages = len(_init_shapes(plain, images)['params']['decoder'])  # stage0 ... stage4
  expected = {'encoder': sum(config.encoder.resnet.num_layers) + config.encoder.num_layers,
              'decoder': decoder_stages}
  expected.update(none=0, all=expected['encoder'] + expected['decoder'])
  for policy, count in expected.items():
    model = models.build_model(models.get_config('tiny', remat=policy), task='segment',
                               num_classes=3)
    params = _init_shapes(model, images)['params']
    loss = lambda p: jnp.sum(model.apply({'params': p}, images, train=False)[0])  # noqa: E731,B023
    hlo = jax.jit(jax.grad(loss)).lower(params).as_text()
    assert hlo.count('stablehlo.optimization_barrier') == count, policy


_REMAT_MEMORY = """
import json
import jax, jax.numpy as jnp
from ddep_jax import models
images = jnp.zeros((4, 64, 64, 3))
temp = {}
for policy in ('none', 'encoder', 'decoder', 'all'):
  model = models.build_model(models.get_config('tiny', remat=policy), task='segment',
                             num_classes=3)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))['params']
  loss = lambda p: jnp.sum(model.apply({'params': p}, images, train=False)[0] ** 2)
  compiled = jax.jit(jax.grad(loss)).lower(params).compile()
  temp[policy] = compiled.memory_analysis().temp_size_in_bytes
print(json.dumps(temp))
"""


def test_remat_lowers_the_backward_pass_temporaries():
  # Run where XLA:CPU keeps the barriers (performance.CPU_KEEP_REMAT_XLA_FLAG): there the
  # compiled gradient's temporaries show what each policy saves, as on GPUs and TPUs. Measured:
  # none 19.0 MB, encoder 9.3, decoder 17.2, all 8.4 (tiny model, 4 images of 64x64).
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS=f'{xla_flags.flags(None)} {performance.CPU_KEEP_REMAT_XLA_FLAG}')
  result = subprocess.run([sys.executable, '-c', _REMAT_MEMORY], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  temp = json.loads(result.stdout.splitlines()[-1])
  assert temp['encoder'] < 0.7 * temp['none'], temp
  assert temp['decoder'] < temp['none'], temp
  assert temp['all'] < min(temp['encoder'], temp['decoder']), temp


def test_unknown_remat_policy_is_an_error():
  with pytest.raises(ValueError, match=r"model.remat must be one of \('none', 'encoder'"):
    models.build_model(models.get_config('tiny', remat='decoder_stages'), task='denoise')


def test_dropout_follows_train_and_encoder_train(random_params):
  # The pure-ViT tiny model (dropout lives in the transformer) keeps the compile cheap.
  config = models.get_config('tiny', encoder={'resnet': {'num_layers': ()}}, patch_size=(16, 16))
  model = models.build_model(config, task='denoise')
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  params = random_params(model, images, train=False)

  @jax.jit
  def run_all(params):
    run = lambda seed, **kw: model.apply(  # noqa: E731
        {'params': params}, images, rngs={'dropout': jax.random.key(seed)}, **kw)[0]
    return (run(0, train=False), run(1, train=True, encoder_train=False), run(1, train=True),
            run(2, train=True), run(1, train=True, encoder_train=True))

  deterministic, frozen, first, second, explicit = map(np.asarray, run_all(params))
  assert config.encoder.dropout_rate == 0.1
  # Frozen-encoder DDeP: train=True but encoder_train=False runs the encoder without dropout.
  np.testing.assert_allclose(frozen, deterministic, rtol=1e-5, atol=1e-6)
  # encoder_train defaults to train: dropout makes the output depend on the key.
  assert np.abs(first - second).max() > 1e-3
  assert np.abs(first - deterministic).max() > 1e-3
  np.testing.assert_array_equal(first, explicit)


def test_model_runs_on_a_grid_other_than_init(random_params):
  # Multi-scale / full-frame inference: params from a 32x32 init applied to 64x32 images.
  model = models.build_model(models.get_config('tiny'), task='segment', num_classes=3)
  params = random_params(model, np.zeros((1, 32, 32, 3), np.float32), train=False)
  out, aux = jax.eval_shape(lambda: model.apply({'params': params}, jnp.zeros((1, 64, 32, 3)),
                                                train=False))
  assert out.shape == (1, 64, 32, 3) and aux['tokens'].shape == (1, 1 + 4 * 2, 32)


def test_noise_conditioned_model_needs_noise_level():
  config = models.get_config('tiny', noise_conditioning=True)
  model = models.build_model(config, task='denoise')
  with pytest.raises(ValueError, match='noise_conditioning=True needs the per-example noise'):
    _init_shapes(model, jnp.zeros((1, 32, 32, 3)))
  params = _init_shapes(model, jnp.zeros((2, 32, 32, 3)), noise_level=jnp.ones(2))['params']
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  conditioning = sorted({k.split('/')[1] for k in flat if 'film' in k or 'noise_emb' in k})
  assert conditioning == ['noise_embedding', 'stage0', 'stage1', 'stage2', 'stage3', 'stage4']
  assert all(k.startswith('decoder/') for k in flat if 'film' in k or 'noise_emb' in k)


@pytest.mark.parametrize('kwargs,match', [
    (dict(task='detect', num_classes=3), "task must be one of"),
    (dict(task='segment'), 'needs num_classes >= 1'),
    (dict(task='classify', num_classes=0), 'needs num_classes >= 1'),
])
def test_build_model_argument_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.build_model(models.get_config('tiny'), **kwargs)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"model.dtype must be one of \('float32', 'bfloat16'\)"):
    models.build_model(models.get_config('tiny', dtype='float16'), task='denoise')
  config = models.get_config('tiny')
  config.name = 'unet'
  with pytest.raises(ValueError, match=r"model.name must be one of"):
    models.build_model(config, task='denoise')
  config = models.get_config('tiny', encoder={'resnet': {'num_layers': (1, 1, 1, 1)}})
  models.build_model(config, task='classify', num_classes=3)  # A /32 classifier is fine.
  with pytest.raises(ValueError, match=r'output stride 32 .*num_layers=\(1, 1, 1, 1\)'):
    models.build_model(config, task='segment', num_classes=3)
