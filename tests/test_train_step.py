"""Tests for ddep_jax.train_step: one real jitted step per regime on the tiny TransUNet.

Compiles are the cost here, so each regime is compiled once per mesh in a module-level fixture
and the tests read its recorded states and metrics.
"""

import jax
import ml_collections
import numpy as np
import pytest

from ddep_jax import models
from ddep_jax import objectives
from ddep_jax import optimizer
from ddep_jax import sharding
from ddep_jax import train_step

IMAGE_SHAPE = (8, 32, 32, 3)
NUM_CLASSES = 5
OVERFIT_STEPS = 60
COMPARE_STEPS = 3
DDEP = [('encoder/.*', None), ('.*', dict(decay_type='constant'))]
EVERYTHING = (('.*', dict(decay_type='constant')),)
FSDP = dict(mesh=(('data', -1), ('fsdp', 2)),
            sharding_rules=(('decoder/.*', 'fsdp'), ('.*', 'replicate')))


def _config(task, schedule, **overrides):
  config = ml_collections.ConfigDict()
  for module in (objectives, optimizer, sharding, train_step):
    config.update(module.default_config())
  config.model = models.get_config('tiny')
  config.task = task
  config.num_classes = NUM_CLASSES
  config.total_steps = 1000
  config.lr = 1e-2
  config.schedule = schedule
  # The clean image of one batch can be memorised; fresh noise every step cannot (Eq. 2).
  config.denoising.predict_target = 'image'
  config.update(overrides)
  return config


def _batch(task):
  """One smooth batch (bilinear 4x4 -> 32x32) and labels that are blocky functions of it."""
  rng = np.random.default_rng(0)
  low = rng.uniform(-1, 1, (IMAGE_SHAPE[0], 4, 4, 3)).astype(np.float32)
  batch = {'image': np.asarray(jax.image.resize(low, IMAGE_SHAPE, 'linear'), np.float32)}
  classes = np.argmax(low @ rng.normal(size=(3, NUM_CLASSES)), axis=-1)
  if task == 'segment':
    labels = classes.repeat(8, axis=1).repeat(8, axis=2).astype(np.int32)
    labels[:, :3, :] = 255  # Void rows at the top: no loss there.
    batch['label'] = labels
  elif task == 'classify':
    batch['label'] = classes[:, 0, 0].astype(np.int32)
  return batch


class Run:
  """A state trained for some steps on one mesh, with its history."""

  def __init__(self, config, devices=None, params=None):
    self.config = config
    self.mesh = sharding.make_mesh(config, devices=devices)
    self.model = models.build_model(config.model, task=config.task, num_classes=NUM_CLASSES)
    abstract = train_step.abstract_params(config, self.model, IMAGE_SHAPE)
    self.opt = optimizer.make_optimizer(config, abstract)
    self.state, self.shardings = train_step.create_train_state(
        config, self.model, self.opt, self.mesh, IMAGE_SHAPE, params=params)
    self.initial_params = jax.device_get(self.state['params'])
    self.step = train_step.make_train_step(config, self.model, self.opt, self.mesh,
                                           self.shardings)
    self.host_batch = _batch(config.task)
    self.batch = sharding.global_batch(self.host_batch, self.mesh)
    self.metrics = []
    self.snapshots = {}

  def train(self, num_steps, snapshot_at=()):
    for _ in range(num_steps):
      self.state, metrics = self.step(self.state, self.batch)
      self.metrics.append(jax.device_get(metrics))
      if len(self.metrics) in snapshot_at:
        self.snapshots[len(self.metrics)] = jax.device_get(self.state['params'])
    return self

  def losses(self):
    return np.array([m['loss'] for m in self.metrics])


@pytest.fixture(scope='module')
def ddep_single():
  run = Run(_config('denoise', DDEP), devices=jax.devices()[:1])
  return run.train(OVERFIT_STEPS, snapshot_at=(COMPARE_STEPS,))


@pytest.fixture(scope='module')
def dep_single(ddep_single):
  # Same model and seed as DDeP: start from its initial parameters instead of compiling init again.
  run = Run(_config('denoise', EVERYTHING), devices=jax.devices()[:1],
            params=ddep_single.initial_params)
  return run.train(OVERFIT_STEPS, snapshot_at=(COMPARE_STEPS,))


