"""The fields every experiment config has, and the shared variants.

Each file in configs/ calls ``base_config()``, sets what its dataset needs, and ends with
``apply_variants(config, arg)`` so that ``--config=configs/cifar10.py:byol,runlocal``
works everywhere. The returned config is locked: an unknown key on the command line
(``--config.train.batchsize=...``) is an error. Nothing here imports JAX.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from emim.errors import UserError, missing_config_file
from emim.methods import defaults as method_defaults

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VECTOR_SOURCES = ("gaussian_mixture",)  # data sources of vectors, not images (emim/data/mixture.py)


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the field and the fix."""


def view_config(**overrides) -> ml_collections.ConfigDict:
  """A view's augmentation config with the SimCLR/BYOL defaults (emim/data/augment.py)."""
  cfg = ml_collections.ConfigDict(dict(
      crop_scale=(0.08, 1.0), flip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
      hue=0.1, grayscale_p=0.2, blur_p=0.0, blur_sigma=(0.1, 2.0), solarize_p=0.0))
  cfg.update(overrides)
  return cfg


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = method_defaults.method_config("emmi")

  c.model = ml_collections.ConfigDict(dict(
      backbone="resnet18", width=64, cifar_stem=True, dtype="float32",
      projector_dims=(2048, 2048, 512), projector_output_norm=False, predictor_dims=(2048, 512),
      # Both views (and the target's two) through one forward, each view normalised by its
      # own BatchNorm statistics (GroupedBatchNorm): the same model as a forward per view
      # (tests/test_fused_views.py), fewer, larger kernels on an accelerator.
      fused_views=False,
      # ViT backbones only (vit_tiny, vit_ti16, vit_s16, vit_b16, vit_l16; emim/models/vit.py):
      # pixels per patch side (16 at 224x224, 4 at 32x32), the last block's stochastic
      # depth, and what each scanned block keeps for the backward pass (emim/models/vit.py's
      # REMAT_POLICIES: "nothing_saveable" recomputes the block, "none" keeps everything).
      patch_size=16, drop_path=0.0, remat_policy="nothing_saveable"))

  # How the train state (params, optimiser state, EMA target) lies on the devices
  # (emim/sharding.py): "replicate" (a copy on every device), "fsdp" (each array of at
  # least fsdp_min_mib split along its largest dimension the device count divides, the
  # rest replicated) or "auto" (fsdp when the replicated state would exceed
  # auto_fsdp_gib per device, e.g. ViT-L/16 under AdamW; else replicate).
  c.sharding = ml_collections.ConfigDict(dict(params="auto", fsdp_min_mib=4.0, auto_fsdp_gib=2.0))

  c.data = ml_collections.ConfigDict(dict(
      source="synthetic", path="", train_split="train", test_split="test", tfds_name="", tfds_data_dir="",
      cache_dir="", decode_size=0, image_size=32, num_classes=10, num_train=4096, num_test=1024,
      mean=CIFAR_MEAN, std=CIFAR_STD,
      stream=False,  # True: a Grain pipeline on host workers (ImageNet) instead of data on device
      # Host decoding processes: the stream's (0: in the main process); a folder decoded
      # into memory uses at most this many, and at most one per core (0 or 1: the main one).
      workers=8,
      # Streaming: decode a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) that leaves its
      # crops their output size (the crops' boxes unchanged); False: at full size.
      reduced_decode=True,
      # Only these classes, labelled in sorted order: a subset of emim/data/class_lists.py
      # ("imagenet100": CMC's ImageNet-100) or a file of class names; "": every class.
      class_subset=""))

  # Two views: the asymmetric BYOL recipe (blur 1.0 / 0.1, solarise 0.0 / 0.2).
  c.augment = ml_collections.ConfigDict(dict(
      view1=view_config(blur_p=1.0, solarize_p=0.0), view2=view_config(blur_p=0.1, solarize_p=0.2)))

  c.optim = ml_collections.ConfigDict(dict(
      name="lars", base_lr=0.3, weight_decay=1e-5, momentum=0.9, trust_coefficient=1e-3,
      warmup_epochs=10, clip_norm=0.0,
      # AdamW only: the weight decay follows a cosine from weight_decay at the start to this
      # at the end (DINO's 0.04 -> 0.4); -1: constant.
      weight_decay_end=-1.0))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=256, num_epochs=100, num_steps=0,  # num_steps > 0 overrides num_epochs
      log_every=50, probe_lr=1e-3,
      # The values the progress lines show: "" a few (emim/console.py's SHOWN: loss, mi,
      # probe_acc, the MI estimates mi_infonce and mi_gaussian, ...), "all" every one, or
      # names, comma-separated. metrics.jsonl and TensorBoard hold every value regardless.
      progress_metrics="",
      # A Weights & Biases project that every metric also goes to ("": none; pip install
      # "emim[wandb]"; WANDB_MODE=offline keeps it on disk), beside metrics.jsonl and TensorBoard.
      wandb_project="",
      # GPU: XLA's deterministic kernels (--xla_gpu_deterministic_ops), so that a resumed
      # run equals an uninterrupted one to the bit there too. On an H100 (BENCHMARKS.md)
      # XLA's default kernels left a restarted CIFAR run's params 0.1 away from the
      # uninterrupted run's after 20 steps; these were equal to the bit and cost about 5%
      # per step (float32). False trades that for speed. CPU and TPU steps are
      # deterministic already.
      deterministic=True,
      # Non-finite updates are refused (the state stays as it was); this many refused in a
      # row stop the run, at the next progress line.
      max_nonfinite_in_a_row=10,
      # (first, last): a jax.profiler trace of these steps (1-based, inclusive) into
      # workdir/profile, for xprof or TensorBoard's profile plugin; (0, 0): none.
      profile_steps=(0, 0)))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000, keep=3, async_save=True,
      restore_step=-1,  # -1: the latest
      init_from=""))  # another run's work directory to fork from, when this one has no checkpoint

  c.eval = ml_collections.ConfigDict(dict(
      # The MI estimates on a fixed batch every this many steps; -1: with every progress
      # line (train.log_every); 0: off. The Gaussian one is of the min(d, n // 32) leading
      # principal directions (16 for this batch).
      mi_every_steps=-1,
      mi_batch_size=512,
      every_steps=0,  # periodic kNN on subsets during training; 0 = off
      knn_train_subset=10000, knn_test_subset=2000,
      knn_k=(20, 200), knn_temperature=0.07,
      # The linear probe of the evaluation program (python -m emim.evaluate).
      probe_mode="augmented", probe_epochs=100, probe_optimizer="sgd", probe_lr=0.1, probe_batch_size=256, probe_weight_decay=0.0,
      batch_size=512,  # feature extraction
  ))
  return c


