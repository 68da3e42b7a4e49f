"""Expert parallelism: one MoE layer's forward + backward step at W = 1 and W = 2 (gloo on the CPU) on the same
global batch, with the time per step, the bytes each rank exchanges per step, the time of one all-to-all alone, and
the GB/s of the permute copies that reorder the exchanged rows (source-major <-> expert-major); plus the scaling
model (``--scaling-model``): all-to-all bytes per layer against expert FLOPs at NVLink and InfiniBand bandwidths
for V-MoE-S/B/L with E = 32, written to results/expert_parallel_scaling.md.

At W = 2 each rank routes half of the global batch and holds E / 2 experts; a step is two all-to-alls forward and
two backward. Every process runs ``--threads`` threads (default 1), so W = 2 uses twice the cores of W = 1: the
comparison shows the exchange's overhead, not a speed-up one would see on separate devices.

Usage:
  python benchmarks/bench_expert_parallel.py                   # CPU, gloo: W = 1 and W = 2
  python benchmarks/bench_expert_parallel.py --router dropless
  python benchmarks/bench_expert_parallel.py --scaling-model   # results/expert_parallel_scaling.md only
Results: benchmarks/results/expert_parallel_cpu[_<tag>].json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_parser, format_table, parse_benchmark_args, settings, timeit, write_results  # noqa: E402

from visionmoe.distributed import run_processes  # noqa: E402
from visionmoe.layers import MoEMLP  # noqa: E402
from visionmoe.layers.expert_parallel import run_experts_equal_splits  # noqa: E402

ROUTERS = {
    "topk": dict(router="topk", k=1, capacity_factor=1.25, noise_std=0.0),
    "dropless": dict(router="topk", k=1, capacity_factor=None, noise_std=0.0),
}


def build(args):
    torch.manual_seed(args.seed)
    layer = MoEMLP(args.dim, args.hidden, args.experts, group_size=args.group_size, **ROUTERS[args.router])
    x_global = torch.randn(args.images, args.tokens, args.dim, generator=torch.Generator().manual_seed(args.seed + 1))
    return layer, x_global


def rank_step(rank, world_size, args):
    """One rank's measurements (run in each process of a W-process group, or in-process for W = 1)."""
    torch.set_num_threads(args.threads)
    layer, x_global = build(args)
    local = args.images // world_size
    x = x_global[rank * local : (rank + 1) * local].clone().requires_grad_()
    if world_size > 1:
        layer.expert_parallel_(dist.group.WORLD)
    grad = torch.randn_like(x)

    def clear():
        x.grad = None
        layer.zero_grad(set_to_none=True)

    def step():
        layer(x).backward(grad)
        if world_size > 1:
            dist.barrier()  # the step ends when every rank's is done

    seconds = timeit(step, args.warmup, args.repeat, "cpu", setup=clear)
    plan = layer.last_plan
    E, D = args.experts, args.dim
    element = x.element_size()
    S = world_size
    if plan.capacity is not None:
        rows_per_rank = E * plan.num_groups * plan.capacity  # padded rows, sent whole
    else:
        rows_per_rank = plan.num_assignments
    # Rows leaving this rank per exchange: all but its own experts' share (the padded buffer is split equally; the
    # dropless one by counts, estimated here by the same share).
    sent_rows = rows_per_rank * (S - 1) / S
    result = {
        "seconds": seconds,
        "bytes_sent_per_step": 4 * sent_rows * D * element,
        "rows_per_exchange": rows_per_rank,
    }
    if world_size > 1 and plan.capacity is not None:
        rows = torch.randn(E, plan.num_groups * plan.capacity, D)
        from torch.distributed._functional_collectives import all_to_all_single, wait_tensor

        def exchange():
            all_to_all_single(rows.reshape(-1, D), None, None, dist.group.WORLD).wait()
            dist.barrier()

        result["all_to_all_seconds"] = timeit(exchange, args.warmup, args.repeat, "cpu")

        def expert_path():
            wait_tensor(run_experts_equal_splits(layer.experts, rows, dist.group.WORLD))
            dist.barrier()

        result["expert_path_seconds"] = timeit(expert_path, args.warmup, args.repeat, "cpu")
    return result


