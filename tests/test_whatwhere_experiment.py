"""experiments/whatwhere_discovery.py runs end to end in its small setting and writes its table."""

import importlib.util
import sys
from pathlib import Path


def test_discovery_experiment_small_setting_writes_its_table(tmp_path, monkeypatch):
    path = Path(__file__).resolve().parents[1] / "experiments" / "whatwhere_discovery.py"
    spec = importlib.util.spec_from_file_location("whatwhere_discovery", path)
    experiment = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, experiment)  # dataclasses look their module up there
    spec.loader.exec_module(experiment)
    assert experiment.main(["--small", "--seeds", "0", "1", "--output-dir", str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text()
    assert ("Command: `PYTHONPATH=python python experiments/whatwhere_discovery.py --small --seeds 0 1 --output-dir "
            f"{tmp_path}`") in table
    rows = (tmp_path / "runs.csv").read_text().splitlines()
    assert rows[0] == "model,trained,seed,parameters,accuracy,corloc,object_recall,boxes_per_image,miou"
    assert len(rows) == 1 + 2 * 2 * 2  # two models, two seeds, before and after training
    for row in rows[1:]:
        rates = [float(v) for i, v in enumerate(row.split(",")[4:]) if i != 3]  # all but boxes_per_image
        assert all(0.0 <= v <= 1.0 for v in rates)
    for model in ("wwt_tiny_32", "vit_tiny_32"):
        assert f"| {model} | yes |" in table and f"| {model} | no (at initialisation) |" in table
