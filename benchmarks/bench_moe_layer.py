"""MoE MLP layer, forward + backward: visionmoe's MoEMLP against (a) a dense MLP with the same active FLOPs (the
limit, ratio 1.0), (b) a Python loop over experts as Hugging Face MoE blocks do, and (c) the GShard one-hot
einsum formulation; time and peak memory, in one run.

All four route with the same softmax top-K router (x W, softmax, top-K, capacity C = ceil(K T cf / E) for the
capacity-based ones) and run the same expert weights; the dense MLP is one expert applied to every token
(K = 1 and capacity factor 1 give the MoE layers the same expert FLOPs).

Memory is reported two ways: ``allocated_peak_mb``, the peak of the bytes a step holds allocated through
PyTorch's allocator beyond what was allocated before it (``common.allocated_peak_bytes``), and ``peak_mb``, each
implementation's peak memory above a baseline, measured in a fresh process per implementation (peak resident
memory, VmHWM, on CPU, which includes what the C library's heap holds beyond live tensors;
``torch.cuda.max_memory_allocated`` on CUDA), so one implementation's allocations cannot hide another's.

Usage:
  python benchmarks/bench_moe_layer.py                     # CPU: D=384, F=1536, E=16, K=1, T=8192
  python benchmarks/bench_moe_layer.py --device cuda --dim 768 --hidden 3072 --tokens 65536 --dtype bfloat16
Results: benchmarks/results/moe_layer_<device>[_<tag>].json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    allocated_peak_bytes,
    apply_benchmark_args,
    benchmark_parser,
    format_table,
    parse_benchmark_args,
    peak_memory_in_fresh_process,
    peak_resident_bytes,
    settings,
    timeit,
    write_results,
)

from visionmoe import reference  # noqa: E402
from visionmoe.layers import MoEMLP  # noqa: E402

IMPLEMENTATIONS = ("dense", "visionmoe", "expert_loop", "einsum")


def build(args, device, dtype):
    torch.manual_seed(args.seed)
    layer = (
        MoEMLP(
            args.dim,
            args.hidden,
            args.experts,
            "topk",
            k=args.topk,
            capacity_factor=args.capacity_factor,
            noise_std=0.0,
        )
        .to(device=device, dtype=dtype)
        .train()
    )
    x = torch.randn(1, args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    return layer, x, grad


def expert(layer, e, rows):
    experts = layer.experts
    return F.gelu(rows @ experts.w1[e] + experts.b1[e]) @ experts.w2[e] + experts.b2[e]


def route(layer, x):
    probs = layer.router.proj(x.reshape(-1, x.shape[-1])).softmax(-1)
    return probs, probs.topk(layer.router.k, dim=-1)


def run_dense(layer, x):
    return expert(layer, 0, x)


def run_expert_loop(layer, x):
    tokens = x.reshape(-1, x.shape[-1])
    probs, (top_probs, top_experts) = route(layer, tokens)
    out = torch.zeros_like(tokens)
    for e in range(layer.num_experts):
        token_index, choice = torch.nonzero(top_experts == e, as_tuple=True)
        weight = top_probs[token_index, choice].unsqueeze(-1)
        out = out.index_add(0, token_index, weight * expert(layer, e, tokens[token_index]))
    return out.view_as(x)


def run_einsum(layer, x):
    tokens = x.reshape(-1, x.shape[-1])
    T, D = tokens.shape
    probs = layer.router.proj(tokens).softmax(-1)
    plan = reference.topk_route(probs.detach(), layer.router.k, layer.router.capacity(T), weights=probs)
    combine_weights = reference.combine_tensor(plan, T, dtype=tokens.dtype)  # [T, E, C]
    rows = reference.dispatch_einsum(tokens, combine_weights != 0)  # [E, C, D]
    return reference.combine_einsum(layer.experts(rows), combine_weights).view_as(x)


RUNNERS = {
    "dense": run_dense,
    "visionmoe": lambda layer, x: layer(x),
    "expert_loop": run_expert_loop,
    "einsum": run_einsum,
}


def step(implementation, layer, x, grad):
    RUNNERS[implementation](layer, x).backward(grad)


def peak_memory_probe(args, device, dtype):
    """Runs in a fresh process: one step of one implementation (or none), prints the peak memory in bytes."""
    layer, x, grad = build(args, device, dtype)
    if args.memory_probe != "none":
        step(args.memory_probe, layer, x, grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
        print(torch.cuda.max_memory_allocated())
    else:
        print(peak_resident_bytes())


def measure_peak_memory(args, implementation) -> int:
    return peak_memory_in_fresh_process(__file__, args, implementation, ("tag", "warmup", "repeat", "einsum_repeat"))


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, warmup=2, repeat=7)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=1)
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--einsum-repeat", type=int, default=3)
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = parse_benchmark_args(build_parser(), argv)
    device, dtype = apply_benchmark_args(args)
    if args.memory_probe is not None:
        peak_memory_probe(args, device, dtype)
        return

    layer, x, grad = build(args, device, dtype)
    capacity = layer.router.capacity(args.tokens)
    # visionmoe and the einsum formulation route with the same plan, so they must agree exactly.
    with torch.no_grad():
        torch.testing.assert_close(layer(x), run_einsum(layer, x), atol=1e-4, rtol=1e-4)

    def clear():
        x.grad = None
        layer.zero_grad(set_to_none=True)

    baseline = measure_peak_memory(args, "none")
    rows = []
    for implementation in IMPLEMENTATIONS:
        repeat = min(args.repeat, args.einsum_repeat) if implementation == "einsum" else args.repeat
        seconds = timeit(lambda: step(implementation, layer, x, grad), args.warmup, repeat, device, setup=clear)
        clear()
        allocated = allocated_peak_bytes(lambda: step(implementation, layer, x, grad), device)
        peak = measure_peak_memory(args, implementation) - baseline
        rows.append(
            {
                "implementation": implementation,
                "median_ms": seconds * 1e3,
                "allocated_peak_mb": allocated / 2**20,
                "peak_mb": peak / 2**20,
            }
        )
    dense = rows[0]
    for row in rows:
        row["time_vs_dense"] = row["median_ms"] / dense["median_ms"]
        row["allocated_vs_dense"] = row["allocated_peak_mb"] / dense["allocated_peak_mb"]
        row["memory_vs_dense"] = row["peak_mb"] / dense["peak_mb"]
    visionmoe_ms = rows[1]["median_ms"]
    for row in rows:
        row["visionmoe_speedup"] = row["median_ms"] / visionmoe_ms
    print(
        f"MoE MLP forward + backward: T={args.tokens} D={args.dim} F={args.hidden} E={args.experts} K={args.topk} "
        f"C={capacity} {args.dtype} on {device}"
    )
    print(format_table(rows))
    meta = {
        "benchmark": "MoE MLP forward + backward against dense, expert loop and one-hot einsum",
        **settings(args),
        "capacity": capacity,
        "memory": "allocated: peak bytes allocated through PyTorch's allocator during a step; peak: above a "
        "baseline process holding the same inputs and weights",
    }
    paths = write_results("moe_layer", rows, meta, device=device, tag=args.tag, directory=args.output)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
