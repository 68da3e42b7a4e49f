import pytest
import torch

from visionmoe.memory import allocated_peak_bytes as measure_allocated_peak_bytes


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
    """:func:`visionmoe.memory.allocated_peak_bytes`, the benchmarks' measurement of a step's peak allocated bytes,
    for tests that check how much memory an operator holds at once."""
    return measure_allocated_peak_bytes