@pytest.fixture(scope='module')
def dep_sharded(ddep_single):
  """DeP on all 8 devices: batch over data (4) x fsdp (2), decoder FSDP, encoder replicated."""
  run = Run(_config('denoise', EVERYTHING, **FSDP), params=ddep_single.initial_params)
  return run.train(COMPARE_STEPS, snapshot_at=(COMPARE_STEPS,))


def _assert_same_updates(actual, expected, initial, *, lr, steps):
  """The parameter updates of two runs agree up to rounding.

  Adam divides by |g| + eps, so a parameter whose gradient is ~0 (a key bias, under softmax) can
  move by a visible fraction of lr on a rounding difference of its gradient, rarely by up to ~lr
  a step. So: the RMS difference of each tensor is within 0.05 lr plus 1 % of its update's RMS,
  and no element differs by more than Adam could move it. A sharding bug (a wrong reduction, a
  misplaced shard) breaks both by orders of magnitude.
  """
  def check(path, a, e, i):
    difference, update = np.asarray(a) - np.asarray(e), np.asarray(e) - np.asarray(i)
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    name = jax.tree_util.keystr(path)
    assert rms(difference) <= 0.05 * lr + 1e-2 * rms(update), name
    assert np.max(np.abs(difference), initial=0.0) <= steps * lr, name
  jax.tree_util.tree_map_with_path(check, actual, expected, initial)


def test_sharded_fsdp_step_equals_single_device_step(dep_sharded, dep_single):
  assert dict(dep_sharded.mesh.shape) == {'data': 4, 'fsdp': 2}
  assert dict(dep_single.mesh.shape) == {'data': 1}
  # The batch is split over all 8 devices; the decoder's largest kernels half on each fsdp device.
  assert {s.data.shape[0] for s in dep_sharded.batch['image'].addressable_shards} == {1}
  specs = [s.spec for s in jax.tree.leaves(dep_sharded.shardings['params']['decoder'])]
  assert sum('fsdp' in spec for spec in specs) >= 5
  assert all(s.spec == jax.sharding.PartitionSpec()
             for s in jax.tree.leaves(dep_sharded.shardings['params']['encoder']))
  kernel = dep_sharded.state['params']['decoder']['stage0']['conv0']['conv']['kernel']
  assert {s.data.size for s in kernel.addressable_shards} == {kernel.size // 2}
  # Its Adam moments are split the same way.
  moments = [x for p, x in jax.tree_util.tree_flatten_with_path(dep_sharded.state['opt_state'])[0]
             if optimizer.path_name(p).endswith('decoder/stage0/conv0/conv/kernel')]
  assert len(moments) == 2
  assert all(m.sharding.is_equivalent_to(kernel.sharding, kernel.ndim) for m in moments)
  # Same per-example noise and dropout masks whatever the sharding: the same losses, gradients
  # and updates up to reduction order.
  for sharded, single in zip(dep_sharded.metrics, dep_single.metrics[:COMPARE_STEPS]):
    for key in ('loss', 'grad_norm', 'param_norm', 'learning_rate'):
      np.testing.assert_allclose(sharded[key], single[key], rtol=1e-4, err_msg=key)
  _assert_same_updates(dep_sharded.snapshots[COMPARE_STEPS], dep_single.snapshots[COMPARE_STEPS],
                       dep_single.initial_params, lr=dep_single.config.lr, steps=COMPARE_STEPS)


def _bits(tree):
  return jax.tree.map(lambda x: np.asarray(x).view(np.uint32), tree)


def test_ddep_keeps_encoder_bitwise_frozen_and_trains_decoder(ddep_single):
  run = ddep_single
  final = jax.device_get(run.state['params'])
  jax.tree.map(np.testing.assert_array_equal, _bits(final['encoder']),
               _bits(run.initial_params['encoder']))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), final['decoder'],
                         run.initial_params['decoder'])
  assert all(jax.tree.leaves(changed)), 'some decoder parameters never changed'
  assert not np.array_equal(final['head']['kernel'], run.initial_params['head']['kernel'])
  assert int(run.state['step']) == OVERFIT_STEPS
  # The optimizer state holds no encoder moments at all.
  paths = [optimizer.path_name(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(run.state['opt_state'])[0]]
  assert not [p for p in paths if 'encoder' in p]
  num_trainable = len(jax.tree.leaves(run.initial_params['decoder'])) + 2  # + head kernel, bias.
  assert len([p for p in paths if '/mu/' in p]) == num_trainable


def test_dep_trains_the_encoder(dep_single):
  final = jax.device_get(dep_single.state['params'])
  assert not np.array_equal(final['encoder']['conv_root']['kernel'],
                            dep_single.initial_params['encoder']['conv_root']['kernel'])


@pytest.mark.parametrize('name, factor', [('ddep', 5.0), ('dep', 5.0)])
def test_denoising_regimes_overfit_one_batch(name, factor, request):
  run = request.getfixturevalue(f'{name}_single')
  losses = run.losses()
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] / factor, losses[::10]
  assert run.metrics[0]['learning_rate'] == pytest.approx(1e-2)


