"""Every config field, what it does, and the comments the code gives it:
``python -m emim.main --config=configs/cifar10.py:byol --print_config`` prints the
resolved config (variants and ``--config.x=y`` overrides applied) that way and exits.

``FIELDS`` says in one line what each field is (tests/test_config_doc.py checks that
every field of every config and method has its line); the comments written beside a
field in ``emim/config_base.py``, ``emim/methods/defaults.py`` or the config file itself,
which say why it has its value, are read from those files and printed above it. Nothing
here imports JAX.
"""

from __future__ import annotations

import ast
import io
import pathlib
import tokenize

import ml_collections

_VIEW = {
    "crop_scale": "(min, max) area of the random crop, as a share of the image",
    "flip_p": "probability of a horizontal flip",
    "jitter_p": "probability of colour jitter (brightness, contrast, saturation, hue below)",
    "brightness": "colour jitter: brightness strength", "contrast": "colour jitter: contrast strength",
    "saturation": "colour jitter: saturation strength", "hue": "colour jitter: hue strength",
    "grayscale_p": "probability of turning the view grey",
    "blur_p": "probability of a Gaussian blur", "blur_sigma": "(min, max) of the blur's standard deviation, in pixels",
    "solarize_p": "probability of solarisation",
    "noise_std": "vectors (Gaussian mixture): standard deviation of the Gaussian noise added to each view",
    "mask_p": "vectors (Gaussian mixture): probability that a coordinate is zeroed (0: none; the exact MI is then "
              "known)",
}

