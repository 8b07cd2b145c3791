"""`python -m ddep_jax.main`, with the TensorBoard summaries of a `gs://` work directory on disk.

The multi-host test runs the trainer with its work directory on the GCS emulator
(tests/gcs_emulator.py). Summaries are written by `tf.summary` through TensorFlow's own GCS
client, which has no endpoint setting and so cannot reach the emulator: this wrapper sends them
to `$DDEP_TEST_SUMMARIES_DIR/<bucket>/<path>` instead. Everything else is the real trainer.
"""

import os

from absl import app
from clu import metric_writers

from ddep_jax import main


def _create_default_writer(logdir, *, just_logging=False, **unused_kwargs):
  writers = [metric_writers.LoggingWriter()]
  if not just_logging:
    local = os.path.join(os.environ['DDEP_TEST_SUMMARIES_DIR'], logdir.split('://', 1)[1])
    writers.append(metric_writers.SummaryWriter(local))
  return metric_writers.AsyncMultiWriter(writers)


if __name__ == '__main__':
  metric_writers.create_default_writer = _create_default_writer
  app.run(main.main)
