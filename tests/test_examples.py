"""The example scripts run end to end with small settings, in fresh processes as a user would run them."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_demo_trains_and_evaluates(tmp_path):
    output = run_example("demo.py", "--epochs", "3", "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert "digits/test: accuracy" in output
    assert "specialisation: e0:" in output
    assert (tmp_path / "run" / "eval" / "report.json").is_file()
    assert (tmp_path / "run" / "eval" / "load.png").is_file()


def test_call_operators(tmp_path):
    output = run_example("call_operators.py", cwd=tmp_path)
    assert "max difference from the pure-PyTorch reference" in output


def test_moe_mlp_in_your_model(tmp_path):
    output = run_example("moe_mlp_in_your_model.py", "--steps", "3", cwd=tmp_path)
    assert "test accuracy after 3 steps" in output


def test_convert_timm_vit(tmp_path):
    output = run_example("convert_timm_vit.py", "--steps", "2", cwd=tmp_path)
    assert "MoE layers: blocks." in output
    assert "largest change of the logits right after conversion" in output
    assert "fine-tuned 2 steps" in output


def test_converted_vit_computes_what_the_dense_one_did():
    # The claim of convert_timm_vit.py: right after conversion with its options, the MoE model's output is the
    # dense model's, up to float rounding, in eval mode and, the experts being identical, in training mode too.
    spec = importlib.util.spec_from_file_location("convert_timm_vit", EXAMPLES / "convert_timm_vit.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.dense_vit().eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        dense = model(images)
        example.moeify(model, **example.MOE_OPTIONS)
        torch.testing.assert_close(model(images), dense, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.train()(images), dense, rtol=1e-5, atol=1e-5)
