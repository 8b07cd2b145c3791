"""Fixtures for the builder tests: build a TFDS builder offline and read a split back."""

import pytest
import tensorflow_datasets as tfds


@pytest.fixture
def build(tmp_path):
  """`build(builder_cls, config, manual_dir)` prepares the builder in a fresh data_dir."""

  def _build(builder_cls, config, manual_dir=None):
    builder = builder_cls(config=config, data_dir=str(tmp_path / 'tfds'))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else str(manual_dir), try_download_gcs=False))
    return builder

  return _build


@pytest.fixture
def read_split():
  """`read_split(builder, split)` -> {image_id: example as numpy}."""

  def _read(builder, split):
    return {example['image_id'].decode(): example
            for example in tfds.as_numpy(builder.as_dataset(split=split))}

  return _read


def pytest_collection_modifyitems(config, items):
  """Drops tf.test.TestCase's `test_session`, a context manager pytest takes for a test."""
  del config
  items[:] = [item for item in items
              if not (item.name == 'test_session' and item.cls is not None
                      and issubclass(item.cls, tfds.testing.TestCase))]
