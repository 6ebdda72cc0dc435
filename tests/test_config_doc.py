"""--print_config: the resolved config, every field with what it does and the code's own
comments on it, printed without training (and without JAX)."""

import subprocess
import sys

import ml_collections
import pytest
from conftest import REPO

from emim import config_doc
from emim.config_base import load_config_file
from emim.methods import defaults as method_defaults


def leaves(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def every_config():
  for path in sorted((REPO / "configs").glob("*.py")):
    for variant in (None, *method_defaults.available()):
      yield path, load_config_file(path, variant)


def test_every_field_of_every_config_and_method_says_what_it_does():
  fields = {field for _, config in every_config() for field, _ in leaves(config)}
  assert sorted(fields - set(config_doc.FIELDS)) == [], "add these to emim/config_doc.py's FIELDS"
  assert sorted(set(config_doc.FIELDS) - fields) == [], "FIELDS names fields no config has"


def test_the_codes_comments_are_printed_above_their_field():
  comments = config_doc.code_comments(REPO / "configs" / "gaussian_mixture.py")
  assert comments["data.separation"] == "cluster means ~ N(0, separation^2 I)"  # the config file's own
  assert comments["checkpoint.restore_step"] == "-1: the latest"  # a trailing comment in base_config
  assert comments["model.fused_views"].startswith("Both views (and the target's two) through one forward")  # above
  assert comments["method.order"] == "Taylor order K (the EMMI paper, Figure 3)"  # emim/methods/defaults.py
  # A variant's branch (cluster_views) and a recipe's lines say why they change a field:
  # not what the field is wherever they do not apply.
  assert "Views share the cluster alone" not in comments["data.instance_std"]
  assert "bf16" not in comments.get("model.backbone", "")
  text = config_doc.describe(load_config_file(REPO / "configs" / "gaussian_mixture.py"),
                             REPO / "configs" / "gaussian_mixture.py")
  lines = text.splitlines()
  i = lines.index("data.separation = 1.0")
  assert lines[i - 2:i] == ["# Gaussian mixture: the spread of the cluster means.",
                            "#   cluster means ~ N(0, separation^2 I)"]


def test_print_config_prints_every_field_and_exits_without_training(tmp_path):
  command = [sys.executable, "-m", "emim.main", "--config=configs/cifar10.py:byol", "--config.train.batch_size=512",
             "--print_config"]
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == "# configs/cifar10.py:byol --config.train.batch_size=512"
  config = load_config_file(REPO / "configs" / "cifar10.py", "byol")
  with config.unlocked():
    config.train.batch_size = 512
  values = [line for line in lines if line and not line.startswith("#")]
  assert values == [f"{field} = {value!r}" for field, value in leaves_in_order(config)]
  assert "train.batch_size = 512" in values and "method.name = 'byol'" in values
  assert "data.path = '~/emim_data/cifar10'" in values
  for field in ("model.fused_views", "data.workers", "eval.mi_every_steps"):  # what it is, then the code's comment
    i = lines.index(next(v for v in values if v.startswith(f"{field} = ")))
    j = i - 1
    while lines[j].startswith("#   "):  # the code's comment, indented
      j -= 1
    what = " ".join(line[2:] for line in lines[j - 2:j + 1] if line.startswith("# ") and not line.startswith("#   "))
    assert j < i - 1 and what.endswith(config_doc.FIELDS[field] + "."), (field, lines[j - 2:i + 1])
  assert "not documented" not in result.stdout
  assert "jax" not in result.stderr.lower()  # (JAX is not even imported)
  nowhere = subprocess.run([sys.executable, "-m", "emim.main", "--config=configs/cifar10.py"], capture_output=True,
                           text=True, cwd=REPO, timeout=120)
  assert nowhere.returncode == 2 and "--workdir is required: the run's directory" in nowhere.stderr


def leaves_in_order(config, prefix=""):
  """The fields in the order the config defines them (ConfigDict.items() sorts)."""
  for key, value in config._fields.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaves_in_order(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


@pytest.mark.parametrize("name", ["cifar10", "imagenet1k"])
def test_describe_lists_each_field_once(name):
  config = load_config_file(REPO / "configs" / f"{name}.py")
  text = config_doc.describe(config, REPO / "configs" / f"{name}.py")
  values = [line.split(" = ")[0] for line in text.splitlines() if line and not line.startswith("#")]
  assert sorted(values) == sorted(field for field, _ in leaves(config))
