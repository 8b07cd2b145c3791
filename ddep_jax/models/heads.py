"""Output heads: the only parameters that depend on the task and the number of classes.

Both heads keep their output layer's `kernel` and `bias` directly under `head/` (the released
checkpoints' `head/kernel`, `head/bias`), so swapping the head is one path rule (`head/.*`) and a
denoising model's `encoder` + `decoder` parameters drop straight into a segmentation model.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp


class DenseHead(nn.Module):
  """Per-pixel conv to `num_outputs` channels: 3 for denoising, K classes for segmentation."""

  num_outputs: int
  kernel_size: Sequence[int] = (1, 1)
  dtype: Any = jnp.float32

  def setup(self):
    self.conv = nn.Conv(self.num_outputs, tuple(self.kernel_size), padding='SAME',
                        dtype=self.dtype)
    nn.share_scope(self, self.conv)  # `head/kernel`, not `head/conv/kernel`.

  def __call__(self, x):
    return self.conv(x).astype(jnp.float32)


class ClassificationHead(nn.Module):
  """vision_transformer's classifier: optional `pre_logits` (Dense + tanh), then `head`.

  Applied to the class-token output of the encoder. The logits layer is zero-initialised, as in
  vision_transformer, so a fresh head predicts uniform logits.
  """

  num_classes: int
  representation_size: Optional[int] = None
  dtype: Any = jnp.float32

  def setup(self):
    if self.representation_size:
      self.pre_logits = nn.Dense(self.representation_size, dtype=self.dtype)
    self.logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype)
    nn.share_scope(self, self.logits)  # `head/kernel`, as the checkpoint's top-level `head`.

  def __call__(self, x):
    """Returns `(logits float32 [B, num_classes], pre_logits [B, D])`."""
    if self.representation_size:
      x = nn.tanh(self.pre_logits(x))
    return self.logits(x).astype(jnp.float32), x
