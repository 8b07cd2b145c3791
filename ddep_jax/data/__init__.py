"""Input pipelines over TFDS: dataset registry, preprocessing, label-efficient subsets, tf.data.

`datasets` (names -> TFDS builders, label tables), `preprocessing` (pure tf functions),
`subsets` (label fractions / counts, split files), `input_pipeline` (train / eval batches: the
entry points, over `train_input`, `eval_input` and what they share, `reading`); `builders` holds
the project's TFDS builders.
"""
