"""EMMI on ImageNet-100 (the EMMI paper reports 81.1% linear top-1): ResNet-50, 400 epochs.

ImageNet-100 is the 100-class subset of CMC (Tian et al.), given as an image folder
train/<wnid>/*.JPEG, val/<wnid>/*.JPEG:
    python -m emim.main --config=configs/imagenet100.py --config.data.path=/data/imagenet100 --workdir=runs/in100
"""

from emim.config_base import apply_variants, base_config, imagenet_recipe


def get_config(arg=None):
  c = base_config()
  c.data.source, c.data.path, c.data.test_split, c.data.num_classes = "image_folder", "", "val", 100
  c.train.num_epochs = 400
  return apply_variants(c, arg, recipe=imagenet_recipe)
