#!/usr/bin/env python
"""Log-domain Sinkhorn normalisation of router logits, forward and backward: visionmoe against the reference.

Implementations:
  visionmoe  ``visionmoe.ops.sinkhorn``: fused row and column steps; the backward recomputes each iteration's
             softmaxes from the logits and the saved potentials (K * (T + E) numbers per group).
  reference  ``visionmoe.reference.sinkhorn``: two ``torch.logsumexp`` calls per iteration, differentiated by
             autograd through the unrolled iterations (which keeps every iteration's [G, T, E] intermediates).

For each E, two steps are timed: the forward alone (``sinkhorn(logits)``, with autograd recording, as in
training) and forward + backward (``sinkhorn(logits).backward(grad)``). Before timing, each implementation's
log-plan and logits gradient are checked against the reference's in float64, so that a wrong result is never
timed. ns_per_entry = forward + backward median / (G * T * E * K). peak_mb is the peak memory the forward +
backward step allocates beyond its inputs (``common.allocated_peak_bytes``).

Usage:
  python benchmarks/bench_sinkhorn.py                          # CPU, T=16384, E in 8, 32, 128, 20 iterations
  python benchmarks/bench_sinkhorn.py --device cuda --dtype bfloat16
Results: benchmarks/results/sinkhorn_<device>[_<tag>].json and .md.
"""

from __future__ import annotations

import argparse

import torch
from common import (
    abort_unless_close,
    allocated_peak_bytes,
    apply_benchmark_args,
    benchmark_parser,
    format_table,
    parse_benchmark_args,
    timeit,
    write_results,
)

from visionmoe import ops, reference

# Agreement with the float64 reference that a correct implementation reaches at these sizes; log-plan entries
# are a few units, and gradients of order one.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-1, rtol=2e-2),
    torch.float16: dict(atol=2e-2, rtol=1e-2),
}
IMPLEMENTATIONS = {"visionmoe": ops.sinkhorn, "reference": reference.sinkhorn}


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, warmup=2, repeat=10)
    parser.add_argument("--tokens", type=int, default=16384, help="T, tokens per group (default 16384)")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128], help="E values (default 8 32 128)")
    parser.add_argument("--groups", type=int, default=1, help="G (default 1)")
    parser.add_argument(
        "--iterations",
        type=int,
        default=ops.DEFAULT_SINKHORN_ITERATIONS,
        help=f"K (default {ops.DEFAULT_SINKHORN_ITERATIONS}, the operator's default)",
    )
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_benchmark_args(parser, argv)
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")
    if args.tokens < 1 or args.groups < 1 or min(args.experts) < 1:
        parser.error("--tokens, --groups and --experts must be >= 1")
    return args


def check_against_float64(name: str, sinkhorn, logits, grad_log_plan, iterations: int, dtype: torch.dtype) -> None:
    """Aborts the benchmark when an implementation's log-plan or gradient differs from the float64 reference's:
    its timings would be meaningless."""
    results = []
    for function, inputs in (
        (sinkhorn, (logits, grad_log_plan)),
        (reference.sinkhorn, (logits.double(), grad_log_plan.double())),
    ):
        leaf = inputs[0].detach().clone().requires_grad_()
        log_plan = function(leaf, iterations)
        log_plan.backward(inputs[1])
        results.append({"log_plan": log_plan.detach().double(), "logits.grad": leaf.grad.double()})
    abort_unless_close(name, *results, "the float64 reference", **TOLERANCES[dtype])


def peak_memory_mb(step, logits, device: torch.device):
    """Peak memory one forward + backward allocates beyond what was allocated before it."""
    logits.grad = None
    return allocated_peak_bytes(step, device) / 1e6


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = apply_benchmark_args(args)
    G, T, K = args.groups, args.tokens, args.iterations
    print(f"sinkhorn, forward and forward + backward: G={G} T={T} E={args.experts} K={K} {args.dtype} on {device}")

    rows = []
    for E in args.experts:
        generator = torch.Generator().manual_seed(args.seed)
        logits = (torch.randn(G, T, E, generator=generator) * 2).to(device, dtype).requires_grad_()
        grad_log_plan = torch.randn(G, T, E, generator=generator).to(device, dtype)

        def clear_grad():
            """So that each backward writes the gradient instead of adding to the previous one."""
            logits.grad = None

        seconds = {}
        for name, sinkhorn in IMPLEMENTATIONS.items():
            check_against_float64(name, sinkhorn, logits, grad_log_plan, K, dtype)

            def forward(sinkhorn=sinkhorn):
                return sinkhorn(logits, K)

            def forward_backward(sinkhorn=sinkhorn):
                sinkhorn(logits, K).backward(grad_log_plan)

            seconds[name] = (
                timeit(forward, args.warmup, args.repeat, device, clear_grad),
                timeit(forward_backward, args.warmup, args.repeat, device, clear_grad),
                peak_memory_mb(forward_backward, logits, device),
            )
        for name, (forward_s, forward_backward_s, peak_mb) in seconds.items():
            rows.append(
                {
                    "experts": E,
                    "implementation": name,
                    "forward_ms": forward_s * 1e3,
                    "forward_backward_ms": forward_backward_s * 1e3,
                    "visionmoe_speedup": forward_backward_s / seconds["visionmoe"][1],
                    "ns_per_entry": forward_backward_s * 1e9 / (G * T * E * K),
                    "peak_mb": peak_mb,
                }
            )
        print(format_table(rows[-len(seconds) :]), flush=True)

    print()
    print(format_table(rows))
    print(
        "visionmoe_speedup = implementation's forward + backward median / visionmoe's; "
        "ns_per_entry = forward + backward median / (G * T * E * K)"
    )
    meta = {
        "benchmark": "sinkhorn, forward and forward + backward",
        "device": str(device),
        "dtype": args.dtype,
        "groups": G,
        "tokens": T,
        "experts": args.experts,
        "iterations": K,
        "logits": "2 * standard normal",
        "warmup": args.warmup,
        "repeat": args.repeat,
        "seed": args.seed,
    }
    paths = write_results("sinkhorn", rows, meta, device=device, tag=args.tag, directory=args.output)
    print("\nwrote " + ", ".join(str(path) for path in paths))


if __name__ == "__main__":
    main()