def permute_bandwidth(args, world_size, rows_per_rank):
    """GB/s (read + write) of the copy that reorders one exchange's received rows: [S, E_loc, R, D] ->
    [E_loc, S * R, D] (a strided copy) for capacity routing; an index_select of the rows by a permutation
    (the (source, expert) -> (expert, source) reorder) for dropless routing."""
    torch.set_num_threads(args.threads)
    E, D = args.experts, args.dim
    local = E // world_size
    if args.router == "dropless":
        received = torch.randn(rows_per_rank, D)
        perm = torch.randperm(rows_per_rank)

        def copy():
            return received.index_select(0, perm)
    else:
        R = rows_per_rank // E
        received = torch.randn(world_size, local, R, D)

        def copy():
            return received.transpose(0, 1).reshape(local, world_size * R, D)

    seconds = timeit(copy, args.warmup, args.repeat, "cpu")
    return 2 * received.numel() * received.element_size() / seconds / 1e9, seconds


def benchmark(args):
    rows = []
    one = rank_step(0, 1, args)
    rows.append(
        {
            "world_size": 1,
            "images_per_rank": args.images,
            "step_ms": one["seconds"] * 1e3,
            "sent_mb_per_step_per_rank": 0.0,
            "all_to_all_ms": None,
            "permute_gb_s": None,
        }
    )
    results = run_processes(rank_step, 2, args, timeout=600)
    two = max(results, key=lambda r: r["seconds"])
    gb_s, permute_seconds = permute_bandwidth(args, 2, two["rows_per_exchange"])
    rows.append(
        {
            "world_size": 2,
            "images_per_rank": args.images // 2,
            "step_ms": two["seconds"] * 1e3,
            "sent_mb_per_step_per_rank": two["bytes_sent_per_step"] / 1e6,
            "all_to_all_ms": two.get("all_to_all_seconds", float("nan")) * 1e3 if "all_to_all_seconds" in two else None,
            "permute_gb_s": gb_s,
        }
    )
    for row in rows:
        row["step_vs_w1"] = row["step_ms"] / rows[0]["step_ms"]
    print(
        f"MoE layer step, {args.router}: B={args.images} N={args.tokens} D={args.dim} F={args.hidden} "
        f"E={args.experts} group_size={args.group_size}, {args.threads} thread(s) per process"
    )
    print(format_table(rows))
    meta = {
        "benchmark": "one MoE layer's forward + backward at W = 1 and 2 (gloo, CPU), same global batch",
        **settings(args),
        "permute_ms": permute_seconds * 1e3,
        "bytes": "sent per rank per step: 4 exchanges (2 forward, 2 backward) x rows leaving the rank x D x "
        "element size; permute GB/s counts read + write of one reorder copy",
        "permute_buffer_mb": 2 * two["rows_per_exchange"] * args.dim * 4 / 2 / 1e6,
        "permute_note": "the reorder copy of one exchange's received rows; at these sizes it runs in cache",
        "expert_path_ms_w2": two.get("expert_path_seconds", float("nan")) * 1e3,
    }
    paths = write_results(
        "expert_parallel",
        rows,
        meta,
        device="cpu",
        tag=args.tag or (None if args.router == "topk" else args.router),
        directory=args.output,
    )
    print("wrote", *paths)


# ---- the scaling model ----

MODELS = {"V-MoE-S": (384, 1536, 12), "V-MoE-B": (768, 3072, 12), "V-MoE-L": (1024, 4096, 24)}  # D, F, blocks
LINKS = {"NVLink (in node, EP=8)": (450e9, 8), "InfiniBand (across nodes, EP=32)": (50e9, 32)}


