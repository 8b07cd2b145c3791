r"""Command line of the trainer: flags only; the work happens in `train.train_and_evaluate`.

  python -m ddep_jax.main \
      --config=configs/ddep_pretrain.py:decoder_width=1,npz=/ckpt/R50+ViT-B_16.npz \
      --workdir=/tmp/ddep --config.lr=1e-4

The config is locked: a misspelt `--config.<field>` is an error, not a silently new field.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ddep_jax.data import datasets

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (with :arg).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries, results.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  datasets.confine_tensorflow()
  from ddep_jax import train  # pylint: disable=g-import-not-at-top
  logging.info('Config:\n%s', _CONFIG.value)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
