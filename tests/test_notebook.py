"""The Colab notebook: its plain-text twin in sync, and executed top to bottom on the CPU
with small parameters (as papermill would: a cell of overrides after the parameters)."""

import pytest
from conftest import REPO

NOTEBOOK, TWIN = REPO / "notebooks" / "emim_colab.ipynb", REPO / "notebooks" / "emim_colab.py"


def _sources(notebook):
  return [(c.cell_type, c.source.strip()) for c in notebook.cells]


def test_the_notebook_and_its_text_twin_hold_the_same_cells():
  jupytext = pytest.importorskip("jupytext")
  assert _sources(jupytext.read(NOTEBOOK)) == _sources(jupytext.read(TWIN)), (
      "notebooks/emim_colab.ipynb and emim_colab.py differ: run jupytext --sync notebooks/emim_colab.ipynb")


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  at = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
  # The suite's install is emim's; one short run keeps the test near 30 s.
  overrides = f"INSTALL = False\nWORKDIR = {str(tmp_path)!r}\nSTEPS = 60\nMETHODS = ('sdmi',)\n"
  notebook.cells.insert(at + 1, nbformat.v4.new_code_cell(overrides, metadata={"tags": ["injected-parameters"]}))
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
  outputs = {i: c.outputs for i, c in enumerate(notebook.cells) if c.cell_type == "code"}
  text = lambda cell: "".join(o.get("text", "") for o in cell)
  everything = "".join(text(o) for o in outputs.values())
  assert "step 60/60" in everything  # the progress lines reached the cell, live
  assert "orbax" not in everything.lower()  # Orbax's INFO chatter filtered
  assert "features of 8 test vectors: (8, 256)" in everything
  images = [o for cell in outputs.values() for o in cell if "image/png" in o.get("data", {})]
  assert len(images) == 3  # MI curves, kNN, embeddings: inline
  assert (tmp_path / "export_sdmi" / "model.json").exists()
  assert (tmp_path / "sdmi" / "evaluation.json").exists()