def cifar_recipe(c: ml_collections.ConfigDict) -> None:
  """The CIFAR pre-training recipe shared by CIFAR-10 and CIFAR-100 (solo-learn's
  LARS settings; the EMMI paper's architecture: ResNet-18, CIFAR stem, Taylor order 4).
  Applied after the method is chosen (``apply_variants(..., recipe=cifar_recipe)``), so
  that it can set what one method needs."""
  # bf16 compute (params and every statistic stay float32): on an H100, 20 CIFAR-10 epochs
  # trained 1.5x faster than in float32 and probed the same (BENCHMARKS.md).
  c.model.backbone, c.model.cifar_stem, c.model.dtype = "resnet18", True, "bfloat16"
  # No blur at 32x32 (it removes most of the image); solarise on the second view only.
  c.augment.view1.blur_p = c.augment.view2.blur_p = 0.0
  c.optim.name, c.optim.base_lr, c.optim.weight_decay, c.optim.warmup_epochs = "lars", 1.0, 1e-5, 10
  c.train.batch_size, c.train.num_epochs, c.train.log_every = 256, 1000, 100
  c.checkpoint.every_steps = 2000
  c.eval.every_steps = 5000
  if c.method.name == "emmi":
    # Fewer embedding dimensions than samples (d = 64 < n = 256), so that every covariance
    # of the loss has full rank; with EMMI's unit-norm embeddings (its default) this took
    # kNN top-1 over 20 epochs on an H100 from 47.9% (d = 512, raw scale) to 66.3%; either
    # change alone did not help (BENCHMARKS.md, "CIFAR-10 variants side by side").
    c.model.projector_dims = (2048, 2048, 64)


