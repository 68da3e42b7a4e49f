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