def scaling_model(args):
    """All-to-all bytes vs expert FLOPs per MoE layer and image; written as Markdown, every number computed."""
    E, cf, element = 32, 1.25, 2  # bf16
    flops = args.effective_tflops * 1e12
    rows = []
    for model, (D, F, blocks) in MODELS.items():
        moe_layers = blocks // 2  # V-MoE: every other block
        expert_params = E * (2 * D * F + F + D)  # per MoE layer
        for N in (196, 256):
            for K in (1, 2):
                rows_per_image = K * cf * N  # padded expert rows per image (capacity factor included)
                # One exchange moves every row's D values; a training step has 2 forward + 2 backward exchanges.
                bytes_full = 4 * rows_per_image * D * element
                # Expert FLOPs: 2 GEMMs of 2 D F per row forward, x3 for forward + backward.
                expert_flops = 3 * rows_per_image * 2 * (2 * D * F)
                compute_us = expert_flops / flops * 1e6
                for link, (bandwidth, S) in LINKS.items():
                    sent = bytes_full * (S - 1) / S
                    comm_us = sent / bandwidth * 1e6
                    rows.append(
                        {
                            "model": model,
                            "N": N,
                            "K": K,
                            "link": link,
                            "a2a_kb_per_image_layer": sent / 1e3,
                            "expert_mflop_per_image_layer": expert_flops / 1e6,
                            "comm_us": comm_us,
                            "expert_us": compute_us,
                            "comm_over_compute": comm_us / compute_us,
                            # Without EP every rank holds all E experts: their bf16 weights plus fp32 master weights
                            # and AdamW moments (2 + 4 + 8 = 14 bytes per parameter), over all MoE layers.
                            "expert_state_gb_ep1": 14 * expert_params * moe_layers / 1e9,
                            "expert_state_gb_ep": 14 * expert_params * moe_layers / S / 1e9,
                        }
                    )
    table = format_table(rows)
    # Break-even against data parallelism alone: its expert-gradient all-reduce moves ~2 x the expert gradients
    # (bf16) per step, however few tokens; EP moves 4 K cf T D x 2 bytes. EP sends fewer bytes while
    # T < 2 * E * 2 D F / (4 K cf D) = E F / (K cf) tokens per rank and MoE layer.
    breakeven = {f"{model}, K={K}": int(E * F / (K * cf)) for model, (D, F, _) in MODELS.items() for K in (1, 2)}
    # FLOPs per byte exchanged, independent of tokens: 12 K cf T D F / (8 K cf T D (S-1)/S) = 1.5 F S / (S - 1).
    intensity = {model: 1.5 * F for model, (_, F, _) in MODELS.items()}
    nvlink = [row for row in rows if row["link"].startswith("NVLink")]
    infiniband = [row for row in rows if row["link"].startswith("InfiniBand")]
    lines = [
        "# Expert parallelism: a scaling model for V-MoE-S/B/L with E = 32",
        "",
        (
            "Generated by `python benchmarks/bench_expert_parallel.py --scaling-model` (every number below is computed "
            "by that script; edit the script, not this file)."
        ),
        "",
        "## Model",
        "",
        (
            f"- Per MoE layer and image: N tokens, K experts per token, capacity factor {cf}, so K * {cf} * N padded "
            "expert rows of D bf16 values. A training step exchanges them four times (dispatch and return, forward and "
            "backward); a rank sends the fraction (S - 1) / S of them (the rest stays on the rank)."
        ),
        "- Expert FLOPs per row: two GEMMs of 2 D F multiply-adds forward, three times that for forward + backward.",
        (
            f"- Compute time at an effective {args.effective_tflops:g} TFLOP/s per GPU (bf16 on an H100, ~40 % of its "
            "989 TFLOP/s dense peak); links at their per-GPU bandwidth, NVLink ~450 GB/s within a node (EP = 8), "
            "InfiniBand ~50 GB/s across nodes (EP = 32, 400 Gb/s NICs, one per GPU). Latency and overlap ignored: "
            "comm_over_compute > 1 means the exchange alone takes longer than the experts it feeds."
        ),
        "- The ratio does not depend on the batch: FLOPs per byte sent = 1.5 F S / (S - 1) "
        "(" + ", ".join(f"{m}: {v:.0f}" for m, v in intensity.items()) + " FLOP/byte at large S).",
        (
            "- V-MoE places MoE layers in every other block (S, B: 6 of 12; L: 12 of 24). Expert state = bf16 "
            "weights + fp32 master weights + AdamW moments, 14 bytes per parameter, all MoE layers."
        ),
        "",
        "## Per MoE layer and image",
        "",
        table,
        "",
        "## When expert parallelism pays off",
        "",
        (
            f"- Within a node (NVLink), the all-to-all costs {min(r['comm_over_compute'] for r in nvlink):.2f}x to "
            f"{max(r['comm_over_compute'] for r in nvlink):.2f}x the expert compute it feeds (independent of K and N): "
            "small enough to pay even without overlapping it with compute (which this library does not do yet). EP = 8 "
            "within a node is the default choice."
        ),
        (
            "- Across nodes (InfiniBand), the exchange costs "
            f"{min(r['comm_over_compute'] for r in infiniband):.2f}x to "
            f"{max(r['comm_over_compute'] for r in infiniband):.2f}x the expert compute: EP across nodes makes the MoE "
            "layers communication-bound (worst for V-MoE-S, whose narrow experts do the least work per byte); span "
            "nodes with EP only when the experts' state does not fit a node's GPUs otherwise."
        ),
        "- Memory is the reason to shard at all: without EP every GPU holds all 32 experts' state, "
        + ", ".join(
            f"{row['model']}: {row['expert_state_gb_ep1']:.1f} GB"
            for row in rows
            if row["N"] == 196 and row["K"] == 1 and row["link"].startswith("NVLink")
        )
        + " ("
        + ", ".join(
            f"{row['expert_state_gb_ep1'] / 80:.0%}"
            for row in rows
            if row["N"] == 196 and row["K"] == 1 and row["link"].startswith("NVLink")
        )
        + " of an 80 GB GPU, before activations and the dense layers); with EP = 8, an eighth of that. Where the "
        "experts fit, plain DDP (expert_parallel=1) needs no all-to-all at all but all-reduces every expert "
        "gradient each step; where they take a large share of the GPU (V-MoE-L), EP is what lets the batch fit.",
        "- Bytes against plain data parallelism: DDP all-reduces ~2x the experts' bf16 gradients per step whatever "
        "the batch, EP exchanges 8 K cf T D bytes per MoE layer; EP sends fewer bytes while the tokens per rank and "
        "step stay below E F / (K cf): "
        + ", ".join(f"{k}: {v:,}" for k, v in breakeven.items())
        + " tokens (e.g. 256 images of 196 tokens are 50,176).",
    ]
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / "expert_parallel_scaling.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("wrote", path)


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, warmup=2, repeat=9, dtypes=None)
    parser.add_argument("--images", type=int, default=16, help="global batch (images), split over the ranks")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--router", default="topk", choices=sorted(ROUTERS))
    parser.add_argument(
        "--scaling-model", action="store_true", help="write expert_parallel_scaling.md (in --output) only"
    )
    parser.add_argument(
        "--effective-tflops", type=float, default=400.0, help="the scaling model's expert GEMM throughput per GPU"
    )
    return parser


def main(argv=None):
    parser = build_parser()
    args = parse_benchmark_args(parser, argv)
    # One thread per process unless told otherwise: W = 2 then uses a core per rank, as a GPU run uses a GPU per rank.
    args.threads = args.threads or 1
    if args.device != "cpu":
        parser.error("the expert-parallel benchmark runs gloo process groups on the CPU: --device cpu")
    if args.images % 2 or (args.images // 2) % args.group_size:
        parser.error("--images must split into two ranks' batches that --group-size divides")
    if args.scaling_model:
        scaling_model(args)
    else:
        benchmark(args)


if __name__ == "__main__":
    main()
