"""A tiny config of every stage on the embedded digit scenes, for the trainer's tests.

  python -m ddep_jax.main --config=tests/tiny_config.py:task=segment,data_dir=DIR --workdir=W
"""

from configs import common
from ddep_jax import models

_DATASETS = {'classify': 'digit_scenes_classification', 'denoise': 'digit_scenes_unlabeled',
             'segment': 'digit_scenes'}


def get_config(arg=None):
  arg = common.parse_arg(arg, task='segment', data_dir='', steps=6, ddep=False, lr=1e-3,
                         checkpoint_every=2)
  config = common.get_base_config()
  config.task = arg.task
  config.seed = 3
  config.num_classes = {'classify': 10, 'denoise': 0, 'segment': 11}[arg.task]
  config.model = models.get_config('tiny')
  config.input.dataset = _DATASETS[arg.task]
  config.input.data_dir = arg.data_dir or None
  config.input.batch_size = 8
  config.input.crop_size = (32, 32)
  config.input.shuffle_buffer = 64
  config.total_steps = arg.steps
  config.lr = arg.lr
  config.log_every_steps = 2
  config.checkpoint_every_steps = arg.checkpoint_every
  config.keep_checkpoints = 10
  if arg.ddep:
    config.schedule = (('encoder/.*', None), ('.*', dict(decay_type='cosine', warmup_steps=0)))
  eval_dataset = 'digit_scenes_classification' if arg.task == 'classify' else 'digit_scenes'
  config.evals.val = common.eval_config(eval_dataset, 'validation[:16]', batch_size=8,
                                        data_dir=arg.data_dir or None,
                                        resize=None if arg.task == 'segment' else 32)
  config.lock()
  return config
