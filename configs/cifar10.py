"""EMMI on CIFAR-10: ResNet-18 with the CIFAR stem, momentum encoder, Taylor order 4.

    python -m emim.main --config=configs/cifar10.py --workdir=runs/cifar10
    python -m emim.main --config=configs/cifar10.py:byol --workdir=runs/cifar10_byol

Reads the image folder at data.path, ~/emim_data/cifar10, which
``python -m emim.data.prepare cifar10`` writes (it downloads the official archive; no
TensorFlow). Another copy: --config.data.path=DIR (the archive beside this repository:
--config.data.path=../shared/data/cifar10-jpeg.tar.gz); a prepared TFDS dataset:
--config.data.source=tfds (docs/getting-data.md).
"""

from emim.config_base import VIT_VARIANTS_32, CIFAR_MEAN, CIFAR_STD, apply_variants, base_config, cifar_recipe


def get_config(arg=None):
  c = base_config()
  c.data.source, c.data.path, c.data.tfds_name = "image_folder", "~/emim_data/cifar10", "cifar10"
  c.data.image_size, c.data.num_classes, c.data.mean, c.data.std = 32, 10, CIFAR_MEAN, CIFAR_STD
  return apply_variants(c, arg, recipe=cifar_recipe, backbones=VIT_VARIANTS_32)
