"""Run a function in several local processes joined by a process group, with a deadline.

Tests and benchmarks use it to start real gloo (or NCCL) process groups on one machine: the rendezvous is a file
in a fresh temporary directory (no ports to collide), every collective has the group's timeout, and the parent
kills every process once the deadline passes, so a hang becomes an error naming the ranks still running instead
of a stalled run.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import tempfile
import time
import traceback
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _serialised(value: Any) -> bytes:
    # Tensors put on a multiprocessing queue travel as shared-memory handles, which vanish when the process that
    # made them exits before the parent has read them; bytes written by torch.save survive the process.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _worker(
    rank: int, world_size: int, backend: str, init_file: str, timeout: float, fn: Callable, args: tuple, results
) -> None:
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            results.put((rank, "ok", _serialised(fn(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # reported to the parent, which raises it with the rank named
        results.put((rank, "error", traceback.format_exc()))


def run_processes(
    fn: Callable, world_size: int, *args: Any, backend: str = "gloo", timeout: float = 120.0
) -> List[Any]:
    """Calls ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes that share a default process group,
    and returns their results in rank order.

    ``fn`` and ``args`` must be picklable (a module-level function); results come back through ``torch.save``. Raises
    RuntimeError with the rank's traceback when a rank fails, and TimeoutError naming the ranks that had not
    finished when ``timeout`` seconds passed (every process is killed then; collectives time out after the same
    number of seconds).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="visionmoe-rendezvous-") as directory:
        init_file = os.path.join(directory, "rendezvous")
        processes = [
            context.Process(
                target=_worker, daemon=True, args=(rank, world_size, backend, init_file, timeout, fn, args, results)
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        outcomes = {}
        deadline = time.monotonic() + timeout
        try:
            while len(outcomes) < world_size:
                try:
                    rank, status, value = results.get(timeout=1.0)
                except queue.Empty:
                    # A process that died without reporting (a crash, a kill) has no result on the way: a second
                    # without one after its exit means none is coming.
                    missing = [rank for rank in range(world_size) if rank not in outcomes]
                    dead = {rank: processes[rank].exitcode for rank in missing if not processes[rank].is_alive()}
                    if dead:
                        raise RuntimeError(
                            f"ranks {sorted(dead)} of {world_size} exited without a result (exit codes {dead})"
                        ) from None
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"ranks {missing} of {world_size} did not finish within {timeout} s"
                        ) from None
                    continue
                if status == "error":
                    raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
                outcomes[rank] = torch.load(io.BytesIO(value), weights_only=False)
        finally:
            for process in processes:
                process.join(timeout=5)
                if process.is_alive():
                    process.kill()
                    process.join()
    return [outcomes[rank] for rank in range(world_size)]
