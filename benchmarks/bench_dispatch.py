#!/usr/bin/env python
"""Dispatch + combine, forward and backward: visionmoe against two PyTorch formulations, in one run.

Implementations:
  visionmoe  ``visionmoe.ops.dispatch`` / ``combine``.
  index      ``visionmoe.reference.dispatch`` / ``combine`` (``index_select`` / ``index_add_``).
  einsum     the one-hot formulation of GShard and V-MoE: build the dense [T, E, C] combine tensor from the
             plan (``reference.combine_tensor``; part of this formulation's cost, so it is timed), dispatch
             with its non-zero mask and combine with it, both as einsums. Skipped for a dropless plan (no C)
             and when the dense tensor would exceed ``--max-dense-gb``.

Each timed step is ``h = dispatch(x, plan, layout); y = combine(h, plan, T); y.backward(grad_y)``, with
gradients to x and to the plan's weights. The plan is made once, outside the timed region. Nothing runs
between dispatch and combine: an expert would, but its memory traffic is not dispatch's or combine's.

Bandwidth counts the minimum bytes the step must move, each tensor read or written once, with R the expert
rows (E * C padded, M packed) and the [M]-sized index and weight vectors neglected:
  forward   dispatch reads x [T, D], writes h [R, D]; combine reads h, writes y [T, D]      2 T D + 2 R D
  backward  combine reads grad_y [T, D] and h, writes grad_h [R, D];
            dispatch reads grad_h, writes grad_x [T, D]                                      2 T D + 3 R D
  total     (4 T + 5 R) * D * element size
A plain ``dst.copy_(src)`` of a tensor of that many bytes (dst allocated once) is timed in the same run; its
bandwidth (bytes read + written per second) is the practical ceiling each implementation is compared with.

Usage:
  python benchmarks/bench_dispatch.py                        # CPU, default sizes, padded layout
  python benchmarks/bench_dispatch.py --layout packed        # dropless plan, [M, D] expert rows
  python benchmarks/bench_dispatch.py --device cuda --tokens 65536 --dim 1024 --dtype bfloat16
Results: benchmarks/results/dispatch_<layout>_<device>[_<tag>].json and .md.
"""

from __future__ import annotations

import argparse
import math

import torch
from common import (
    abort_unless_close,
    apply_benchmark_args,
    benchmark_parser,
    format_table,
    parse_benchmark_args,
    timeit,
    write_results,
)

from visionmoe import ops, reference

# The einsum formulation is orders of magnitude slower (tens of seconds a step on a small CPU), so it gets at
# most one warmup run and at most --einsum-repeat timed runs.
EINSUM_MAX_WARMUP = 1


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, warmup=2, repeat=10)
    parser.add_argument("--tokens", type=int, default=16384, help="T (default 16384)")
    parser.add_argument("--dim", type=int, default=384, help="D (default 384)")
    parser.add_argument("--experts", type=int, default=16, help="E (default 16)")
    parser.add_argument("--topk", type=int, default=2, help="K, experts per token (default 2)")
    parser.add_argument(
        "--capacity-factor",
        type=float,
        default=1.25,
        help="C = ceil(K * T * factor / E) for the padded layout (default 1.25)",
    )
    parser.add_argument(
        "--layout",
        choices=ops.LAYOUTS,
        default="padded",
        help="padded: [E, C, D] with capacity C; packed: [M, D] with a dropless plan",
    )
    parser.add_argument(
        "--einsum-repeat",
        type=int,
        default=3,
        help=f"cap on the einsum formulation's timed runs, which also gets at most "
        f"{EINSUM_MAX_WARMUP} warmup run (default 3)",
    )
    parser.add_argument(
        "--max-dense-gb",
        type=float,
        default=4.0,
        help="skip einsum when its dense [T, E, C] tensor would exceed this many GB; its peak "
        "memory is a few times that (default 4)",
    )
    parser.add_argument(
        "--imbalance",
        type=float,
        default=0.5,
        help="expert popularity spans 1 -/+ this times the mean; at the defaults about 3%% of "
        "the assignments overflow the capacity (default 0.5)",
    )
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_benchmark_args(parser, argv)
    if args.topk > args.experts:
        parser.error("--topk must be at most --experts")
    if args.einsum_repeat < 1:
        parser.error("--einsum-repeat must be >= 1")
    if not 0 <= args.imbalance < 1:
        parser.error("--imbalance must be in [0, 1)")
    return args


