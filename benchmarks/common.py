"""Helpers shared by the benchmarks: the command line, timing, and writing results together with what is needed
to reproduce them.

Every ``bench_*.py`` builds its parser with :func:`benchmark_parser` (``--device``, ``--dtype``, ``--threads``,
``--warmup``, ``--repeat``, ``--rounds``, ``--seed``, ``--tag``, ``--output``; each script gives its own
defaults and adds its own options), checks it with :func:`parse_benchmark_args` and applies it with
:func:`apply_benchmark_args`.

Results go to ``benchmarks/results/<name>_<device-tag>[_<tag>].json`` and ``.md`` (the same numbers as a
Markdown table; ``--output`` names another folder), each with the date, torch version,
``visionmoe.build_info()``, device and exact command line.
"""

from __future__ import annotations

import argparse
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
# Options of benchmark_parser that do not describe the measurement: left out of a result's settings and of the
# command line of a memory probe.
NOT_SETTINGS = ("output", "memory_probe")


def benchmark_parser(
    description: str,
    *,
    warmup: int,
    repeat: int,
    rounds: Optional[int] = None,
    dtypes: Optional[tuple[str, ...]] = tuple(DTYPES),
    dtype: str = "float32",
) -> argparse.ArgumentParser:
    """The options every benchmark takes, with the script's docstring as its description:

    ``--device`` (default cpu), ``--dtype`` (one of ``dtypes``, default ``dtype``; left out when ``dtypes`` is
    None, for benchmarks that run in their model's own type), ``--threads`` (default: torch's), ``--warmup``,
    ``--repeat``, ``--rounds`` (only for benchmarks that time with :func:`timeit_rounds`, when ``rounds`` gives
    its default), ``--seed`` (default 0), ``--tag`` and ``--output``. The script adds its own options to it.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("options common to the benchmarks")
    group.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    if dtypes is not None:
        group.add_argument("--dtype", choices=dtypes, default=dtype, help=f"(default {dtype})")
    group.add_argument("--threads", type=int, help="CPU threads for torch and visionmoe (default: torch's)")
    group.add_argument("--warmup", type=int, default=warmup, help=f"untimed runs per implementation (default {warmup})")
    group.add_argument(
        "--repeat",
        type=int,
        default=repeat,
        help=f"timed runs per implementation; the median is reported (default {repeat})",
    )
    if rounds is not None:
        group.add_argument(
            "--rounds",
            type=int,
            default=rounds,
            help="the implementations are timed in turn this many times and each one's median over "
            "the rounds is reported, so that a burst of load on a shared machine hits all of "
            f"them alike (default {rounds})",
        )
    group.add_argument("--seed", type=int, default=0, help="(default 0)")
    group.add_argument("--tag", help="appended to the result files' names")
    group.add_argument(
        "--output",
        type=Path,
        default=RESULTS_DIR,
        help="folder the result files are written to (default benchmarks/results)",
    )
    return parser


def parse_benchmark_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with the checks of the common options (a usage error where they fail); the
    script checks its own options after it."""
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.repeat < 1 or getattr(args, "rounds", 1) < 1 or args.warmup < 0:
        parser.error("--repeat" + (" and --rounds" if hasattr(args, "rounds") else "") + " must be >= 1, --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def apply_benchmark_args(args: argparse.Namespace) -> tuple[torch.device, Optional[torch.dtype]]:
    """Sets torch's CPU threads to ``--threads`` (where given) and returns the device and the dtype (None for a
    benchmark without ``--dtype``)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(args, "dtype", None)
    return torch.device(args.device), None if dtype is None else getattr(torch, dtype)


def settings(args: argparse.Namespace) -> dict:
    """The options of a run that describe the measurement, for a result's meta: all but ``NOT_SETTINGS``."""
    return {key: value for key, value in vars(args).items() if key not in NOT_SETTINGS}


def abort_unless_close(name: str, actual: dict, expected: dict, reference: str, **tolerances) -> None:
    """Aborts the benchmark when an implementation computes something else than ``reference`` (each quantity of
    ``actual`` against the same one of ``expected``, ``torch.testing.assert_close`` with ``tolerances``): its
    timings would be meaningless."""
    for quantity, tensor in actual.items():
        try:
            torch.testing.assert_close(tensor, expected[quantity], **tolerances)
        except AssertionError as error:
            sys.exit(f"error: {name} does not match {reference} in {quantity}; not timing it.\n{error}")


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


def timeit_round_samples(
    steps: dict,
    warmup: int,
    repeat: int,
    rounds: int,
    device: torch.device | str,
    setup: Optional[Callable[[], None]] = None,
) -> dict:
    """Each of ``steps`` (name -> callable) timed in turn ``rounds`` times with :func:`timeit`: name -> the list
    of its ``rounds`` median seconds, for benchmarks that report more than the median over the rounds (the
    minimum, the spread)."""
    round_seconds = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            round_seconds[name].append(timeit(step, warmup, repeat, device, setup))
    return round_seconds


def timeit_rounds(
    steps: dict,
    warmup: int,
    repeat: int,
    rounds: int,
    device: torch.device | str,
    setup: Optional[Callable[[], None]] = None,
) -> dict:
    """Median seconds of each of ``steps`` (name -> callable), timed in turn ``rounds`` times with :func:`timeit`
    and the median taken over the rounds, so that a burst of load on a shared machine hits every step alike."""
    samples = timeit_round_samples(steps, warmup, repeat, rounds, device, setup)
    return {name: statistics.median(values) for name, values in samples.items()}


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


def memory_probe_argv(args, implementation: str, skipped: tuple) -> list[str]:
    """The command-line options of a memory probe: ``--memory-probe implementation`` and the options of ``args``,
    leaving out None values, ``NOT_SETTINGS`` and the names in ``skipped``."""
    return ["--memory-probe", implementation] + [
        f"--{name.replace('_', '-')}={value}"
        for name, value in vars(args).items()
        if name not in NOT_SETTINGS + skipped and value is not None
    ]


def peak_memory_in_fresh_process(script: str, args, implementation: str, skipped: tuple) -> int:
    """Reruns ``script`` in a new process with :func:`memory_probe_argv`, and returns the peak memory in bytes that
    it prints last."""
    command = [sys.executable, script] + memory_probe_argv(args, implementation, skipped)
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
    name: str,
    rows: list[dict],
    meta: dict,
    *,
    device: torch.device | str,
    tag: Optional[str] = None,
    directory: Optional[Path | str] = None,
) -> tuple[Path, Path]:
    """Writes ``rows`` and ``meta`` (the benchmark's settings), plus :func:`environment`, to
    ``<directory>/<name>_<device-tag>[_<tag>].json`` and ``.md`` (``directory`` defaults to ``RESULTS_DIR``,
    benchmarks/results); returns the two paths.

    Files are written to a ``.tmp`` sibling first and then renamed, so an interrupted run never leaves a
    half-written result behind.
    """
    stem = f"{name}_{device_tag(device)}" + (f"_{_slug(tag)}" if tag else "")
    meta = {**environment(device), **meta}
    json_text = json.dumps({"name": name, "meta": meta, "rows": rows}, indent=2) + "\n"
    meta_lines = [
        f"- {key}: `{json.dumps(value) if isinstance(value, (dict, list)) else value}`" for key, value in meta.items()
    ]
    markdown_text = f"# {name}\n\n{format_table(rows)}\n\n" + "\n".join(meta_lines) + "\n"
    directory = RESULTS_DIR if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / f"{stem}.json", directory / f"{stem}.md")
    for path, text in zip(paths, (json_text, markdown_text)):
        partial = path.with_name(path.name + ".tmp")
        partial.write_text(text)
        os.replace(partial, path)
    return paths
