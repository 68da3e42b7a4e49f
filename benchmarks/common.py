"""Helpers shared by the benchmarks: timing, and writing results together with what is needed to reproduce them.

Results go to ``benchmarks/results/<name>_<device-tag>[_<tag>].json`` and ``.md`` (the same numbers as a
Markdown table), each with the date, torch version, ``visionmoe.build_info()``, device and exact command line.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import visionmoe
from visionmoe.memory import allocated_peak_bytes  # noqa: F401  (the benchmarks take it from here with the others)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The floating-point types the benchmarks take by name (--dtype).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def timeit(
    fn: Callable[[], object],
    warmup: int,
    repeat: int,
    device: torch.device | str,
    setup: Optional[Callable[[], None]] = None,
) -> float:
    """Median seconds of ``repeat`` calls of ``fn``, after ``warmup`` untimed calls.

    ``setup``, when given, runs before every call, outside the timed region (e.g. to clear gradients so that
    backward writes them instead of accumulating into them). On CUDA each call is timed with CUDA events and
    waited for before the next, so a call's time is its own work only.
    """
    if repeat < 1:
        raise ValueError(f"timeit: repeat must be >= 1, got {repeat}")
    device = torch.device(device)
    times = []
    for run in range(warmup + repeat):
        if setup is not None:
            setup()
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            fn()
            seconds = time.perf_counter() - begin
        if run >= warmup:
            times.append(seconds)
    return statistics.median(times)


def timeit_rounds(steps: dict, warmup: int, repeat: int, rounds: int, device: torch.device | str,
                  setup: Optional[Callable[[], None]] = None) -> dict:
    """Median seconds of each of ``steps`` (name -> callable), timed in turn ``rounds`` times with :func:`timeit`
    and the median taken over the rounds, so that a burst of load on a shared machine hits every step alike."""
    round_seconds = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            round_seconds[name].append(timeit(step, warmup, repeat, device, setup))
    return {name: statistics.median(values) for name, values in round_seconds.items()}


def saved_storages(forward: Callable[[], object]) -> dict:
    """The distinct storages autograd saves for backward while ``forward()`` runs: data pointer -> bytes."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return storages


def peak_resident_bytes() -> int:
    """This process's peak resident memory (VmHWM). Unlike getrusage's ru_maxrss, which Linux carries over from
    the parent across fork and exec, it starts afresh in a new process image."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def keep_freed_memory_in_heap() -> bool:
    """Makes glibc's malloc keep freed memory in the process (no trimming of the heap's top, and blocks of up to
    32 MiB served from the heap rather than mapped afresh), so that a timed step does not pay for page faults that
    depend on where earlier frees happened to leave the heap's top: with the default settings, whether a step
    re-faults its large tensors (0.3-0.7 us per 4 KiB page here) changes from one process to the next and can move
    a step's time by half. Applies to every implementation alike; returns False where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    trim_threshold, mmap_threshold = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (malloc.h)
    return bool(libc.mallopt(trim_threshold, 2**31 - 1)) and bool(libc.mallopt(mmap_threshold, 32 * 2**20))


def page_faults_per_call(fn: Callable[[], object], calls: int, setup: Optional[Callable[[], None]] = None) -> float:
    """Minor page faults per call of ``fn`` (mean over ``calls`` calls; ``setup`` runs before each, uncounted)."""
    faults = 0
    for _ in range(calls):
        if setup is not None:
            setup()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return faults / calls


def peak_memory_in_fresh_process(script: str, args, implementation: str, skipped: tuple) -> int:
    """Reruns ``script`` in a new process with ``--memory-probe implementation`` and the options of ``args`` (leaving
    out None values and the names in ``skipped``), and returns the peak memory in bytes that it prints last."""
    command = [sys.executable, script, "--memory-probe", implementation] + [
        f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
        if name not in ("memory_probe",) + skipped and value is not None]
    return int(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])


def device_name(device: torch.device | str) -> str:
    """The GPU's name on CUDA, else the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tag(device: torch.device | str) -> str:
    """File-name part naming the device: ``cpu``, or ``cuda-`` and the GPU's name (``cuda-nvidia-h100-80gb-hbm3``),
    so that results from different GPUs do not overwrite each other."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda-{_slug(device_name(device))}"
    return device.type


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def environment(device: torch.device | str) -> dict:
    """Facts about the run that the numbers depend on."""
    device = torch.device(device)
    facts = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "visionmoe_version": visionmoe.__version__,
        "build_info": visionmoe.build_info(),
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "command": sys.argv,
    }
    if device.type == "cuda":
        facts["cuda_runtime"] = torch.version.cuda
    return facts


def _format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """A Markdown table of ``rows`` (dicts with the same keys, which become the columns), padded so that it
    also reads well as plain text."""
    columns = list(rows[0])
    cells = [[_format_cell(row[column]) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]

    def line(values):
        return "| " + " | ".join(value.ljust(width) for value, width in zip(values, widths)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(columns), separator, *(line(values) for values in cells)])


def write_results(
    name: str, rows: list[dict], meta: dict, *, device: torch.device | str, tag: Optional[str] = None
) -> tuple[Path, Path]:
    """Writes ``rows`` and ``meta`` (the benchmark's settings), plus :func:`environment`, to
    ``results/<name>_<device-tag>[_<tag>].json`` and ``.md``; returns the two paths.

    Files are written to a ``.tmp`` sibling first and then renamed, so an interrupted run never leaves a
    half-written result behind.
    """
    stem = f"{name}_{device_tag(device)}" + (f"_{_slug(tag)}" if tag else "")
    meta = {**environment(device), **meta}
    json_text = json.dumps({"name": name, "meta": meta, "rows": rows}, indent=2) + "\n"
    meta_lines = [f"- {key}: `{json.dumps(value) if isinstance(value, (dict, list)) else value}`"
                  for key, value in meta.items()]
    markdown_text = f"# {name}\n\n{format_table(rows)}\n\n" + "\n".join(meta_lines) + "\n"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    paths = (RESULTS_DIR / f"{stem}.json", RESULTS_DIR / f"{stem}.md")
    for path, text in zip(paths, (json_text, markdown_text)):
        partial = path.with_name(path.name + ".tmp")
        partial.write_text(text)
        os.replace(partial, path)
    return paths
