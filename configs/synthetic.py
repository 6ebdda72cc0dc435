"""The embedded default: EMMI on a synthetic Gaussian mixture of 16x16 images.

Runs offline on a 2-core CPU in a few minutes and shows the MI estimate rising:
    python -m emim.main --config=configs/synthetic.py --workdir=/tmp/emim_synthetic
"""

from emim.config_base import apply_variants, base_config


def get_config(arg=None):
  c = base_config()
  c.data.source = "synthetic"
  c.data.image_size, c.data.num_classes, c.data.num_train, c.data.num_test = 16, 10, 4096, 1024
  c.data.mean, c.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  c.model.backbone, c.model.width, c.model.cifar_stem = "resnet_tiny", 16, True
  c.model.projector_dims, c.model.predictor_dims = (256, 64), (256, 64)
  # Milder views than ImageNet's: at 16x16 a 0.08 crop keeps a few pixels.
  for view in (c.augment.view1, c.augment.view2):
    view.crop_scale, view.blur_p, view.grayscale_p = (0.3, 1.0), 0.0, 0.1
    view.brightness, view.contrast, view.saturation, view.hue = 0.2, 0.2, 0.2, 0.05
  c.optim.name, c.optim.base_lr, c.optim.weight_decay, c.optim.warmup_epochs = "adamw", 2e-3, 1e-4, 2
  c.train.batch_size, c.train.num_epochs, c.train.log_every = 128, 30, 50
  c.checkpoint.every_steps = 100
  return apply_variants(c, arg)
