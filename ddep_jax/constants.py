"""Names every layer shares: the three tasks and the label of pixels that carry no loss.

A leaf module (it imports nothing), so that models, data, objectives and metrics read the same
values without importing one another.
"""

# What a run trains and evaluates (`config.task`): supervised encoder pretraining, denoising
# pretraining (§3-4) and segmentation fine-tuning.
TASKS = ('classify', 'denoise', 'segment')

# Pixels with this label (void / unlabelled / a class the benchmark leaves out) count in no loss
# and no metric; the data pipeline maps every such pixel to it.
IGNORE_LABEL = 255
