import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Every operator test runs on the CPU and, where a GPU is present, on CUDA; CUDA cases skip cleanly."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws the same random numbers on every run."""
    torch.manual_seed(0)


@pytest.fixture
def allocated_peak_bytes():
    """The benchmarks' measurement of a step's peak allocated bytes (``benchmarks/common.py``), for tests that
    check how much memory an operator holds at once."""
    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    from common import allocated_peak_bytes as measure
    return measure
