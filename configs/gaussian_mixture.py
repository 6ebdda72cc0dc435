"""The SDMI/JMI paper's synthetic experiment: a labelled Gaussian mixture of vectors, MLP encoders.

Ten clusters in R^16, x = mu_k + s; each view adds fresh Gaussian noise (and masks
coordinates, with augment.view*.mask_p > 0). Without masking the MI between two views is
known exactly (emim/data/mixture.py) and logged as eval/true_mi beside the estimates.
About a minute per method on a 2-core CPU:
    python -m emim.main --config=configs/gaussian_mixture.py:sdmi --workdir=/tmp/gm_sdmi
Every method is a variant (:sdmi, :taylor_dv, :byol, :simsiam, :barlow_twins, :simclr,
:vicreg, :emmi), and so are the ablations (:sdmi,no_predictor, :taylor_dv,no_regularizer, ...).

Two view models:
* the default, point views: x = mu_k + s with s ~ N(0, I), each view x + N(0, 0.5^2 I).
  The views share the cluster and the instance part s; the exact MI is 10.27 nats, of
  which at most log 10 = 2.30 is the cluster: most of it is instance detail.
* ``cluster_views`` (e.g. :sdmi,cluster_views): data.instance_std = 0, each view
  mu_k + N(0, 1.0^2 I). The views share only the cluster, so the MI is at most log K
  (2.12 nats here, the noise hiding some of the 2.30), and all an encoder can keep is
  which cluster a view came from.
"""

import ml_collections

from emim.config_base import ConfigError, apply_variants, base_config

# Variants of this config's data (the rest are apply_variants'): the views' model.
VIEW_MODELS = ("cluster_views",)


def _view(noise_std: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(noise_std=noise_std, mask_p=0.0))


def get_config(arg=None):
  variants = [v for v in (arg or "").split(",") if v]
  c = base_config()
  c.data.source, c.data.num_classes, c.data.num_train, c.data.num_test = "gaussian_mixture", 10, 8192, 2048
  c.data.dim = 16
  c.data.separation = 1.0  # cluster means ~ N(0, separation^2 I)
  c.data.instance_std = 1.0  # what two views of one point share besides the cluster
  c.augment = ml_collections.ConfigDict(dict(view1=_view(0.5), view2=_view(0.5)))
  if "cluster_views" in variants:
    # Views share the cluster alone; noise 1.0 so that a view does not name its cluster
    # outright (with 0.5 the exact MI is 2.302 of log 10 = 2.303: nothing left to learn).
    c.data.instance_std = 0.0
    c.augment = ml_collections.ConfigDict(dict(view1=_view(1.0), view2=_view(1.0)))
  c.model.backbone, c.model.width, c.model.dtype = "mlp", 256, "float32"
  c.model.projector_dims, c.model.predictor_dims = (256, 64), (256, 64)
  c.optim.name, c.optim.base_lr, c.optim.weight_decay, c.optim.warmup_epochs = "adamw", 1e-3, 1e-4, 1
  c.train.batch_size, c.train.num_steps, c.train.log_every = 256, 1500, 50
  c.checkpoint.every_steps = 500
  c.eval.mi_batch_size = 512
  c.eval.every_steps, c.eval.knn_train_subset, c.eval.knn_test_subset = 250, 8192, 2048
  c.eval.probe_mode, c.eval.probe_epochs, c.eval.knn_temperature = "features", 50, 0.1
  try:
    return apply_variants(c, ",".join(v for v in variants if v not in VIEW_MODELS))
  except ConfigError as e:
    if not str(e).startswith("Unknown config variant"):
      raise
    raise ConfigError(f"{e} (configs/gaussian_mixture.py also takes the view model "
                      f"{', '.join(VIEW_MODELS)}.)") from None
