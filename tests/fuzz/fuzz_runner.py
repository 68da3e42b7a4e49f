"""Runs fuzz cases (``fuzz_cases.py``) in worker processes, so that a crash or a hang is a reported outcome with
its input instead of the end of the run.

    python tests/fuzz/fuzz_runner.py --cases 100000 --output benchmarks/results/fuzz_cpu.json   # ``make fuzz``
    python tests/fuzz/fuzz_runner.py --replay '{"family": "sinkhorn", ...}'                    # one case, in process

A worker announces each case before running it and reports its outcome after; when a worker dies or stays
silent longer than the per-case timeout, the runner records a crash or a hang for the announced case and starts
a new worker at the next one.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

# This script's folder: on sys.path when it runs as a script, and when pytest imports it beside test_fuzz.py.
from fuzz_cases import FAILURES, FAMILIES, draw, run

import visionmoe

STARTED, FINISHED = "fuzz-case-started", "fuzz-case-finished"


def case_keys(families: Sequence[str], seed: int, num_cases: int) -> List[tuple]:
    """``num_cases`` (family, seed, index) keys, spread round-robin over the families."""
    return [(families[i % len(families)], seed, i // len(families)) for i in range(num_cases)]


def _start_worker(keys: Sequence[tuple], command: Sequence[str]) -> subprocess.Popen:
    """A worker process running ``keys``, sent on its standard input (a long run's keys exceed argv limits) from a
    thread, so that a worker writing to its other pipes before it reads them cannot block the runner."""
    process = subprocess.Popen(
        list(command),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )

    def send_keys():
        try:
            process.stdin.write(json.dumps(list(keys)))
            process.stdin.close()
        except BrokenPipeError:  # the worker died first; the runner reports it
            pass

    threading.Thread(target=send_keys, daemon=True).start()
    return process


def _read_lines(stream, lines: "queue.Queue[str | None]") -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_keys(
    keys: Sequence[tuple],
    device: str = "cpu",
    case_timeout: float = 120.0,
    worker_command: Optional[Sequence[str]] = None,
) -> List[Dict]:
    """Outcomes of the cases ``keys``, in order: each the case's spec with ``status`` and ``detail``.
    ``worker_command`` replaces this script's own worker (the tests of the crash guard use it)."""
    outcomes: List[Dict] = []
    pending = list(keys)
    command = worker_command or [sys.executable, str(Path(__file__).resolve()), "--worker", "--device", device]
    while pending:
        process = _start_worker(pending, command)
        lines: "queue.Queue[str | None]" = queue.Queue()
        threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
        errors: List[str] = []
        threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True).start()
        current = None
        deadline = time.monotonic() + case_timeout + 60  # the first case also pays for the imports
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                process.kill()
                process.wait()
                outcomes.append(
                    dict(
                        draw(*pending[0], device=device), status="hang", detail=f"no outcome after {case_timeout:.0f} s"
                    )
                )
                pending = pending[1:]
                break
            if line is None:
                process.wait()
                if current is not None:
                    tail = "".join(errors)[-400:].strip().replace("\n", " | ")
                    outcomes.append(
                        dict(
                            draw(*pending[0], device=device),
                            status="crash",
                            detail=f"worker exited with {process.returncode}: {tail}",
                        )
                    )
                    pending = pending[1:]
                elif pending:
                    raise RuntimeError(f"fuzz worker failed before its first case: {''.join(errors)[-2000:]}")
                break
            if line.startswith(STARTED):
                current = line.split(maxsplit=1)[1]
                deadline = time.monotonic() + case_timeout
            elif line.startswith(FINISHED):
                outcomes.append(json.loads(line.split(maxsplit=1)[1]))
                pending, current = pending[1:], None
    return outcomes


def run_parallel(keys: Sequence[tuple], workers: int, device: str = "cpu") -> List[Dict]:
    """:func:`run_keys` over ``workers`` interleaved shares of ``keys``, outcomes in the order of ``keys``."""
    shares = [list(keys[w::workers]) for w in range(workers)]
    results: List[List[Dict]] = [[] for _ in shares]
    threads = [
        threading.Thread(target=lambda w=w: results[w].extend(run_keys(shares[w], device))) for w in range(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outcomes = [None] * len(keys)
    for w, share in enumerate(results):
        outcomes[w::workers] = share
    return outcomes


def summarise(outcomes: Iterable[Dict]) -> Dict:
    """Counts of outcomes by family and status, and the failures (see ``fuzz_cases.FAILURES``)."""
    outcomes = list(outcomes)
    by_family: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for outcome in outcomes:
        by_family[outcome["family"]][outcome["status"]] += 1
    totals = collections.Counter(outcome["status"] for outcome in outcomes)
    return {
        "cases": len(outcomes),
        "statuses": dict(sorted(totals.items())),
        "by_family": {family: dict(sorted(counts.items())) for family, counts in sorted(by_family.items())},
        "failures": [outcome for outcome in outcomes if outcome["status"] in FAILURES],
    }


def _worker(keys: Sequence[tuple], device: str) -> None:
    torch.set_num_threads(1)
    for family, seed, index in keys:
        spec = draw(family, seed, index, device=device)
        print(STARTED, json.dumps([family, seed, index]), flush=True)
        outcome = run(spec)
        print(FINISHED, json.dumps(dict(spec, **outcome)), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=800, help="number of cases, spread over the families")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="*", help="only these families (default: all)")
    parser.add_argument("--device", default="cpu", help="the device of the cases' inputs (cpu or cuda)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, help="write the summary and every failure here as JSON")
    parser.add_argument("--replay", help="run one case spec (JSON, as a failure reports it) in this process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker([tuple(key) for key in json.load(sys.stdin)], args.device)
        return 0
    if args.replay:
        print(json.dumps(run(json.loads(args.replay))))
        return 0
    families = args.families or list(FAMILIES)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {sorted(FAMILIES)}")
    started = time.monotonic()
    summary = summarise(run_parallel(case_keys(families, args.seed, args.cases), args.workers, args.device))
    summary.update(seed=args.seed, device=args.device, seconds=round(time.monotonic() - started, 1))
    summary.update(torch=torch.__version__, visionmoe=visionmoe.__version__)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({key: value for key, value in summary.items() if key != "failures"}, indent=1))
    for failure in summary["failures"][:20]:
        print(f"{failure['status']}: {failure['detail']}\n  replay: --replay '{json.dumps(failure)}'")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
