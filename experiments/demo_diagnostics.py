r"""Why does the demo's fine-tuning predict only background? Measurements on a finished demo.

  python -m experiments.demo_diagnostics --demo_dir=workdirs/demo \
      [--inits=none,supervised,dep,ddep] [--steps=300] [--lr=2e-3] [--num_labelled=1000] \
      [--binary] [--seed=0] [--data_dir=<demo_dir>/tfds]

For each initialisation (the demo's pretraining checkpoints in `<demo_dir>/pretrain/<init>`),
on `ddep_digit_scenes/segmentation` (the demo's `<demo_dir>/tfds`), it prints:

* `probe`: a linear classifier on the *frozen* encoder's token map (2x2), its logits upsampled
  bilinearly to pixels, trained with pixel cross-entropy (Adam 1e-2, 200 steps of 32).
  It says how much digit identity the encoder carries where the digits are.
* `finetune`: the whole model (encoder, decoder, fresh head) trained with pixel cross-entropy
  (weighted by the stage's `class_weights`; unweighted with `--binary`), Adam with a cosine
  schedule, batches of the `finetune` stage's size drawn from the first
  `num_labelled` of a seeded permutation of the train scenes, no augmentation: a standalone,
  faster version of the demo's `finetune` stage, evaluated every `eval_every` steps. The model
  and what it starts from (`init_from`) are those of `configs/demo.py:stage=finetune,init=...`.

Metrics on the 200 validation scenes: mIoU, foreground IoU (digit vs background, whatever the
digit), and `identity`: the share of digit pixels whose highest *digit* logit is the right digit
(chance 10 %), which separates "does not know where the digits are" from "does not know which
digit". With `--binary` the task is background vs digit (2 classes).

This is a diagnostic script, not part of `make demo`; docs/demo.md reports what it printed.
"""

import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds

from ddep_jax import checkpoints
from ddep_jax import fileio
from ddep_jax import metrics
from ddep_jax import models
from ddep_jax import objectives
from ddep_jax import parameters
from ddep_jax.data.builders import digit_scenes
from experiments import demo_runs
from experiments import sweep

FLAGS = flags.FLAGS
_EVAL_BATCH = 100


def finetune_config(demo_dir: str, init: str):
  """The demo's own `finetune` config for `init`: model, batch size, what is carried from where."""
  config_module = sweep.load_config_module(demo_runs.CONFIG_FILE)
  return config_module.get_config(f'stage=finetune,init={init},root={demo_dir}')


def load_split(data_dir: str, split: str, binary: bool) -> tuple[np.ndarray, np.ndarray]:
  """Images in [-1, 1] (as the input pipeline) and int32 masks, all in memory."""
  data = tfds.as_numpy(tfds.load('ddep_digit_scenes/segmentation', split=split, batch_size=-1,
                                 data_dir=data_dir))
  masks = data['segmentation_mask'][..., 0].astype(np.int32)
  if binary:
    masks = (masks > 0).astype(np.int32)
  return data['image'].astype(np.float32) / 127.5 - 1.0, masks


def scores(logits: np.ndarray, masks: np.ndarray) -> dict[str, float]:
  """mIoU, foreground IoU and digit identity (see the module docstring), in %."""
  num_classes = logits.shape[-1]
  pred = logits.argmax(-1)
  # mIoU as the trainer reports it (classes absent from truth and prediction do not count).
  confusion = metrics.confusion_matrix(masks, pred, num_classes)
  result = {'mIoU': 100 * metrics.segmentation_metrics(np.asarray(confusion))['mIoU']}
  pred, truth = pred.ravel(), masks.ravel()
  fg_pred, fg_true = pred > 0, truth > 0
  result['fgIoU'] = 100 * (fg_pred & fg_true).sum() / max((fg_pred | fg_true).sum(), 1)
  if num_classes > 2:
    digit = logits[..., 1:].argmax(-1).ravel() + 1
    result['identity'] = 100 * (digit == truth)[fg_true].mean()
  return result


def fmt(values: dict[str, float]) -> str:
  return ' '.join(f'{k} {v:5.1f}' for k, v in values.items())


def initial_params(model, config, images: np.ndarray, seed: int) -> dict[str, Any]:
  """Fresh parameters with `config.init_from` applied, as the trainer does for the run."""
  params = model.init({'params': jax.random.key(seed)}, images[:2], train=False)['params']
  if not config.init_from.checkpoint:
    return params
  loaded, _ = checkpoints.load_params(config.init_from.checkpoint)
  return parameters.merge_params(params, loaded, tuple(config.init_from.params),
                                 hint=f'Loading {config.init_from.checkpoint}.')


def batched(fn, images: np.ndarray) -> np.ndarray:
  """`fn` (jitted once by the caller) over `images` in batches of `_EVAL_BATCH`, concatenated."""
  return np.concatenate([np.asarray(fn(images[i:i + _EVAL_BATCH]))
                         for i in range(0, len(images), _EVAL_BATCH)])


