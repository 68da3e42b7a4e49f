#!/usr/bin/env python
"""Soft MoE dispatch + combine, forward and backward: visionmoe's fused operators against the eager reference.

Implementations:
  visionmoe  ``visionmoe.ops.soft_dispatch`` / ``soft_combine``: each computes its softmax inside the operator;
             autograd saves only the inputs and the backward recomputes the softmax.
  eager      ``visionmoe.reference.soft_dispatch`` / ``soft_combine``: a softmax, then an einsum, under plain
             autograd, which keeps both [G, T, S] softmax outputs until the backward.
  gemm_only  the six batched GEMMs of a forward + backward (two forward, four backward) on preallocated
             operands of the same shapes, nothing else: a floor for both implementations.

Each timed step is ``slots = dispatch(x, logits); out = combine(slots, logits); out.backward(grad_out)``, with
gradients to x and to the logits (which receive both operators' contributions). No expert runs between
dispatch and combine. FLOPs: 6 GEMMs of 2 G T S D each, so 12 G T S D per step.

Memory: ``saved_mb`` is what autograd keeps from the forward for the backward, measured with
``torch.autograd.graph.saved_tensors_hooks`` as the bytes of the distinct storages it saves; ``beyond_inputs_mb``
leaves out x's and the logits' storages, which the caller holds anyway. Both implementations save the slots
(combine's input, here the dispatch's output); the eager one also saves both softmax outputs. The peak
allocated memory of a step above what was allocated before it is reported as well (``peak_mb``,
``common.allocated_peak_bytes``).

Usage:
  python benchmarks/bench_soft_moe.py                               # CPU, G=32 T=196 D=384 E=16, P=1 and P=12
  python benchmarks/bench_soft_moe.py --threads 1 --slots-per-expert 1 4 12
  python benchmarks/bench_soft_moe.py --device cuda --dtype bfloat16 --groups 256
Results: benchmarks/results/soft_moe_<device>[_<tag>].json and .md.
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
    saved_storages,
    timeit_rounds,
    write_results,
)

from visionmoe import ops, reference

IMPLEMENTATIONS = {"visionmoe": ops, "eager": reference}


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, warmup=3, repeat=20, rounds=3)
    parser.add_argument("--groups", type=int, default=32, help="G, images per batch (default 32)")
    parser.add_argument("--tokens", type=int, default=196, help="T, tokens per group (default 196: 14 x 14 patches)")
    parser.add_argument("--dim", type=int, default=384, help="D (default 384, ViT-S)")
    parser.add_argument("--experts", type=int, default=16, help="E (default 16)")
    parser.add_argument(
        "--slots-per-expert",
        type=int,
        nargs="+",
        default=[1, 12],
        help="P values to run, S = E * P (default 1 and 12, Soft MoE's round(T / E) for T = 196)",
    )
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_benchmark_args(parser, argv)
    if min(args.groups, args.tokens, args.dim, args.experts, *args.slots_per_expert) < 1:
        parser.error("sizes must be >= 1")
    return args


def soft_moe_step(module, x, logits, grad_out):
    def step():
        out = module.soft_combine(module.soft_dispatch(x, logits), logits)
        out.backward(grad_out)
        return out

    return step


def saved_bytes(module, x, logits) -> tuple[int, int]:
    """Bytes of the distinct storages autograd saves in a forward: all of them, and those beyond x's and the
    logits' own."""
    storages = saved_storages(lambda: module.soft_combine(module.soft_dispatch(x, logits), logits))
    inputs = {x.untyped_storage().data_ptr(), logits.untyped_storage().data_ptr()}
    total = sum(storages.values())
    return total, total - sum(nbytes for pointer, nbytes in storages.items() if pointer in inputs)


def gemm_only_step(x, logits, grad_out):
    """The six batched GEMMs of a step, on operands of the right shapes: W^T x and C y forward; W grad_slots,
    x grad_slots^T, C^T grad_out and grad_out y^T backward."""
    weights = torch.softmax(logits, dim=1)
    slots = torch.bmm(weights.transpose(1, 2), x)

    def step():
        torch.bmm(weights.transpose(1, 2), x)
        torch.bmm(weights, slots)
        torch.bmm(weights, slots)
        torch.bmm(x, slots.transpose(1, 2))
        torch.bmm(weights.transpose(1, 2), grad_out)
        torch.bmm(grad_out, slots.transpose(1, 2))

    return step


