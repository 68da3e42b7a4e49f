"""visionmoe.memory, the memory measurement of the tests and benchmarks: allocated peaks on hand-made steps whose
peak is known, on the CPU and, where present, on CUDA."""

import torch

MIB = 2**20


def test_allocated_peak_counts_what_is_live_at_once(device, allocated_peak_bytes):
    def step():
        first = torch.empty(MIB, dtype=torch.uint8, device=device)
        second = torch.empty(2 * MIB, dtype=torch.uint8, device=device)
        del first, second
        third = torch.empty(MIB, dtype=torch.uint8, device=device)  # reuses freed memory: does not raise the peak
        del third

    assert allocated_peak_bytes(step, device) == 3 * MIB


def test_allocated_peak_is_above_what_was_allocated_before(device, allocated_peak_bytes):
    held = torch.empty(4 * MIB, dtype=torch.uint8, device=device)

    def step():
        temporary = torch.empty(MIB, dtype=torch.uint8, device=device)
        del temporary

    assert allocated_peak_bytes(step, device) == MIB
    assert held.numel() == 4 * MIB


def test_allocated_peak_of_forward_and_backward_includes_the_gradients(device, allocated_peak_bytes):
    x = torch.randn(256, 1024, device=device, requires_grad=True)  # 1 MiB

    def step():
        (x * 2).sum().backward()

    # x * 2 is freed as soon as sum() has read it (multiplying by a number saves nothing for backward), so the
    # 1 MiB gradient the backward allocates for x is the only large block alive; the rest are scalars.
    assert MIB <= allocated_peak_bytes(step, device) < MIB + 16 * 1024
    assert x.grad is not None