def imagenet_recipe(c: ml_collections.ConfigDict) -> None:
  """ResNet-50 with the ImageNet stem at 224x224, the BYOL augmentation recipe, LARS."""
  c.data.image_size, c.data.mean, c.data.std = 224, IMAGENET_MEAN, IMAGENET_STD
  c.data.stream, c.data.decode_size = True, 256
  c.model.backbone, c.model.cifar_stem, c.model.dtype = "resnet50", False, "bfloat16"
  c.model.projector_dims, c.model.predictor_dims = (4096, 4096, 1024), (4096, 1024)
  if "target_momentum" in c.method:  # the methods with a momentum target (EMMI, BYOL, MoCo)
    c.method.target_momentum = 0.996
  c.optim.name, c.optim.base_lr, c.optim.weight_decay, c.optim.warmup_epochs = "lars", 0.3, 1.5e-6, 10
  c.train.batch_size, c.train.log_every = 1024, 100
  c.checkpoint.every_steps = 5000
  c.eval.every_steps = 10000


def vit_recipe(c: ml_collections.ConfigDict, backbone: str, patch_size: int) -> None:
  """A ViT in place of the dataset's ResNet, with the field's ViT self-supervised settings
  (DINO, Caron et al. 2021, main_dino.py's ViT-S/16 defaults; MoCo v3, Chen et al. 2021,
  its ViT recipe): AdamW, a batch-scaled learning rate, warm-up then cosine decay."""
  c.model.backbone, c.model.patch_size, c.model.dtype = backbone, patch_size, "bfloat16"
  c.optim.name = "adamw"
  c.optim.base_lr = 5e-4  # DINO: lr 0.0005 x batch/256 (optim.learning_rate_schedule scales it)
  c.optim.weight_decay, c.optim.weight_decay_end = 0.04, 0.4  # DINO: cosine from 0.04 to 0.4
  c.optim.warmup_epochs = 10  # DINO: 10 warm-up epochs
  # DINO: clip_grad 3.0, which clips each parameter tensor's norm alone; here the global
  # norm of all gradients is clipped at 3.0, a stronger clip than DINO's (not yet compared).
  c.optim.clip_norm = 3.0
  c.model.drop_path = 0.1  # DINO: drop_path_rate 0.1
  if "target_momentum" in c.method:  # DINO: teacher momentum 0.996, cosine to 1 (emim.target's schedule)
    c.method.target_momentum = 0.996
  if backbone in ("vit_b16", "vit_l16"):
    # MoCo v3's ViT-B and ViT-L recipes (its CONFIG.md): lr 1.5e-4 x batch/256, weight decay
    # 0.1 (constant), 40 warm-up epochs, momentum 0.99 to 1; no gradient clipping and timm's
    # default drop path (0). DINO's ViT-B/16 run is larger-batch and less documented. MoCo v3
    # also freezes the patch projection at its random init (--stop-grad-conv1, in all its ViT
    # recipes); emim trains it (not compared).
    c.optim.base_lr, c.optim.weight_decay, c.optim.weight_decay_end = 1.5e-4, 0.1, -1.0
    c.optim.warmup_epochs, c.optim.clip_norm, c.model.drop_path = 40, 0.0, 0.0
    if "target_momentum" in c.method:
      c.method.target_momentum = 0.99
  if c.method.name == "emmi" and c.data.image_size > 32:
    # No one has published EMMI on a ViT. EMMI's log-determinants need covariances of full
    # rank, estimated from the global batch (1024 here, the compiler reduces over the data
    # axis): d = 256 keeps the CIFAR recipe's ratio d / n = 1/4 (64 / 256), which took kNN
    # top-1 from 47.9% to 66.3% there (cifar_recipe). The hidden widths stay the ImageNet
    # recipe's 4096.
    c.model.projector_dims = (4096, 4096, 256)


# Backbone variants: name -> (ViT, patch size); a dataset file names those it offers.
VIT_VARIANTS_32 = {"vit_s": ("vit_s16", 4)}  # 32x32 images: 8x8 patches of 4 pixels
VIT_VARIANTS_224 = {"vit_s16": ("vit_s16", 16), "vit_b16": ("vit_b16", 16), "vit_l16": ("vit_l16", 16)}


