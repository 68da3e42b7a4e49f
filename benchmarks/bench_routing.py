"""Routers, forward + backward: each registered router against the same router running the pure-PyTorch
references of its operators (``visionmoe.reference``), in one run; and the assignment operators alone.

Each timed step routes x [G, T, D] (``router(x)``) and back-propagates a loss over the routing result into the
router's parameters and x: for sparse routers the plan's combine weights (times fixed random numbers) plus the
auxiliary losses; for soft routers the combined slot mix. The router's projection (a [D, E] matmul) is part of
both sides. The reference side swaps the router module's ``ops`` for ``visionmoe.reference``, so only the
operator implementations differ.

Operator rows time the assignment operators alone: probabilities [G, T, E] (a leaf) -> routing plan -> combine
weights -> backward into the probabilities, for ``topk_route`` (Batch Priority Routing, capacity factor 1.25)
and ``expert_choice_route``, against their references.

Usage:
  python benchmarks/bench_routing.py                         # CPU: T=16384, E in {8, 32, 128}, K in {1, 2}
  python benchmarks/bench_routing.py --routers topk --experts 32 --topk 2
  python benchmarks/bench_routing.py --device cuda
Results: benchmarks/results/routing_<device>[_<tag>].json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import apply_benchmark_args, benchmark_parser, format_table, parse_benchmark_args, timeit, write_results  # noqa: E402

from visionmoe import ops, reference  # noqa: E402
from visionmoe.routers import capacity_from_factor, create_router, list_routers  # noqa: E402

# Routers whose assignment takes K (experts per token); the others ignore --topk.
TOKEN_CHOICE = {"topk", "sinkhorn_topk"}
# Options each router is benchmarked with (V-MoE style BPR for token choice).
ROUTER_OPTIONS = {
    "topk": dict(batch_priority=True, capacity_factor=1.25),
    "sinkhorn_topk": dict(batch_priority=True, capacity_factor=1.25),
}


@contextlib.contextmanager
def reference_operators(router):
    """Runs ``router`` with ``visionmoe.reference`` in place of ``visionmoe.ops`` in its module."""
    module = importlib.import_module(type(router).__module__)
    saved = module.ops
    module.ops = reference
    try:
        yield
    finally:
        module.ops = saved


def routing_loss(router_output, x, probe):
    plan, metrics = router_output
    if hasattr(plan, "weight"):
        loss = (plan.weight * probe[: plan.weight.shape[0]]).sum()
    else:
        loss = plan.combine(plan.dispatch(x)).sum() * probe[0]
    return loss + sum(metrics.aux_losses.values(), torch.zeros((), device=x.device))


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, warmup=2, repeat=7, dtypes=None)
    parser.add_argument("--routers", nargs="*", default=None, help="router names (default: all registered)")
    parser.add_argument("--tokens", type=int, default=16384, help="T, tokens per group")
    parser.add_argument("--groups", type=int, default=1, help="G, groups routed independently")
    parser.add_argument("--dim", type=int, default=384, help="D")
    parser.add_argument("--experts", type=int, nargs="*", default=[8, 32, 128], help="E values")
    parser.add_argument("--topk", type=int, nargs="*", default=[1, 2], help="K values (token-choice routers)")
    parser.add_argument(
        "--soft-group-size",
        type=int,
        default=196,
        help="tokens per group for the soft router (one image of 14 x 14 patches)",
    )
    return parser


def main(argv=None):
    args = parse_benchmark_args(build_parser(), argv)
    device, _ = apply_benchmark_args(args)
    names = args.routers or [name for name in list_routers() if name != "hindsight"]
    torch.manual_seed(args.seed)
    x = torch.randn(args.groups, args.tokens, args.dim, device=device, requires_grad=True)
    rows = []
    for name in names:
        for num_experts in args.experts:
            for k in args.topk if name in TOKEN_CHOICE else [None]:
                options = dict(ROUTER_OPTIONS.get(name, {}))
                if k is not None:
                    options["k"] = k
                router_input = x
                if name == "soft":
                    # Soft MoE mixes all tokens of a group into every slot: it routes per image, not per batch.
                    size = args.soft_group_size
                    whole_groups = args.groups * args.tokens // size
                    router_input = x.reshape(-1, args.dim)[: whole_groups * size].reshape(whole_groups, size, args.dim)
                    options["slots_per_expert"] = max(1, round(size / num_experts))
                router = create_router(name, args.dim, num_experts, **options).to(device).train()
                probe = torch.rand(args.groups * args.tokens * max(k or 1, 1) * 2, device=device)

                def step(router=router, router_input=router_input):
                    routing_loss(router(router_input), router_input, probe).backward()

                def clear():
                    x.grad = None
                    router.zero_grad(set_to_none=True)

                fused = timeit(step, args.warmup, args.repeat, device, setup=clear)
                with reference_operators(router):
                    unfused = timeit(step, args.warmup, args.repeat, device, setup=clear)
                rows.append(
                    {
                        "router": name,
                        "E": num_experts,
                        "K": k,
                        "visionmoe_ms": fused * 1e3,
                        "reference_ms": unfused * 1e3,
                        "speedup": unfused / fused,
                    }
                )
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    for num_experts in args.experts:
        probs = torch.rand(args.groups, args.tokens, num_experts, device=device).softmax(-1).requires_grad_()
        cases = [("topk_route", k) for k in args.topk] + [("expert_choice_route", None)]
        for op_name, k in cases:

            def route(implementation, op_name=op_name, k=k):
                if op_name == "topk_route":
                    capacity = capacity_from_factor(k * args.tokens, num_experts, 1.25)
                    plan = implementation.topk_route(probs, k, capacity, batch_priority=True)
                else:
                    plan = implementation.expert_choice_route(
                        probs, capacity_from_factor(args.tokens, num_experts, 1.0)
                    )
                plan.weight.sum().backward()

            def clear():
                probs.grad = None

            fused = timeit(lambda: route(ops), args.warmup, args.repeat, device, setup=clear)
            unfused = timeit(lambda: route(reference), args.warmup, args.repeat, device, setup=clear)
            rows.append(
                {
                    "router": f"op:{op_name}",
                    "E": num_experts,
                    "K": k,
                    "visionmoe_ms": fused * 1e3,
                    "reference_ms": unfused * 1e3,
                    "speedup": unfused / fused,
                }
            )
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    meta = {
        "benchmark": "router forward + backward vs the same router on reference operators",
        "tokens": args.tokens,
        "groups": args.groups,
        "dim": args.dim,
        "device": str(device),
        "warmup": args.warmup,
        "repeat": args.repeat,
        "seed": args.seed,
        "router_options": ROUTER_OPTIONS,
        "soft_group_size": args.soft_group_size,
    }
    paths = write_results("routing", rows, meta, device=device, tag=args.tag, directory=args.output)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
