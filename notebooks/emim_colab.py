# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # emim in a notebook
#
# Self-supervised learning as mutual-information maximisation, in JAX. This notebook
# installs emim, trains the canonical SDMI prototype and the Taylor-DV (JMI) prototype on
# seed 002's Gaussian mixture (a minute each on a CPU), evaluates and exports them, loads
# the export as a downstream job would, and draws the MI curves. The last cell trains on
# CIFAR-10 on a GPU or TPU runtime.
#
# This file has a plain-text twin, `emim_colab.py` (jupytext, percent format): edit
# either, then `jupytext --sync notebooks/emim_colab.ipynb`.

# %% tags=["parameters"]
INSTALL = True  # pip install emim (not editable) from the checkout around this notebook, or REPO_URL's clone
REPO_URL = ""  # in Colab: the git URL of the emim repository to clone
WORKDIR = "/tmp/emim_notebook"  # runs, exports and figures go here
STEPS = 1500  # training steps of each Gaussian-mixture run
METHODS = ("sdmi", "taylor_dv")  # the SDMI and JMI prototypes; any of configs/gaussian_mixture.py's variants
RUN_CIFAR = False  # the accelerator cell at the end (Runtime > Change runtime type > GPU)
CIFAR_EPOCHS = 20

# %% [markdown]
# ## Install

# %%
import os
import pathlib
import subprocess
import sys


def find_checkout():
  """The emim repository this notebook sits in (a local Jupyter, CI), if any."""
  for directory in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]:
    if (directory / "setup.py").exists() and (directory / "emim" / "train.py").exists():
      return directory
  return None


checkout = find_checkout()
if checkout is None:
  if not REPO_URL:
    raise ValueError("Set REPO_URL (the first code cell) to the emim repository's git URL, or open this notebook "
                     "inside a checkout of it.")
  checkout = pathlib.Path("/content/emim" if os.path.isdir("/content") else "emim").resolve()
  if not checkout.exists():
    subprocess.check_call(["git", "clone", "--depth=1", REPO_URL, str(checkout)])
if INSTALL:
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", f"{checkout}[plots]"])
CONFIGS = checkout / "configs"
print("emim from", checkout)

# %% [markdown]
# ## Train
#
# The progress lines appear live: step, steps/s, the loss terms, and every 50 steps the
# MI estimates on a fixed batch beside `true_mi`, the exact MI of two views of this data.

# %%
import jax

import emim.notebook
from emim import train
from emim.config_base import load_config_file

emim.notebook.show_logs()
print("JAX", jax.__version__, jax.devices())


def config_for(method):
  config = load_config_file(CONFIGS / "gaussian_mixture.py", method)
  with config.unlocked():
    config.train.num_steps = STEPS
    config.train.log_every = max(STEPS // 30, 1)
    config.eval.every_steps = max(STEPS // 6, 1)
    config.checkpoint.every_steps = STEPS
  return config


workdirs = {}
for method in METHODS:
  workdirs[method] = f"{WORKDIR}/{method}"
  train.run(config_for(method), workdirs[method])

# %% [markdown]
# ## Evaluate, export, load as a downstream job

# %%
from emim import backbone as backbone_lib
from emim import evaluate, export
from emim.data import sources

first = METHODS[0]
config = config_for(first)
results = evaluate.evaluate(config, workdirs[first])
print({k: round(v, 4) for k, v in results.items() if k.startswith(("knn", "linear_top"))})

step, backbone = backbone_lib.restore_backbone(workdirs[first], config)
export.export_backbone(backbone, f"{WORKDIR}/export_{first}", {"step": step, "method": first}, overwrite=True)
model, features = emim.load_backbone(f"{WORKDIR}/export_{first}")
test_vectors = sources.load(config.data, "test").vectors[:8]
print("features of 8 test vectors:", features(test_vectors).shape)

# %% [markdown]
# ## Pictures
#
# The MI estimates of the runs on one axis per estimator (the exact MI dotted), kNN over
# training, and the first run's embeddings' two principal components coloured by cluster.

# %%
from emim import plots

runs = [plots.load_run(w) for w in workdirs.values()]
figure_mi = plots.plot_mi(runs)
figure_knn = plots.plot_knn(runs)
figure_embeddings = plots.plot_embeddings(workdirs[first])

# %% [markdown]
# ## CIFAR-10 on an accelerator
#
# Set `RUN_CIFAR = True` on a GPU or TPU runtime. Colab has TensorFlow, so TFDS prepares
# `cifar10` here (about 160 MB); emim itself reads it without TensorFlow.

# %%
if RUN_CIFAR:
  import tensorflow_datasets as tfds

  tfds.builder("cifar10").download_and_prepare()
  cifar = load_config_file(CONFIGS / "cifar10.py")
  with cifar.unlocked():
    cifar.data.source = "tfds"
    cifar.train.num_epochs = CIFAR_EPOCHS
    cifar.eval.every_steps = 0
  train.run(cifar, f"{WORKDIR}/cifar10_emmi")
  print(evaluate.evaluate(cifar, f"{WORKDIR}/cifar10_emmi"))
