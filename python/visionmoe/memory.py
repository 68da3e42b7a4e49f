"""Measuring how much memory a step allocates, for the tests that bound what an operator holds at once and for the
benchmarks that report it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch._C._profiler import _EventType


def allocated_peak_bytes(step: Callable[[], object], device: torch.device | str) -> int:
    """Peak of the bytes allocated through PyTorch's allocator while ``step()`` runs, beyond what was allocated
    before it: tensors and the workspaces kernels take from the allocator, not the memory the C library's heap
    keeps around them (fragmentation, freed blocks not yet returned), which the process's resident memory shows.

    On CUDA this is the caching allocator's ``max_memory_allocated``; on the CPU, which keeps no such statistics,
    it is the running sum of the allocations and frees the profiler records with ``profile_memory=True`` (frees
    of blocks allocated before the step are not reported, so they do not lower the sum).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = []
    pending = list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == device.type:
            events.append((event.start_time_ns, event.typed[1].alloc_size))
    allocated = peak = 0
    for _, size in sorted(events, key=lambda event: event[0]):
        allocated += size
        peak = max(peak, allocated)
    return peak