def run_config(args, device, dtype, slots_per_expert: int) -> list[dict]:
    G, T, D, E = args.groups, args.tokens, args.dim, args.experts
    S = E * slots_per_expert
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(G, T, D, generator=generator).to(device, dtype).requires_grad_()
    logits = (2 * torch.randn(G, T, S, generator=generator)).to(device, dtype).requires_grad_()
    grad_out = torch.randn(G, T, D, generator=generator).to(device, dtype)

    def clear_grads():
        x.grad = logits.grad = None

    results = {}
    for name, module in IMPLEMENTATIONS.items():
        clear_grads()
        out = soft_moe_step(module, x, logits, grad_out)()
        results[name] = {"out": out.detach(), "x.grad": x.grad, "logits.grad": logits.grad}
    abort_unless_close("visionmoe", results["visionmoe"], results["eager"], "the eager reference")

    flops = 12 * G * T * S * D
    steps = {name: soft_moe_step(module, x, logits, grad_out) for name, module in IMPLEMENTATIONS.items()}
    gemms = gemm_only_step(x.detach(), logits.detach(), grad_out)
    # clear_grads is harmless for the GEMM-only step, whose inputs are detached.
    seconds = timeit_rounds({**steps, "gemm_only": gemms}, args.warmup, args.repeat, args.rounds, device, clear_grads)

    rows = []
    for name, module in IMPLEMENTATIONS.items():
        total, beyond_inputs = saved_bytes(module, x, logits)
        clear_grads()
        peak = allocated_peak_bytes(steps[name], device)
        rows.append(
            {
                "S": S,
                "implementation": name,
                "median_ms": seconds[name] * 1e3,
                "visionmoe_speedup": seconds[name] / seconds["visionmoe"],
                "gflop_per_s": flops / seconds[name] / 1e9,
                "saved_mb": total / 1e6,
                "beyond_inputs_mb": beyond_inputs / 1e6,
                "peak_mb": peak / 1e6,
            }
        )
    rows.append(
        {
            "S": S,
            "implementation": "gemm_only",
            "median_ms": seconds["gemm_only"] * 1e3,
            "visionmoe_speedup": seconds["gemm_only"] / seconds["visionmoe"],
            "gflop_per_s": flops / seconds["gemm_only"] / 1e9,
            "saved_mb": None,
            "beyond_inputs_mb": None,
            "peak_mb": None,
        }
    )
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = apply_benchmark_args(args)
    print(
        f"soft dispatch + combine, forward + backward: G={args.groups} T={args.tokens} D={args.dim} "
        f"E={args.experts} P in {args.slots_per_expert} {args.dtype} on {device}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    rows = [row for P in args.slots_per_expert for row in run_config(args, device, dtype, P)]
    print()
    print(format_table(rows))
    print(
        "visionmoe_speedup = implementation's median / visionmoe's median; gflop_per_s = 12 G T S D / median; "
        "saved_mb = storages autograd keeps for the backward, beyond_inputs_mb = the same without x and logits"
    )
    meta = {
        "benchmark": "soft dispatch + combine, forward + backward",
        "device": str(device),
        "dtype": args.dtype,
        "groups": args.groups,
        "tokens": args.tokens,
        "dim": args.dim,
        "experts": args.experts,
        "slots_per_expert": args.slots_per_expert,
        "flops_formula": "12 G T S D (six batched GEMMs of 2 G T S D)",
        "memory": "saved_mb: distinct storages saved by autograd (saved_tensors_hooks); peak_mb: peak allocated "
        "during a step beyond what was allocated before it",
        "warmup": args.warmup,
        "repeat": args.repeat,
        "rounds": args.rounds,
        "seed": args.seed,
    }
    paths = write_results("soft_moe", rows, meta, device=device, tag=args.tag, directory=args.output)
    print("\nwrote " + ", ".join(str(path) for path in paths))


if __name__ == "__main__":
    main()