def test_fine_tuning_overfits_and_counts_valid_pixels(ddep_single):
  # Fine-tuning starts from the denoising model's encoder and decoder with a new 5-class head, as
  # the second stage does (and saves compiling another init).
  params = jax.tree.map(np.asarray, ddep_single.initial_params)
  width = params['head']['kernel'].shape[-2]
  rng = np.random.default_rng(1)
  params['head'] = {'kernel': 0.1 * rng.standard_normal((1, 1, width, NUM_CLASSES), np.float32),
                    'bias': np.zeros((NUM_CLASSES,), np.float32)}
  run = Run(_config('segment', EVERYTHING), devices=jax.devices()[:1], params=params)
  run.train(OVERFIT_STEPS)
  losses = run.losses()
  assert losses[-1] < losses[0] / 8.0, losses[::10]
  expected_valid = int(np.sum(run.host_batch['label'] != 255))
  assert expected_valid == 8 * 29 * 32
  assert all(int(m['num_valid_pixels']) == expected_valid for m in run.metrics)


def test_segment_loss_applies_config_class_weights(ddep_single):
  # The denoising model's 3 outputs stand in for the logits of 3 classes (no extra compile).
  mask = ddep_single.opt.trainable_mask
  trainable, frozen = train_step.partition_params(ddep_single.initial_params, mask)
  batch = _batch('segment')
  labels = np.where(batch['label'] == 255, 255, batch['label'] % 3).astype(np.int32)

  def loss(class_weights, labels):
    config = _config('segment', EVERYTHING, class_weights=class_weights)
    loss_fn = train_step.make_loss_fn(config, ddep_single.model, mask, ddep_single.mesh)
    return float(loss_fn(trainable, frozen, dict(batch, label=labels), 0)[0])

  unweighted = loss(None, labels)
  assert loss((1.0, 1.0, 1.0), labels) == pytest.approx(unweighted, rel=1e-6)
  # Weight 0 on class 0 is the loss with class 0 ignored; a small weight is in between.
  without_class0 = loss(None, np.where(labels == 0, 255, labels))
  assert loss((0.0, 1.0, 1.0), labels) == pytest.approx(without_class0, rel=1e-6)
  assert min(unweighted, without_class0) < loss((0.1, 1.0, 1.0), labels) < max(unweighted,
                                                                               without_class0)


def test_classification_overfits(ddep_single):
  # Encoder-only model: the denoising model's encoder with a zero-initialised class head, as
  # vision_transformer initialises it.
  hidden = ddep_single.config.model.encoder.hidden_size
  params = {'encoder': jax.tree.map(np.asarray, ddep_single.initial_params['encoder']),
            'head': {'kernel': np.zeros((hidden, NUM_CLASSES), np.float32),
                     'bias': np.zeros((NUM_CLASSES,), np.float32)}}
  config = _config('classify', EVERYTHING, lr=3e-3)
  run = Run(config, devices=jax.devices()[:1], params=params).train(OVERFIT_STEPS)
  losses = run.losses()
  assert losses[0] == pytest.approx(np.log(NUM_CLASSES), rel=1e-5)  # Zero logits: log K.
  assert losses[-1] < losses[0] / 20.0, losses[::10]