FIELDS = {
    "seed": "seed of the initialisation, the augmentations and the data order (one run, one seed)",
    # method
    "method.name": "the objective: emmi, byol, simsiam, moco, sdmi, simclr, barlow_twins, vicreg, taylor_dv (a config "
                   "variant, e.g. :byol, sets it with the method's defaults)",
    "method.form": "EMMI: the log-determinant form of the Gaussian MI surrogate",
    "method.backend": "EMMI: how log-determinants are computed (taylor: a polynomial, matmuls only)",
    "method.eps": "EMMI: the ridge added to each covariance before its log-determinant",
    "method.order": "EMMI: the order of the Taylor series of log det",
    "method.rescale": "EMMI: how each covariance is scaled into the series' region of convergence",
    "method.rescale_c": "EMMI: the rescaling's factor",
    "method.eig_momentum": "EMMI: momentum of the tracked largest eigenvalue (max_eig rescaling)",
    "method.power_iters": "EMMI: power iterations a step for the largest eigenvalue",
    "method.w_inv": "EMMI: the weight of the joint-entropy terms",
    "method.smoothing": "EMMI: covariance smoothing across steps (0: each batch's own statistics)",
    "method.normalize": "EMMI: the embedding's normalisation before its statistics (l2 or none)",
    "method.target": "whether the method has a momentum (EMA) target encoder",
    "method.target_momentum": "the target's EMA momentum at step 0, raised to 1 by a cosine schedule",
    "method.predictor": "whether the online branch has a predictor (the no_predictor ablation sets False)",
    "method.stop_gradient": "whether no gradient flows into the target branch (the no_stop_gradient ablation sets "
                            "False)",
    "method.regularizer": "whether the JMI objective keeps its marginal (anti-collapse) term (the no_regularizer "
                          "ablation sets False)",
    "method.tau": "the softmax temperature of the contrastive critic (SimCLR, MoCo)",
    "method.lambd": "the weight of the off-diagonal / marginal term (Barlow Twins, Taylor-DV)",
    "method.sim_coeff": "VICReg: weight of the invariance term", "method.std_coeff": "VICReg: weight of the variance "
                                                                                     "term",
    "method.cov_coeff": "VICReg: weight of the covariance term",
    "method.target_update": "SDMI: how the target branch is updated: alternating (its own ascent steps) or ema",
    "method.alternate_every": "SDMI: steps of one branch before the other's turn",
    "method.target_lr_scale": "SDMI: the target's learning rate over the online one's",
    "method.marginal_term": "SDMI: which steps ascend the whole DV bound with its marginal term",
    "method.critic_tau": "SDMI: the temperature of the cosine critic of the marginal term",
    # model
    "model.backbone": "the encoder: resnet18, resnet50, resnet_tiny, resnet_tiny_bottleneck, vit_ti16, vit_s16, "
                      "vit_b16, vit_l16, vit_tiny (tests), or mlp (vectors)",
    "model.width": "the backbone's base width (ResNet: channels of the first stage; MLP: hidden units)",
    "model.cifar_stem": "a 3x3 stem without max-pooling (32x32 images) instead of ImageNet's 7x7 and pooling",
    "model.dtype": "the compute dtype (float32 or bfloat16); parameters and statistics stay float32",
    "model.projector_dims": "the projector MLP's layer widths, the embedding's last",
    "model.projector_output_norm": "whether the projector's last layer is followed by a normalisation",
    "model.predictor_dims": "the predictor MLP's layer widths (methods with a predictor)",
    "model.fused_views": "both views through one forward pass, each with its own BatchNorm statistics",
    "model.patch_size": "ViT: pixels per patch side (16 at 224x224, 4 at 32x32)",
    "model.drop_path": "ViT: stochastic depth of the last block (linearly less before it; online branch only)",
    "model.remat_policy": "ViT: what each block keeps for the backward pass (nothing_saveable, dots_saveable, none)",
    "sharding.params": "the train state's layout: replicate, fsdp (large arrays split over the devices) or auto",
    "sharding.fsdp_min_mib": "fsdp: arrays smaller than this (MiB) stay replicated",
    "sharding.auto_fsdp_gib": "auto: fsdp when a replicated train state would exceed this (GiB per device)",
    # data
    "data.source": "where examples come from: synthetic, image_folder, tfds or gaussian_mixture",
    "data.path": "image_folder: the directory or .tar.gz of split/class/*.jpg (CIFAR: python -m emim.data.prepare "
                 "writes it)",
    "data.train_split": "the training split's name (a folder of the image folder, or a TFDS split)",
    "data.test_split": "the test split's name (evaluation, kNN)",
    "data.tfds_name": "tfds: the dataset's TFDS name (also names the dataset for emim.data.prepare's hint)",
    "data.tfds_data_dir": "tfds: where the prepared dataset is ('': ~/tensorflow_datasets)",
    "data.cache_dir": "where a decoded image folder is kept ('': .emim_cache beside the work directory)",
    "data.decode_size": "decode every image to this size, shorter side then centre crop (0: as they are)",
    "data.image_size": "the side of the views the encoder sees, in pixels",
    "data.num_classes": "the number of classes (labels for the probe and kNN; synthetic data's clusters)",
    "data.num_train": "synthetic and Gaussian-mixture data: training examples generated",
    "data.num_test": "synthetic and Gaussian-mixture data: test examples generated",
    "data.mean": "per-channel mean subtracted from images (0-1 scale)",
    "data.std": "per-channel standard deviation images are divided by",
    "data.stream": "stream from host workers (Grain) instead of holding the dataset on the devices",
    "data.workers": "host decoding processes",
    "data.reduced_decode": "streaming: decode JPEGs at a reduced DCT scale where the crop allows",
    "data.class_subset": "only these classes ('imagenet100' or a file of class names; '': all)",
    "data.dim": "Gaussian mixture: the dimension of the vectors",
    "data.separation": "Gaussian mixture: the spread of the cluster means",
    "data.instance_std": "Gaussian mixture: the spread of points around their cluster's mean",
    # augment
    **{f"augment.view{i}.{k}": f"view {i}: {v}" for i in (1, 2) for k, v in _VIEW.items()},
    # optim
    "optim.name": "the optimiser: lars, sgd or adamw",
    "optim.base_lr": "the peak learning rate at batch 256 (scaled linearly with train.batch_size)",
    "optim.weight_decay": "weight decay (not on biases and normalisation parameters)",
    "optim.momentum": "momentum (lars, sgd)",
    "optim.trust_coefficient": "LARS: the trust coefficient of the layer-wise rate",
    "optim.warmup_epochs": "epochs of linear warm-up before the cosine decay",
    "optim.clip_norm": "clip the gradient's global norm to this (0: no clipping)",
    "optim.weight_decay_end": "adamw: the weight decay at the end of a cosine from weight_decay (-1: constant)",
    # train
    "train.batch_size": "the global batch of pairs of views (all devices together)",
    "train.num_epochs": "the run's length in epochs (when train.num_steps is 0)",
    "train.num_steps": "the run's length in steps (> 0 overrides train.num_epochs)",
    "train.log_every": "steps between progress lines (metrics.jsonl gets every line)",
    "train.probe_lr": "the learning rate of the online linear probe (probe_acc), trained beside on stopped features",
    "train.wandb_project": "a Weights & Biases project to log every metric to as well ('': none)",
    "train.progress_metrics": "the values a progress line shows: '' a few, 'all', or names, comma-separated",
    "train.deterministic": "GPU: deterministic kernels, so that a resumed run equals an uninterrupted one",
    "train.max_nonfinite_in_a_row": "non-finite updates refused in a row before the run stops",
    "train.profile_steps": "(first, last) steps to trace with the JAX profiler into workdir/profile; (0, 0): none",
    # checkpoint
    "checkpoint.every_steps": "steps between checkpoints (one is also saved at the end and when stopped)",
    "checkpoint.keep": "how many checkpoints are kept",
    "checkpoint.async_save": "save in the background while training continues",
    "checkpoint.restore_step": "the step to resume from (-1: the latest)",
    "checkpoint.init_from": "another run's work directory to start from when this one has no checkpoint",
    # eval
    "eval.mi_every_steps": "steps between the MI estimates on a fixed batch (-1: with every progress line; 0: off)",
    "eval.mi_batch_size": "examples in the fixed batch of the MI estimates",
    "eval.every_steps": "steps between kNN evaluations during training (0: off)",
    "eval.knn_train_subset": "kNN during training: training examples used as neighbours",
    "eval.knn_test_subset": "kNN during training: test examples classified",
    "eval.knn_k": "the numbers of neighbours of kNN (one accuracy each)",
    "eval.knn_temperature": "the temperature of kNN's weighted vote",
    "eval.probe_mode": "emim.evaluate's linear probe: on augmented crops, or on fixed features",
    "eval.probe_epochs": "emim.evaluate's linear probe: epochs",
    "eval.probe_optimizer": "emim.evaluate's linear probe: sgd or lars",
    "eval.probe_lr": "emim.evaluate's linear probe: learning rate",
    "eval.probe_batch_size": "emim.evaluate's linear probe: batch size",
    "eval.probe_weight_decay": "emim.evaluate's linear probe: weight decay",
    "eval.batch_size": "the batch of feature extraction (evaluation, kNN)",
}

