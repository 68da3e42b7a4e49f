"""Every notebook in notebooks/ runs top to bottom (nbclient), with small settings: the cell tagged "parameters"
is followed by the overrides below, as papermill would inject them."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SMALL_SETTINGS = {
    "01_routers_tour.ipynb": "NUM_IMAGES = 16",
    "02_train_vmoe_digits.ipynb": "EPOCHS = 3",
}


def with_overrides(notebook, overrides: str):
    for index, cell in enumerate(notebook.cells):
        if "parameters" in cell.metadata.get("tags", []):
            notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))
            return notebook
    raise AssertionError("the notebook has no cell tagged 'parameters' to override")


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda path: path.name)
def test_notebook_runs(path):
    notebook = nbformat.read(path, as_version=4)
    if path.name in SMALL_SETTINGS:
        notebook = with_overrides(notebook, SMALL_SETTINGS[path.name])
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                    resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    errors = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]
    assert not errors
