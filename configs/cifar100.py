"""EMMI on CIFAR-100: the CIFAR-10 recipe with 100 classes.

    python -m emim.data.prepare cifar100     # once: the official archive -> ~/emim_data/cifar100
    python -m emim.main --config=configs/cifar100.py --workdir=runs/cifar100

Reads the image folder at data.path; a prepared TFDS dataset instead:
--config.data.source=tfds (docs/getting-data.md).
"""

from emim.config_base import apply_variants, base_config, cifar_recipe


def get_config(arg=None):
  c = base_config()
  c.data.source, c.data.path, c.data.tfds_name = "image_folder", "~/emim_data/cifar100", "cifar100"
  c.data.image_size, c.data.num_classes = 32, 100
  c.data.mean, c.data.std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
  return apply_variants(c, arg, recipe=cifar_recipe)