def test_ddep_step_skips_the_encoder_backward_pass(ddep_single, dep_single):
  """XLA's FLOP count: DDeP < DeP, while masking the updates alone costs as much as DeP."""
  def flops(run, opt=None):
    step = run.step if opt is None else train_step.make_train_step(
        run.config, run.model, opt, run.mesh, run.shardings)
    return step.lower(run.state, run.batch).cost_analysis()['flops']

  ddep, dep = flops(ddep_single), flops(dep_single)
  everything = jax.tree.map(lambda _: True, ddep_single.opt.trainable_mask)
  masked_only = flops(ddep_single, ddep_single.opt._replace(trainable_mask=everything))
  assert ddep < 0.8 * dep, (ddep, dep)
  assert masked_only > 0.95 * dep, (masked_only, dep)


def test_example_keys_do_not_depend_on_the_batch_around_them():
  key = jax.random.key(0)
  keys8 = jax.random.key_data(train_step.example_keys(key, 3, 8))
  keys4 = jax.random.key_data(train_step.example_keys(key, 3, 4))
  np.testing.assert_array_equal(keys8[:4], keys4)
  assert len({tuple(k) for k in np.asarray(keys8)}) == 8
  other_step = jax.random.key_data(train_step.example_keys(key, 4, 8))
  assert not np.any(np.all(np.asarray(other_step) == np.asarray(keys8), axis=-1))


def test_encoder_trains_follows_the_mask():
  assert not train_step.encoder_trains({'encoder': {'a': False, 'b': False}, 'decoder': True})
  assert train_step.encoder_trains({'encoder': {'a': False, 'b': True}, 'decoder': True})
  assert not train_step.encoder_trains({'decoder': True})


class _RecordingModel:
  """The real model, recording the `encoder_train` flag the step passes to it."""

  def __init__(self, model):
    self.model, self.encoder_train = model, []

  def apply(self, *args, **kwargs):
    self.encoder_train.append(kwargs['encoder_train'])
    return self.model.apply(*args, **kwargs)


@pytest.mark.parametrize('schedule, encoder_train', [(DDEP, False), (EVERYTHING, True)])
def test_frozen_encoder_runs_without_dropout(schedule, encoder_train, ddep_single):
  config = _config('denoise', schedule)
  model = _RecordingModel(ddep_single.model)
  mask = optimizer.make_optimizer(config, ddep_single.initial_params).trainable_mask
  loss_fn = train_step.make_loss_fn(config, model, mask, ddep_single.mesh)
  trainable, frozen = train_step.partition_params(ddep_single.initial_params, mask)
  jax.eval_shape(loss_fn, trainable, frozen, ddep_single.host_batch, 0)  # Traces, no FLOPs.
  assert model.encoder_train == [encoder_train]


def test_create_train_state_rejects_params_of_another_model(ddep_single):
  params = jax.tree.map(np.asarray, ddep_single.initial_params)
  params['head']['kernel'] = np.zeros((1, 1, 9, 3), np.float32)
  del params['decoder']['stage4']
  with pytest.raises(ValueError, match=r'(?s)in model but not in params: decoder/stage4/.*'
                                       r'shape mismatch: head/kernel: params \(1, 1, 9, 3\)'):
    train_step.create_train_state(ddep_single.config, ddep_single.model, ddep_single.opt,
                                  ddep_single.mesh, IMAGE_SHAPE, params=params)


def test_bad_task_and_batch_are_rejected(ddep_single):
  with pytest.raises(ValueError, match="config.task='detect'"):
    train_step.make_train_step(_config('detect', DDEP), ddep_single.model, ddep_single.opt,
                               ddep_single.mesh, ddep_single.shardings)
  config = _config('segment', EVERYTHING)
  loss_fn = train_step.make_loss_fn(config, ddep_single.model, ddep_single.opt.trainable_mask,
                                    ddep_single.mesh)
  with pytest.raises(ValueError, match=r"missing \['label'\]"):
    loss_fn({}, {}, {'image': np.zeros(IMAGE_SHAPE, np.float32)}, 0)
  bad_noise = _config('denoise', DDEP)
  bad_noise.denoising.gamma = 0.9
  with pytest.raises(ValueError, match='exactly one of noise_std, gamma, gamma_range'):
    train_step.make_train_step(bad_noise, ddep_single.model, ddep_single.opt, ddep_single.mesh,
                               ddep_single.shardings)
