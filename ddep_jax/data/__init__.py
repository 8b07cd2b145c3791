"""Input pipelines: TFDS builders, preprocessing, label-efficient subsets."""
