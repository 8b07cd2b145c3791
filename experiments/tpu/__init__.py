"""Cloud TPU VM (pod slice) launcher: see `experiments/tpu/README.md`."""
