"""EMMI on ImageNet-100 (the EMMI paper reports 81.1% linear top-1): ResNet-50, 400 epochs.

ImageNet-100 is CMC's 100-class subset of ImageNet-1k (emim/data/class_lists.py), taken
from the prepared TFDS imagenet2012 (ArrayRecord; see the README's Data section), the
labels numbering the 100 classes in sorted order:
    python -m emim.main --config=configs/imagenet100.py --workdir=gs://bucket/runs/in100 \\
        --config.data.tfds_data_dir=gs://bucket/tensorflow_datasets
or from an image folder holding them (the full ImageNet's train/ and val/, or one made of
the 100 classes; the other classes are left out):
    python -m emim.main --config=configs/imagenet100.py --config.data.source=image_folder \\
        --config.data.path=/data/imagenet --config.data.test_split=val --workdir=runs/in100
"""

from emim.config_base import VIT_VARIANTS_224, apply_variants, base_config, imagenet_recipe


def get_config(arg=None):
  c = base_config()
  c.data.source, c.data.tfds_name, c.data.class_subset = "tfds", "imagenet2012", "imagenet100"
  c.data.test_split, c.data.num_classes = "validation", 100
  c.train.num_epochs = 400
  return apply_variants(c, arg, recipe=imagenet_recipe, backbones=VIT_VARIANTS_224)