def apply_variants(c: ml_collections.ConfigDict, arg: str | None, recipe=None,
                   backbones: dict | None = None) -> ml_collections.ConfigDict:
  """Apply comma-separated variants: a method name (``byol``, ``simclr``, ...), seed
  002's ablations of it (``no_predictor``, ``no_stop_gradient``, ``no_regularizer``), a
  backbone the dataset offers (``backbones``: name -> (ViT, patch size), e.g. ``vit_s16``)
  and/or ``runlocal`` (a tiny model and schedule that runs on a laptop CPU in about a minute).

  The method comes first, then its ablations, then ``recipe(c)`` (a dataset's recipe,
  which may set fields for one method), then the backbone's recipe (``vit_recipe``), then
  ``runlocal``, which shrinks whatever the recipes chose."""
  variants = [v for v in (arg or "").split(",") if v]
  methods = method_defaults.available()
  backbones = backbones or {}
  for variant in variants:
    if (variant != "runlocal" and variant not in methods and variant not in method_defaults.ABLATIONS
        and variant not in backbones):
      offered = f", a backbone ({', '.join(backbones)})" if backbones else ""
      raise ConfigError(f"Unknown config variant {variant!r}; use a method ({', '.join(methods)}), an ablation "
                        f"({', '.join(method_defaults.ABLATIONS)}){offered} or 'runlocal'.")
  for variant in variants:
    if variant in methods:
      c.method = method_defaults.method_config(variant)
  for variant in variants:
    if variant in method_defaults.ABLATIONS:
      field = method_defaults.ABLATIONS[variant]
      if field not in c.method:
        raise ConfigError(f"The {variant} variant does not apply to {c.method.name}: it applies to "
                          f"{', '.join(method_defaults.ablation_methods(variant))}.")
      c.method[field] = False
  if recipe is not None:
    recipe(c)
  for variant in variants:
    if variant in backbones:
      vit_recipe(c, *backbones[variant])
  if "runlocal" in variants:
    # ResNet-50's block kept for the ImageNet configs, at a tiny width and 32x32 views;
    # a ViT becomes vit_tiny with 4-pixel patches; the vectors' MLP kept, narrower.
    if c.model.backbone in VIT_BACKBONES:
      c.model.backbone, c.model.patch_size = "vit_tiny", 4
    elif c.model.backbone != "mlp":
      c.model.backbone = "resnet_tiny_bottleneck" if c.model.backbone == "resnet50" else "resnet_tiny"
    c.model.width = 8 if c.model.backbone != "mlp" else 32
    if c.data.image_size > 32:
      c.data.image_size, c.data.decode_size = 32, 40
    c.data.workers = min(c.data.workers, 2)
    c.model.projector_dims, c.model.predictor_dims = (64, 32), (64, 32)
    c.data.num_train, c.data.num_test = min(c.data.num_train, 512), min(c.data.num_test, 256)
    c.train.batch_size, c.train.num_steps, c.train.log_every = 32, 4, 2
    c.optim.warmup_epochs = 0
    c.checkpoint.every_steps = 2
    c.eval.knn_train_subset, c.eval.knn_test_subset, c.eval.batch_size = 256, 128, 64
    c.eval.mi_batch_size, c.eval.probe_epochs, c.eval.probe_batch_size = 128, 2, 64
  c.lock()
  return c


