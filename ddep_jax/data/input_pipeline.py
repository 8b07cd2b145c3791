"""Train and eval tf.data pipelines over TFDS: the entry points the trainer and evaluator use.

The work is done in three modules, whose public names are imported here:
  `train_input`  the train stream (`get_train_dataset`, `default_config`): per-process parts,
                 seeded per-epoch shuffles and augmentations, resumable at any step;
  `eval_input`   the eval batches (`get_eval_dataset`, `default_eval_config`): whole images
                 padded to one shape, padded batches so every process runs as many;
  `reading`      what both share: opening a dataset for a task, reading encoded examples in a
                 fixed order, this process's part, naming corrupt examples.

Batches are dicts of numpy arrays, this process's slice of the global batch:
  denoise:  {'image'}
  segment:  {'image', 'label', 'num_invalid_label_pixels'}
  classify: {'image', 'label'}
and eval batches add 'valid' bool [B], 'orig_size' int32 [B, 2] and 'id_hash' int32 [B] (a
stable hash of the example's id, 0 for padding: it keys per-example evaluation randomness, such as
the denoising noise, by the example rather than by its place in a batch, which depends on the
batch size and the number of processes). `num_invalid_label_pixels` (int32 [B]) counts mask
pixels holding values the dataset never uses; they are trained/evaluated as ignore (255), and the
trainer can sum the count to notice corrupt masks.

Input configs are read field by field with no fallback: build them from `default_config()` /
`default_eval_config()`; a missing or (train input) unknown field is an error naming it.
"""

from ddep_jax.data import datasets
from ddep_jax.data.eval_input import EvalBatches
from ddep_jax.data.eval_input import default_eval_config
from ddep_jax.data.eval_input import get_eval_dataset
from ddep_jax.data.reading import CorruptExampleError
from ddep_jax.data.reading import local_batch_size
from ddep_jax.data.train_input import default_config
from ddep_jax.data.train_input import get_train_dataset
from ddep_jax.data.train_input import SUBSET_IDS_FILENAME
from ddep_jax.data.train_input import train_crop_size
from ddep_jax.data.train_input import TrainIterator

__all__ = ['CorruptExampleError', 'EvalBatches', 'SUBSET_IDS_FILENAME', 'TrainIterator',
           'dataset_info', 'default_config', 'default_eval_config', 'get_eval_dataset',
           'get_train_dataset', 'local_batch_size', 'train_crop_size']


def dataset_info(name: str, data_dir: str | None = None) -> datasets.DatasetInfo:
  """num_classes, class names (if known) and split sizes; see `datasets.dataset_info`."""
  return datasets.dataset_info(name, data_dir)