_REPO = pathlib.Path(__file__).resolve().parents[1]
# Where fields are given comments: (file, the section its keyword arguments belong to,
# by the function they are in). A config file's own ``c.a.b = ...`` lines name theirs.
# Only the functions that define the fields: a recipe's or a variant's comments say why it
# changes a field, which holds only where it is applied.
_SOURCES = ((_REPO / "emim" / "config_base.py", {"view_config": "augment.view"}, ("base_config", "view_config")),
            (_REPO / "emim" / "methods" / "defaults.py", {None: "method"}, None))


def _comments(source: str) -> tuple[dict[int, str], dict[int, str]]:
  """({line: its whole-line comment}, {line: its trailing comment}) of Python source."""
  whole, trailing = {}, {}
  lines = source.splitlines()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      row, col = tok.start
      text = tok.string.lstrip("#").strip()
      (whole if not lines[row - 1][:col].strip() else trailing)[row] = text
  return whole, trailing


def _comment_at(line: int, first_on_line: bool, last_on_line: bool, whole, trailing) -> str:
  """The comment block just above ``line`` (for the line's first field) and the comment
  at its end (for its last)."""
  above = []
  if first_on_line:
    row = line - 1
    while row in whole:
      above.insert(0, whole[row])
      row -= 1
  if last_on_line and line in trailing:
    above.append(trailing[line])
  return " ".join(above)


