#!/usr/bin/env python
"""Grouped expert MLP, forward and backward: visionmoe's operator against a dense MLP and a loop over experts.

Implementations, all on packed rows x [M, D] with E experts of M / E rows each (balanced offsets):
  visionmoe  ``visionmoe.ops.expert_mlp`` (packed layout, expert_offsets [E + 1]).
  dense      one MLP over all M rows (``F.linear -> activation -> F.linear`` with [F', D] and [D, F] weights):
             the same FLOPs as the E experts together, so ``vs_dense`` = 1.0 is the limit an MoE layer can reach.
  loop       a Python loop over the experts, each with its own nn.Linear-style weights (as the experts of a
             Hugging Face MoE block, an nn.ModuleList, have), applying Linear -> activation -> Linear to its rows
             under plain autograd, then concatenating the outputs. Its row bounds are Python ints computed once,
             outside the timed step.

Before timing, visionmoe's outputs and gradients are checked against ``visionmoe.reference.expert_mlp``.

Each timed step is ``y = mlp(x); y.backward(grad_y)`` with gradients to x and to every weight and bias.
FLOPs: six GEMMs of 2 M D F each (F' = 2F doubles the three first-layer ones for silu_gated).
``saved_mb`` is what autograd keeps from the forward for the backward (distinct storages, via
``torch.autograd.graph.saved_tensors_hooks``), leaving out x's and the weights' storages, which the caller holds.

Usage:
  python benchmarks/bench_expert_mlp.py                         # CPU, D=384 F=1536 E=16 M=8192, gelu and silu_gated
  python benchmarks/bench_expert_mlp.py --threads 1 --activations gelu
  python benchmarks/bench_expert_mlp.py --device cuda --dtype bfloat16 --rows 65536 --dim 768 --hidden 3072
Results: benchmarks/results/expert_mlp_<device>[_<tag>].json and .md.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import (
    abort_unless_close,
    apply_benchmark_args,
    benchmark_parser,
    format_table,
    parse_benchmark_args,
    saved_storages,
    timeit_rounds,
    write_results,
)

from visionmoe import ops, reference


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, warmup=2, repeat=5, rounds=3)
    parser.add_argument("--rows", type=int, default=8192, help="M, routed rows (default 8192)")
    parser.add_argument("--dim", type=int, default=384, help="D (default 384, ViT-S)")
    parser.add_argument("--hidden", type=int, default=1536, help="F (default 1536 = 4 D)")
    parser.add_argument("--experts", type=int, default=16, help="E (default 16); M must be a multiple of E")
    parser.add_argument("--activations", nargs="+", choices=ops.ACTIVATIONS, default=list(ops.ACTIVATIONS))
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_benchmark_args(parser, argv)
    if min(args.rows, args.dim, args.hidden, args.experts) < 1 or args.rows % args.experts:
        parser.error("sizes must be >= 1 and --rows a multiple of --experts")
    return args


def dense_mlp(x, w1, b1, w2, b2, activation):
    """One MLP over all rows; w1 [F', D] and w2 [D, F] as nn.Linear stores them."""
    pre = F.linear(x, w1, b1)
    if activation == "gelu":
        hidden = F.gelu(pre)
    else:
        gate, value = pre.chunk(2, dim=-1)
        hidden = F.silu(gate) * value
    return F.linear(hidden, w2, b2)


def saved_bytes(forward, held) -> int:
    """Bytes of the distinct storages autograd saves in a forward, beyond those of the tensors in ``held``."""
    held_pointers = {t.untyped_storage().data_ptr() for t in held}
    return sum(nbytes for pointer, nbytes in saved_storages(forward).items() if pointer not in held_pointers)


def loop_mlp(x, expert_weights, bounds, activation):
    """Every expert's dense MLP on its rows, one after the other."""
    return torch.cat(
        [
            dense_mlp(x[begin:end], *weights, activation)
            for weights, begin, end in zip(expert_weights, bounds[:-1], bounds[1:])
        ]
    )


def check_close(actual: list, expected: list) -> None:
    """Aborts when the operator computes something else than the reference: timing it would be meaningless."""
    quantities = ("y", "x.grad", "w1.grad", "b1.grad", "w2.grad", "b2.grad")
    abort_unless_close(
        "visionmoe",
        dict(zip(quantities, actual)),
        dict(zip(quantities, expected)),
        "the reference",
        atol=1e-3,
        rtol=1e-3,
    )


def run_config(args, device, dtype, activation: str) -> list[dict]:
    M, D, Fh, E = args.rows, args.dim, args.hidden, args.experts
    pre_width = 2 * Fh if activation == "silu_gated" else Fh
    generator = torch.Generator().manual_seed(args.seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=generator)).to(device, dtype).requires_grad_()

    x = randn(M, D)
    w1, b1 = randn(E, D, pre_width, scale=D**-0.5), randn(E, pre_width, scale=0.1)
    w2, b2 = randn(E, Fh, D, scale=Fh**-0.5), randn(E, D, scale=0.1)
    dense_w1, dense_b1 = randn(pre_width, D, scale=D**-0.5), randn(pre_width, scale=0.1)
    dense_w2, dense_b2 = randn(D, Fh, scale=Fh**-0.5), randn(D, scale=0.1)
    grad_y = torch.randn(M, D, generator=generator).to(device, dtype)
    offsets = torch.arange(E + 1, dtype=torch.int64).mul_(M // E).to(device)
    bounds = offsets.tolist()
    loop_weights = [
        tuple(t.detach().clone().requires_grad_() for t in (w1[e].T.contiguous(), b1[e], w2[e].T.contiguous(), b2[e]))
        for e in range(E)
    ]
    expert_leaves = (x, w1, b1, w2, b2)
    leaves = {
        "visionmoe": expert_leaves,
        "dense": (x, dense_w1, dense_b1, dense_w2, dense_b2),
        "loop": (x, *(t for weights in loop_weights for t in weights)),
    }

    forwards = {
        "visionmoe": lambda: ops.expert_mlp(x, w1, b1, w2, b2, activation=activation, expert_offsets=offsets),
        "dense": lambda: dense_mlp(x, dense_w1, dense_b1, dense_w2, dense_b2, activation),
        "loop": lambda: loop_mlp(x, loop_weights, bounds, activation),
    }

    def clear_grads():
        for group in leaves.values():
            for t in group:
                t.grad = None

    def step(forward):
        def run():
            forward().backward(grad_y)

        return run

    results = []
    for forward in (
        forwards["visionmoe"],
        lambda: reference.expert_mlp(x, w1, b1, w2, b2, activation=activation, expert_offsets=offsets),
    ):
        clear_grads()
        y = forward()
        y.backward(grad_y)
        results.append([y.detach(), *(t.grad for t in expert_leaves)])
    check_close(*results)

    seconds = timeit_rounds(
        {name: step(forward) for name, forward in forwards.items()},
        args.warmup,
        args.repeat,
        args.rounds,
        device,
        clear_grads,
    )

    flops = 3 * 2 * M * D * (pre_width + Fh)
    rows = []
    for name, forward in forwards.items():
        held = leaves[name]
        rows.append(
            {
                "activation": activation,
                "implementation": name,
                "median_ms": seconds[name] * 1e3,
                "vs_dense": seconds[name] / seconds["dense"],
                "loop_speedup": seconds["loop"] / seconds[name],
                "gflop_per_s": flops / seconds[name] / 1e9,
                "saved_mb": saved_bytes(forward, held) / 1e6,
            }
        )
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = apply_benchmark_args(args)
    print(
        f"expert MLP, forward + backward: M={args.rows} D={args.dim} F={args.hidden} E={args.experts} "
        f"{args.dtype} on {device}, {torch.get_num_threads()} CPU threads"
    )
    rows = [row for activation in args.activations for row in run_config(args, device, dtype, activation)]
    print()
    print(format_table(rows))
    print(
        "vs_dense = median / dense median (1.0 is the limit); loop_speedup = loop median / median; "
        "gflop_per_s = 6 M D (F' + F) / median; saved_mb = storages autograd keeps beyond x and the weights"
    )
    meta = {
        "benchmark": "grouped expert MLP, forward + backward, packed rows, balanced offsets",
        "device": str(device),
        "dtype": args.dtype,
        "rows": args.rows,
        "dim": args.dim,
        "hidden": args.hidden,
        "experts": args.experts,
        "flops_formula": "6 M D (F' + F): three GEMMs per layer, F' = F (gelu) or 2F (silu_gated)",
        "memory": "saved_mb: distinct storages saved by autograd beyond x and the weights (saved_tensors_hooks)",
        "warmup": args.warmup,
        "repeat": args.repeat,
        "rounds": args.rounds,
        "seed": args.seed,
    }
    paths = write_results("expert_mlp", rows, meta, device=device, tag=args.tag, directory=args.output)
    print("\nwrote " + ", ".join(str(path) for path in paths))


if __name__ == "__main__":
    main()
