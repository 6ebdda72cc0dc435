"""What a user installs and runs besides the Python code: the wheel carries every module
(a non-editable install, as Colab's or ``pip install git+...``, imports emim.train), and
the launch scripts parse."""

import pathlib
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


def test_the_wheel_carries_every_module_and_config_free_package(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
      capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  wheel = next(tmp_path.glob("emim-*.whl"))
  carried = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
  expected = {p.relative_to(REPO).as_posix() for p in (REPO / "emim").rglob("*.py")}
  assert expected - carried == set(), f"missing from the wheel: {sorted(expected - carried)}"
  packages = {p.parent for p in (REPO / "emim").rglob("*.py") if "__pycache__" not in p.parts}
  assert all((p / "__init__.py").exists() for p in packages)


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "launch").iterdir()) +
                         sorted(f"../benchmarks/{p.name}" for p in (REPO / "benchmarks").glob("*.sh")))
def test_launch_scripts_parse(script):
  path = pathlib.Path(REPO / "launch" / script).resolve()
  result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