def load_config_file(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of a config file, as ``--config=...`` loads it (for notebooks, tests and
  benchmarks): ``load_config_file("configs/cifar10.py:byol,runlocal")``, the command
  line's form, or the path and the variants apart, ``load_config_file(path, "byol")``.

  Raises:
    ConfigError: the file does not exist or has no ``get_config``, or the variants were
      given twice.
  """
  text = str(path)
  # "path.py:variants": split at the colon after the file name (a Windows drive's colon
  # comes before it).
  stem, sep, variants = text.rpartition(":")
  if sep and stem.endswith(".py") and not pathlib.Path(text).is_file():
    if arg is not None:
      raise ConfigError(f"load_config_file({text!r}, {arg!r}): the variants are given twice; give them after the colon "
                        "or as the second argument.")
    path, arg = stem, variants or None
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    raise ConfigError(f"{path} is a folder: give a config file in it, e.g. configs/cifar10.py.")
  if not path.is_file():
    message = missing_config_file(str(path))
    raise ConfigError(message[0].upper() + message[1:])
  if path.suffix != ".py":
    raise ConfigError(f"{path} is not a Python config file: a config is a .py file with get_config(arg), "
                      "e.g. configs/cifar10.py.")
  spec = importlib.util.spec_from_file_location(f"emim_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"The config file {path} defines no get_config(arg): it is not an emim config.")
  return module.get_config(arg)


def validate(c: ml_collections.ConfigDict) -> None:
  """Refuse values that cannot work, before any data is read or anything compiled; each
  message names the field and a value that works."""

  def positive(field: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f"--config.{field}={value!r}: it must be a positive integer.")

  positive("train.batch_size", c.train.batch_size)
  positive("model.width", c.model.width)
  positive("data.image_size", c.data.image_size)
  positive("train.log_every", c.train.log_every)
  positive("train.max_nonfinite_in_a_row", c.train.max_nonfinite_in_a_row)
  positive("checkpoint.every_steps", c.checkpoint.every_steps)
  positive("checkpoint.keep", c.checkpoint.keep)
  positive("eval.mi_batch_size", c.eval.mi_batch_size)
  positive("eval.batch_size", c.eval.batch_size)
  profile = tuple(c.train.profile_steps)
  if len(profile) != 2 or not all(isinstance(v, int) for v in profile) or not (
      profile == (0, 0) or 1 <= profile[0] <= profile[1]):
    raise ConfigError(f"--config.train.profile_steps={profile!r}: give (first, last) steps to trace, 1 <= first <= "
                      "last, e.g. '(100, 110)'; (0, 0) traces none.")
  if c.train.num_steps < 0 or c.train.num_epochs < 0 or (c.train.num_steps == 0 and c.train.num_epochs == 0):
    raise ConfigError(f"--config.train.num_steps={c.train.num_steps} and --config.train.num_epochs="
                      f"{c.train.num_epochs}: set one of them to a positive number (num_steps wins when > 0).")
  for field in ("projector_dims", "predictor_dims"):
    dims = tuple(c.model[field])
    if not dims or any(not isinstance(d, int) or d <= 0 for d in dims):
      raise ConfigError(f"--config.model.{field}={dims!r}: give the width of every layer, the output's last, "
                        "e.g. '(2048, 2048, 512)'.")
  if c.optim.base_lr < 0:
    raise ConfigError(f"--config.optim.base_lr={c.optim.base_lr}: a learning rate cannot be negative.")
  if c.eval.mi_every_steps < -1:
    raise ConfigError(f"--config.eval.mi_every_steps={c.eval.mi_every_steps}: -1 (with every progress line), 0 (off) "
                      "or a number of steps.")
  if c.eval.every_steps < 0:
    raise ConfigError(f"--config.eval.every_steps={c.eval.every_steps}: 0 (off) or a number of steps.")
  if c.eval.every_steps:
    positive("eval.knn_train_subset", c.eval.knn_train_subset)
    positive("eval.knn_test_subset", c.eval.knn_test_subset)
  if c.method.name not in method_defaults.available():
    raise ConfigError(f"--config.method.name={c.method.name!r}: choose one of {', '.join(method_defaults.available())} "
                      "(a variant, e.g. --config=configs/cifar10.py:byol, sets the method with its defaults).")
  vectors = c.data.source in VECTOR_SOURCES
  if vectors != (c.model.backbone == "mlp"):
    raise ConfigError(f"--config.model.backbone={c.model.backbone!r} with --config.data.source={c.data.source!r}: "
                      "the Gaussian mixture's vectors need backbone 'mlp' (configs/gaussian_mixture.py), images a "
                      "ResNet or a ViT.")
  _validate_vit_and_sharding(c)
  if c.data.get("class_subset", "") and c.data.source not in ("image_folder", "tfds"):
    raise ConfigError(f"--config.data.class_subset={c.data.class_subset!r}: the {c.data.source} source generates its "
                      "classes (set --config.data.num_classes instead); subsets are of image folders and TFDS datasets.")
  if vectors and c.data.stream:
    raise ConfigError("--config.data.stream=True: the Gaussian mixture is generated in memory; set it False.")
  if c.train.get("wandb_project") and importlib.util.find_spec("wandb") is None:
    raise ConfigError(f"--config.train.wandb_project={c.train.wandb_project!r} logs to Weights & Biases, which is not "
                      "installed: pip install \"emim[wandb]\" (or pip install wandb), or leave the field empty.")
  _check_choices(c)
  if c.data.source == "image_folder" and not c.data.path:
    raise ConfigError("--config.data.path is empty: point it at the image folder (a directory or .tar.gz laid out "
                      "as split/class/*.jpg).")


def _check_choices(c: ml_collections.ConfigDict) -> None:
  """The fields that name one of a list (a data source, a backbone, an optimiser...),
  checked against the modules' own lists. Imported here, not at the top: loading a config
  imports no JAX, and ``validate`` runs only where training does."""
  from emim import models, optim
  from emim.data import sources

  for field, value, choices in (("data.source", c.data.source, sources.SOURCES),
                                ("model.backbone", c.model.backbone, models.ARCHITECTURES),
                                ("model.dtype", c.model.dtype, tuple(models.DTYPES)),
                                ("optim.name", c.optim.name, optim.OPTIMIZERS)):
    if value not in choices:
      raise ConfigError(f"--config.{field}={value!r}: choose one of {', '.join(choices)}.")


VIT_BACKBONES = ("vit_tiny", "vit_ti16", "vit_s16", "vit_b16", "vit_l16")  # emim/models/vit.py (no JAX here)
REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
SHARDING_RULES = ("replicate", "fsdp", "auto")


def _validate_vit_and_sharding(c: ml_collections.ConfigDict) -> None:
  m = c.model
  if m.backbone in VIT_BACKBONES:
    patch = m.get("patch_size", 16)
    if not isinstance(patch, int) or patch <= 0 or c.data.image_size % patch:
      raise ConfigError(f"--config.model.patch_size={patch!r} with --config.data.image_size={c.data.image_size}: a ViT "
                        "needs a positive patch size that divides the image size (16 at 224, 4 at 32).")
    if not 0.0 <= m.get("drop_path", 0.0) < 1.0:
      raise ConfigError(f"--config.model.drop_path={m.drop_path}: a probability in [0, 1), e.g. 0.1.")
    if m.get("remat_policy", "nothing_saveable") not in REMAT_POLICIES:
      raise ConfigError(f"--config.model.remat_policy={m.remat_policy!r}: choose one of {', '.join(REMAT_POLICIES)}.")
  if "sharding" in c:
    if c.sharding.params not in SHARDING_RULES:
      raise ConfigError(f"--config.sharding.params={c.sharding.params!r}: choose one of {', '.join(SHARDING_RULES)}.")
    for field, unit, zero in (("fsdp_min_mib", "MiB", "splits every array"), ("auto_fsdp_gib", "GiB", "fsdp on several devices")):
      if c.sharding[field] < 0:  # named alone: the line says which of the two was given
        raise ConfigError(f"--config.sharding.{field}={c.sharding[field]}: give a size in {unit}, 0 or more (0: {zero}).")


PROBE_MODES, PROBE_OPTIMIZERS = ("augmented", "features"), ("sgd", "lars")


def validate_eval(c: ml_collections.ConfigDict) -> None:
  """The evaluation program's fields, checked before any checkpoint is read."""
  e = c.eval
  for field in ("probe_epochs", "probe_batch_size", "batch_size"):
    if not isinstance(e[field], int) or e[field] <= 0:
      raise ConfigError(f"--config.eval.{field}={e[field]!r}: it must be a positive integer.")
  if e.probe_mode not in PROBE_MODES:
    raise ConfigError(f"--config.eval.probe_mode={e.probe_mode!r}: choose one of {PROBE_MODES}.")
  if e.probe_mode == "augmented" and c.data.source in VECTOR_SOURCES:
    raise ConfigError("--config.eval.probe_mode='augmented' crops images; the Gaussian mixture's vectors are probed "
                      "on their features: --config.eval.probe_mode=features.")
  if e.probe_optimizer not in PROBE_OPTIMIZERS:
    raise ConfigError(f"--config.eval.probe_optimizer={e.probe_optimizer!r}: choose one of {PROBE_OPTIMIZERS}.")
  if not e.probe_lr > 0:
    raise ConfigError(f"--config.eval.probe_lr={e.probe_lr}: it must be positive.")
  if not e.knn_temperature > 0 or any(not isinstance(k, int) or k <= 0 for k in e.knn_k):
    raise ConfigError(f"--config.eval.knn_k={tuple(e.knn_k)} and knn_temperature={e.knn_temperature}: positive "
                      "integers and a positive temperature.")
