"""Project TFDS builders; importing this package registers them all under `ddep_*` names.

  * `ddep_ade20k`          ADE20K SceneParsing 150 (ADEChallengeData2016.zip)
  * `ddep_pascal_context`  Pascal Context, configs '59' and '60' (VOC2010 + trainval_merged.json)
  * `ddep_voc2012`         Pascal VOC 2012, configs 'segmentation' and 'images'
  * `ddep_imagenet21k`     ImageNet-21k, configs 'fall11' and 'winter21'
  * `ddep_digit_scenes`    the embedded demo dataset, configs 'segmentation', 'classification',
                           'unlabeled' (built from files inside installed packages)

Cityscapes uses TFDS's own `cityscapes/semantic_segmentation`. `dummy_data` writes tiny archives
in each source's real layout, for tests and for trying the builders offline.
"""

from ddep_jax.data.builders.ade20k import Ade20k
from ddep_jax.data.builders.digit_scenes import DigitScenes
from ddep_jax.data.builders.digit_scenes import DigitScenesConfig
from ddep_jax.data.builders.imagenet21k import Imagenet21k
from ddep_jax.data.builders.imagenet21k import Imagenet21kConfig
from ddep_jax.data.builders.pascal_context import PascalContext
from ddep_jax.data.builders.pascal_context import PascalContextConfig
from ddep_jax.data.builders.voc2012 import Voc2012
from ddep_jax.data.builders.voc2012 import Voc2012Config