def random_routing(num_tokens: int, num_experts: int, top_k: int, imbalance: float, dtype: torch.dtype, seed: int):
    """Each token picks ``top_k`` distinct experts at random, with positive weights summing to 1.

    Expert popularity rises linearly from ``1 - imbalance`` to ``1 + imbalance`` times the mean, as a trained
    router's does not stay uniform, so that the most popular experts overflow their capacity. Assignments are
    listed in priority order, every token's first choice before any second choice, so that the capacity
    drops later choices first. Returns [M] token, expert and weight, M = K * T, on the CPU so that every
    device gets the same routing.
    """
    generator = torch.Generator().manual_seed(seed)
    popularity = torch.linspace(1 - imbalance, 1 + imbalance, num_experts)
    expert = torch.multinomial(popularity.expand(num_tokens, -1), top_k, generator=generator)  # [T, K]
    weight = torch.rand(num_tokens, top_k, generator=generator).softmax(dim=-1)
    token = torch.arange(num_tokens).repeat(top_k)  # [K * T], matching the [K, T] flattening below
    return token, expert.t().reshape(-1), weight.t().reshape(-1).to(dtype)


def make_leaf_plan(make_plan, routing, num_experts, capacity, num_tokens, device):
    """A plan whose (expert-major) weights are an autograd leaf.

    The weights given to make_plan are not made the leaf: every step's backward would then have to go
    through make_plan's permutation of them, which autograd frees after the first backward (and which is
    not dispatch's or combine's work).
    """
    token, expert, weight = (tensor.to(device) for tensor in routing)
    plan = make_plan(token, expert, weight, num_experts, capacity, num_tokens=num_tokens)
    plan.weight.requires_grad_()
    return plan


def dispatch_combine_step(module, x, plan, grad_y, layout):
    """The timed step of an implementation with visionmoe's signatures (``visionmoe.ops`` or ``reference``)."""

    def step():
        y = module.combine(module.dispatch(x, plan, layout), plan, x.shape[0])
        y.backward(grad_y)
        return y

    return step


def einsum_step(x, plan, grad_y):
    """The timed step of the one-hot formulation; building the dense combine tensor is part of it."""

    def step():
        combine_weights = reference.combine_tensor(plan, x.shape[0], x.dtype)
        y = reference.combine_einsum(reference.dispatch_einsum(x, combine_weights != 0), combine_weights)
        y.backward(grad_y)
        return y

    return step


def check_close(name: str, actual: dict, expected: dict) -> None:
    """Aborts the benchmark when an implementation computes something else than the index reference.

    y and x.grad are compared: each element is a copy or a sum of at most K products, so torch's default
    tolerances for the dtype apply. The weights' gradient is not: each is a D-long dot product whose rounding
    depends on the summation order, which would need tolerances tuned to D.
    """
    abort_unless_close(name, actual, expected, "the index reference")


def bytes_moved(num_tokens: int, dim: int, expert_rows: int, element_size: int) -> int:
    """(4 T + 5 R) * D * element size: see the module docstring for the count."""
    return (4 * num_tokens + 5 * expert_rows) * dim * element_size