def _dotted(node: ast.AST) -> str | None:
  """``c.data.path`` -> "data.path"; None for anything else."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.insert(0, node.attr)
    node = node.value
  return ".".join(parts) if isinstance(node, ast.Name) and node.id == "c" and parts else None


def source_comments(path: pathlib.Path, sections: dict | None = None,
                    functions: tuple[str, ...] | None = None) -> dict[str, str]:
  """{field: comment} from one file: keyword arguments (``dict(batch_size=256, ...)``)
  inside ``c.<section> = ...`` (or in a function ``sections`` names), and assignments to
  ``c.a.b``; only in the top-level ``functions`` when given."""
  source = path.read_text(encoding="utf-8")
  whole, trailing = _comments(source)
  tree = ast.parse(source)
  found: dict[str, str] = {}
  positions: list[tuple[int, int, str]] = []  # (line, column, field) of every field given a value

  def visit(node, section):
    if isinstance(node, ast.If):  # a variant's branch: its comments hold only where it applies
      return
    if isinstance(node, ast.FunctionDef) and sections and node.name in sections:
      section = sections[node.name]
    if isinstance(node, ast.Assign):
      for target in node.targets:
        for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
          field = _dotted(t)
          if field:
            positions.append((t.lineno, t.col_offset, field))
            if isinstance(node.value, ast.Call) and "." not in field:  # c.data = ConfigDict(dict(...))
              for child in ast.iter_child_nodes(node):
                visit(child, field)
              return
    if isinstance(node, ast.keyword) and node.arg and section:
      positions.append((node.lineno, node.col_offset, f"{section}.{node.arg}"))
    for child in ast.iter_child_nodes(node):
      visit(child, section)

  for node in tree.body:
    if functions is None or (isinstance(node, ast.FunctionDef) and node.name in functions):
      visit(node, (sections or {}).get(None))
  by_line: dict[int, list[tuple[int, str]]] = {}
  for line, col, field in positions:
    by_line.setdefault(line, []).append((col, field))
  for line, fields in by_line.items():
    fields.sort()
    for i, (_, field) in enumerate(fields):
      text = _comment_at(line, i == 0, i == len(fields) - 1, whole, trailing)
      if text and text not in found.get(field, ""):
        found[field] = f"{found[field]} {text}".strip() if field in found else text
  return found


def code_comments(config_file: str | pathlib.Path | None = None) -> dict[str, str]:
  """{dotted field: the comments the code gives it}, from emim's config modules and the
  config file (``augment.view1.x`` and ``augment.view2.x`` share ``view_config``'s)."""
  found: dict[str, str] = {}
  for path, sections, functions in _SOURCES:
    found.update(source_comments(path, sections, functions))
  if config_file is not None and pathlib.Path(config_file).is_file():
    for field, text in source_comments(pathlib.Path(config_file)).items():
      found[field] = f"{found[field]} {text}" if field in found else text
  return found


def _leaves(config: ml_collections.ConfigDict, prefix: str = ""):
  """(dotted field, value), in the order the config defines them (``items()`` sorts)."""
  fields = getattr(config, "_fields", None)
  for key, value in (fields.items() if isinstance(fields, dict) else config.items()):
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _wrap(text: str, indent: str = "# ", width: int = 96) -> list[str]:
  words, lines, line = text.split(), [], ""
  for word in words:
    if line and len(indent) + len(line) + 1 + len(word) > width:
      lines.append(indent + line)
      line = word
    else:
      line = f"{line} {word}".strip()
  return lines + ([indent + line] if line else [])


def describe(config: ml_collections.ConfigDict, config_file: str | pathlib.Path | None = None,
             title: str = "") -> str:
  """The config, one field a line as ``section.field = value`` (what --config.section.field=
  overrides), each under what it does and the code's comments on it."""
  comments = code_comments(config_file)
  out = [f"# {title}" if title else "# The resolved config", "# (--config.FIELD=VALUE overrides a field)"]
  section = None
  for field, value in _leaves(config):
    top = field.split(".")[0] if "." in field else ""
    if top != section:
      section = top
      out += ["", f"## {top or 'top level'}"]
    generic = "augment.view." + field.split(".")[-1] if field.startswith("augment.view") else field
    what = FIELDS.get(field, "(not documented: add it to emim/config_doc.py's FIELDS)")
    why = comments.get(field) or comments.get(generic, "")
    out += _wrap(what + ".")
    if why:
      out += _wrap(why, "#   ")
    out.append(f"{field} = {value!r}")
  return "\n".join(out) + "\n"
