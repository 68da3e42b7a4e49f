"""Every notebook in notebooks/ runs top to bottom (nbclient), with small settings: the cell tagged "parameters"
is followed by the overrides below, as papermill would inject them."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# Settings that make each notebook run in a few seconds on 2 idle CPU cores (well under a minute on a busy
# machine): one or two short epochs on a few images. Every notebook needs an entry, so a new one is sized too.
SMALL_SETTINGS = {
    "01_routers_tour.ipynb": "NUM_IMAGES = 16",
    "02_train_vmoe_digits.ipynb": "EPOCHS = 2",  # its config warms up for 2 epochs
    "03_teacher_guided_routing.ipynb": "TEACHER_EPOCHS, STUDENT_EPOCHS, TRAIN_IMAGES, PROBE_IMAGES = 1, 2, 128, 16",
    "04_what_where_maps.ipynb": "TRAIN_SCENES, TEST_SCENES, STEPS = 64, 24, 2",
}
# Seconds a cell (and the kernel's start) may take: far above what the settings need, so that only a hang fails,
# not a machine busy with other work.
CELL_TIMEOUT = 900


def with_overrides(notebook, overrides: str):
    for index, cell in enumerate(notebook.cells):
        if "parameters" in cell.metadata.get("tags", []):
            notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))
            return notebook
    raise AssertionError("the notebook has no cell tagged 'parameters' to override")


def test_every_notebook_has_small_settings():
    assert sorted(SMALL_SETTINGS) == sorted(path.name for path in NOTEBOOKS.glob("*.ipynb"))


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda path: path.name)
def test_notebook_runs(path, monkeypatch):
    # One torch thread: on a machine shared with other work, more threads than free cores slow the small
    # settings' tiny tensors down several times.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = with_overrides(nbformat.read(path, as_version=4), SMALL_SETTINGS[path.name])
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        startup_timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    errors = [
        output for cell in notebook.cells for output in cell.get("outputs", []) if output.get("output_type") == "error"
    ]
    assert not errors