def copy_reference_seconds(numel: int, dtype: torch.dtype, device: torch.device, warmup: int, repeat: int) -> float:
    """The copy reference: the source holds the step's minimum traffic; the destination is allocated (and, by the
    warmup, touched) once, so the copy pays no page faults or allocations and its bandwidth is a ceiling. Both are
    freed on return, before the implementations are measured."""
    source = torch.ones(numel, dtype=dtype, device=device)
    destination = torch.empty_like(source)
    return timeit(lambda: destination.copy_(source), warmup, repeat, device)


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = apply_benchmark_args(args)
    num_tokens, dim, num_experts = args.tokens, args.dim, args.experts
    element_size = torch.empty((), dtype=dtype).element_size()
    padded = args.layout == "padded"
    capacity = math.ceil(args.topk * num_tokens * args.capacity_factor / num_experts) if padded else None

    routing = random_routing(num_tokens, num_experts, args.topk, args.imbalance, dtype, args.seed)
    num_assignments = routing[0].shape[0]
    generator = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(num_tokens, dim, generator=generator).to(device, dtype).requires_grad_()
    grad_y = torch.randn(num_tokens, dim, generator=generator).to(device, dtype)

    visionmoe_plan = make_leaf_plan(ops.make_plan, routing, num_experts, capacity, num_tokens, device)
    reference_plan = make_leaf_plan(reference.make_plan, routing, num_experts, capacity, num_tokens, device)
    kept = int(visionmoe_plan.expert_load().sum())
    expert_rows = num_experts * capacity if padded else num_assignments
    total_bytes = bytes_moved(num_tokens, dim, expert_rows, element_size)

    plan_kind = f"capacity factor {args.capacity_factor}" if padded else "dropless"
    print(
        f"dispatch + combine, forward + backward: T={num_tokens} D={dim} E={num_experts} K={args.topk} "
        f"C={capacity} ({args.layout}, {plan_kind}) {args.dtype} on {device}"
    )
    print(
        f"assignments {num_assignments}, kept {kept} ({1 - kept / num_assignments:.1%} dropped); "
        f"minimum traffic {total_bytes / 1e6:.1f} MB"
    )

    def clear_grads(plan):
        """So that each step's backward writes the gradients instead of adding to the previous step's."""

        def clear():
            x.grad = plan.weight.grad = None

        return clear

    def run_once(step, plan) -> dict:
        clear_grads(plan)()
        y = step()
        return {"y": y.detach(), "x.grad": x.grad}

    visionmoe_step = dispatch_combine_step(ops, x, visionmoe_plan, grad_y, args.layout)
    index_step = dispatch_combine_step(reference, x, reference_plan, grad_y, args.layout)
    expected = run_once(index_step, reference_plan)
    check_close("visionmoe", run_once(visionmoe_step, visionmoe_plan), expected)

    seconds = {
        "visionmoe": timeit(visionmoe_step, args.warmup, args.repeat, device, clear_grads(visionmoe_plan)),
        "index": timeit(index_step, args.warmup, args.repeat, device, clear_grads(reference_plan)),
    }
    timed_runs = {"visionmoe": args.repeat, "index": args.repeat}
    notes = {}

    dense_bytes = num_tokens * num_experts * (capacity or 0) * element_size
    if not padded:
        notes["einsum"] = "skipped: needs a capacity (the packed layout's plan is dropless)"
    elif dense_bytes > args.max_dense_gb * 1e9:
        notes["einsum"] = f"skipped: would need {dense_bytes / 1e9:.3g} GB"
    else:
        timed_runs["einsum"] = min(args.repeat, args.einsum_repeat)
        seconds["einsum"] = timeit(
            einsum_step(x, reference_plan, grad_y),
            min(args.warmup, EINSUM_MAX_WARMUP),
            timed_runs["einsum"],
            device,
            clear_grads(reference_plan),
        )
        # The last timed run's gradient is still there: checking it costs nothing, where a separate check
        # run would cost as much as another timed run.
        check_close("einsum", {"x.grad": x.grad}, {"x.grad": expected["x.grad"]})

    numel = total_bytes // element_size
    copy_seconds = copy_reference_seconds(numel, dtype, device, args.warmup, args.repeat)
    copy_gb_per_s = 2 * numel * element_size / copy_seconds / 1e9

    rows = []
    for implementation in ("visionmoe", "index", "einsum"):
        elapsed = seconds.get(implementation)
        gb_per_s = None if elapsed is None else total_bytes / elapsed / 1e9
        rows.append(
            {
                "implementation": implementation,
                "timed_runs": timed_runs.get(implementation),
                "median_ms": None if elapsed is None else elapsed * 1e3,
                "visionmoe_speedup": None if elapsed is None else elapsed / seconds["visionmoe"],
                "gb_per_s": gb_per_s,
                "copy_fraction": None if gb_per_s is None else gb_per_s / copy_gb_per_s,
                "note": notes.get(implementation, ""),
            }
        )
    rows.append(
        {
            "implementation": "copy",
            "timed_runs": args.repeat,
            "median_ms": copy_seconds * 1e3,
            "visionmoe_speedup": None,
            "gb_per_s": copy_gb_per_s,
            "copy_fraction": 1.0,
            "note": f"dst.copy_(src), src {total_bytes / 1e6:.1f} MB",
        }
    )

    print()
    print(format_table(rows))
    print(
        "visionmoe_speedup = implementation's median / visionmoe's median; "
        "gb_per_s = minimum traffic / median; copy_fraction = gb_per_s / copy's gb_per_s"
    )

    meta = {
        "benchmark": "dispatch + combine, forward + backward",
        "device": str(device),
        "dtype": args.dtype,
        "layout": args.layout,
        "tokens": num_tokens,
        "dim": dim,
        "experts": num_experts,
        "topk": args.topk,
        "capacity_factor": args.capacity_factor if padded else None,
        "capacity": capacity,
        "assignments": num_assignments,
        "kept_assignments": kept,
        "bytes_moved": total_bytes,
        "bytes_formula": "(4 T + 5 R) * D * element_size, R = E * C (padded) or A (packed)",
        "warmup": args.warmup,
        "repeat": args.repeat,
        "einsum_warmup": min(args.warmup, EINSUM_MAX_WARMUP),
        "einsum_repeat": min(args.repeat, args.einsum_repeat),
        "max_dense_gb": args.max_dense_gb,
        "imbalance": args.imbalance,
        "seed": args.seed,
    }
    paths = write_results(f"dispatch_{args.layout}", rows, meta, device=device, tag=args.tag, directory=args.output)
    print("\nwrote " + ", ".join(str(path) for path in paths))


if __name__ == "__main__":
    main()
