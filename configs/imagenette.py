"""EMMI on Imagenette (10 easy ImageNet classes, 9,469 training and 3,925 validation
images): the small real ImageNet-like set to check a pipeline on first. ResNet-50 at
224x224, streamed as ImageNet is, at batch 256 for 200 epochs.

    python -m emim.main --config=configs/imagenette.py --workdir=runs/imagenette
    python -m emim.main --config=configs/imagenette.py:runlocal --workdir=/tmp/imagenette   # tiny, CPU

From TFDS (prepare once: tfds build imagenette/320px-v2 --file_format=array_record), or
an image folder of train/<wnid>/ and val/<wnid>/ (--config.data.source=image_folder
--config.data.path=... --config.data.test_split=val).
"""

from emim.config_base import apply_variants, base_config, imagenet_recipe


def _recipe(c):
  imagenet_recipe(c)
  c.train.batch_size, c.checkpoint.every_steps, c.eval.every_steps = 256, 1000, 2000


def get_config(arg=None):
  c = base_config()
  c.data.source, c.data.tfds_name = "tfds", "imagenette/320px-v2"
  c.data.test_split, c.data.num_classes = "validation", 10
  c.train.num_epochs = 200
  return apply_variants(c, arg, recipe=_recipe)