def probe(model, params, train, val, num_classes: int, seed: int,
          steps: int = 200) -> dict[str, float]:
  """Linear classifier on the frozen token map, logits upsampled to pixels."""
  tokens = jax.jit(lambda x: model.apply({'params': params}, x, train=False)[1]['tokens'])

  def token_map(images):
    t = batched(tokens, images)
    side = int(round(t.shape[1] ** 0.5))
    return t.reshape(len(t), side, side, -1)

  (x_train, y_train), (x_val, y_val) = train, val
  f_train, f_val = token_map(x_train), token_map(x_val)
  mean, std = f_train.mean((0, 1, 2)), f_train.std((0, 1, 2)) + 1e-6
  f_train, f_val = (f_train - mean) / std, (f_val - mean) / std
  height, width = y_train.shape[1:]

  def logits(w, f):
    out = f @ w['kernel'] + w['bias']
    return jax.image.resize(out, (len(f), height, width, num_classes), 'bilinear')

  w = {'kernel': jnp.zeros((f_train.shape[-1], num_classes)), 'bias': jnp.zeros(num_classes)}
  tx = optax.adam(1e-2)
  opt = tx.init(w)

  @jax.jit
  def step(w, opt, f, y):
    grad = jax.grad(lambda w: optax.softmax_cross_entropy_with_integer_labels(
        logits(w, f), y).mean())(w)
    updates, opt = tx.update(grad, opt)
    return optax.apply_updates(w, updates), opt

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(f_train), 32)
    w, opt = step(w, opt, f_train[idx], y_train[idx])
  return scores(np.asarray(logits(w, f_val)), y_val)


def finetune(model, params, train, val, *, init: str, steps: int, lr: float, eval_every: int,
             batch_size: int, seed: int, class_weights=None) -> None:
  """Trains the whole model and prints its scores every `eval_every` steps."""
  (x_train, y_train), (x_val, y_val) = train, val
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps)
  tx = optax.adam(schedule)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    def loss_fn(p):
      out, _ = model.apply({'params': p}, x, train=True)
      return objectives.pixel_cross_entropy(out, y, class_weights=class_weights)[0]
    loss, grad = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grad, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  logits_fn = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)[0])
  rng = np.random.default_rng(seed)
  start = time.time()
  for i in range(1, steps + 1):
    idx = rng.integers(0, len(x_train), batch_size)
    params, opt, loss = step(params, opt, x_train[idx], y_train[idx])
    if i % eval_every == 0 or i == steps:
      val_scores = scores(batched(lambda x: logits_fn(params, x), x_val), y_val)
      print(f'{init:>10} finetune step {i:4d}: loss {float(loss):.3f} {fmt(val_scores)} '
            f'({time.time() - start:.0f} s)', flush=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # TFDS and Orbax chatter.
  data_dir = FLAGS.data_dir or fileio.join(FLAGS.demo_dir, 'tfds')
  x_train, y_train = load_split(data_dir, 'train', FLAGS.binary)
  subset = np.random.default_rng(FLAGS.seed).permutation(len(x_train))[:FLAGS.num_labelled]
  train = (x_train[subset], y_train[subset])
  val = load_split(data_dir, FLAGS.val_split, FLAGS.binary)
  num_classes = 2 if FLAGS.binary else digit_scenes.NUM_DIGIT_CLASSES + 1
  print(f'{len(subset)} labelled scenes, {num_classes} classes, digit pixels '
        f'{100 * (train[1] > 0).mean():.1f} %')
  for init in FLAGS.inits:
    config = finetune_config(FLAGS.demo_dir, init)
    model = models.build_model(config.model, task='segment', num_classes=num_classes)
    params = initial_params(model, config, train[0], FLAGS.seed)
    result = probe(model, params, train, val, num_classes, FLAGS.seed, FLAGS.probe_steps)
    print(f'{init:>10} probe (frozen tokens): {fmt(result)}', flush=True)
    finetune(model, params, train, val, init=init, steps=FLAGS.steps, lr=FLAGS.lr,
             eval_every=FLAGS.eval_every, batch_size=config.input.batch_size, seed=FLAGS.seed,
             class_weights=None if FLAGS.binary else config.class_weights)


def define_flags() -> None:
  """The script's flags; defined only when run, so that importing it claims no flag names."""
  flags.DEFINE_string('demo_dir', 'workdirs/demo', 'A finished `make demo` directory.')
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir of ddep_digit_scenes (default '
                      '<demo_dir>/tfds).')
  flags.DEFINE_list('inits', ['none', 'supervised', 'dep', 'ddep'], 'Initialisations.')
  flags.DEFINE_integer('steps', 300, 'Fine-tuning steps.')
  flags.DEFINE_float('lr', 2e-3, 'Fine-tuning peak learning rate.')
  flags.DEFINE_integer('eval_every', 100, 'Fine-tuning evaluation interval.')
  flags.DEFINE_integer('probe_steps', 200, 'Linear probe steps.')
  flags.DEFINE_integer('num_labelled', 1000, 'Labelled train scenes used.')
  flags.DEFINE_string('val_split', 'validation', 'Evaluation split (TFDS split syntax).')
  flags.DEFINE_bool('binary', False, 'Background vs digit instead of 11 classes.')
  flags.DEFINE_integer('seed', 0, 'Labelled subset, head initialisation, batch order.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
