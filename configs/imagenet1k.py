"""EMMI on ImageNet-1K: ResNet-50, bf16 compute, LARS at batch 1024, 100 epochs.

    python -m emim.main --config=configs/imagenet1k.py --workdir=gs://bucket/runs/in1k
"""

from emim.config_base import VIT_VARIANTS_224, apply_variants, base_config, imagenet_recipe


def get_config(arg=None):
  c = base_config()
  c.data.source, c.data.tfds_name, c.data.test_split, c.data.num_classes = "tfds", "imagenet2012", "validation", 1000
  c.train.num_epochs = 100
  return apply_variants(c, arg, recipe=imagenet_recipe, backbones=VIT_VARIANTS_224)
