"""Test-session set-up shared by every test module.

Runs before any test imports jax: 8 simulated CPU devices so sharded code is
exercised, and no TFDS metadata look-ups on GCS (tests never touch the network).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keep TensorFlow off any accelerator and from grabbing all host threads.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")

from tensorflow_datasets.core.utils import gcs_utils  # noqa: E402

gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access
