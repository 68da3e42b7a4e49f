"""A What-Where Transformer's training step with the fused what-where attention against the same model with the
eager einsum/softmax formulation: time and peak allocated memory, in one run.

``bench_whatwhere.py`` measures the attention operator alone; this measures what it changes in a model. The
eager side is the same model, weights and batch, with ``visionmoe.ops.whatwhere_attention`` replaced by
``visionmoe.reference.whatwhere_attention`` while its steps run. A step is forward, cross-entropy and backward
into the parameters' gradients (cleared before each step). Before timing, both sides' losses and gradients are
checked to agree. ``allocated_peak_mb`` is the peak the step allocates through PyTorch's allocator beyond what
was allocated before it (``common.allocated_peak_bytes``); ``saved_mb`` what autograd keeps from the forward for
the backward (the distinct storages, parameters included).

Usage:
  python benchmarks/bench_wwt_model.py                      # CPU: wwt_small (224 px, 6 heads, N=196, S=16), B=8
  python benchmarks/bench_wwt_model.py --model wwt_tiny_32 --batch 128
  python benchmarks/bench_wwt_model.py --device cuda --batch 64
Results: benchmarks/results/wwt_model_<device>[_<tag>].json and .md.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    allocated_peak_bytes,
    apply_benchmark_args,
    benchmark_parser,
    format_table,
    parse_benchmark_args,
    saved_storages,
    settings,
    timeit_rounds,
    write_results,
)

import visionmoe  # noqa: E402
from visionmoe import ops, reference  # noqa: E402

ATTENTION = {
    "visionmoe": nullcontext,
    "eager": lambda: mock.patch.object(ops, "whatwhere_attention", reference.whatwhere_attention),
}


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, warmup=1, repeat=3, rounds=3, dtypes=None)
    parser.add_argument("--model", default="wwt_small", help="a registered What-Where Transformer (default wwt_small)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=100)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_benchmark_args(parser, argv)
    if not args.model.startswith("wwt"):
        parser.error(f"--model must be a What-Where Transformer (wwt_*), got {args.model!r}")
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device, _ = apply_benchmark_args(args)
    torch.manual_seed(args.seed)
    model = visionmoe.models.create_model(args.model, num_classes=args.num_classes).to(device)
    images = torch.randn(args.batch, model.patch_embed.in_chans, model.img_size, model.img_size, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device)

    def forward(attention):
        with ATTENTION[attention]():
            return F.cross_entropy(model(images), labels)

    def clear():
        model.zero_grad(set_to_none=True)

    def gradients(attention):
        clear()
        loss = forward(attention)
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters()]

    for fused, eager in zip(gradients("visionmoe"), gradients("eager")):
        torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-3)

    steps = {attention: (lambda attention=attention: forward(attention).backward()) for attention in ATTENTION}
    seconds = timeit_rounds(steps, args.warmup, args.repeat, args.rounds, device, setup=clear)
    rows = []
    for attention in ATTENTION:
        saved = saved_storages(lambda: forward(attention))
        clear()
        rows.append(
            {
                "attention": attention,
                "median_ms": seconds[attention] * 1e3,
                "allocated_peak_mb": allocated_peak_bytes(steps[attention], device) / 2**20,
                "saved_mb": sum(saved.values()) / 2**20,
            }
        )
    eager = rows[-1]
    for row in rows:
        row["time_vs_eager"] = row["median_ms"] / eager["median_ms"]
        row["allocated_vs_eager"] = row["allocated_peak_mb"] / eager["allocated_peak_mb"]
    blocks = len(model.blocks)
    print(
        f"{args.model} training step: B={args.batch}, {blocks} blocks, {model.img_size} px, on {device}, "
        f"{torch.get_num_threads()} threads"
    )
    print(format_table(rows))
    meta = {
        "benchmark": "What-Where Transformer training step, fused what-where attention against eager",
        **settings(args),
        "blocks": blocks,
        "num_slots": model.num_slots,
        "num_heads": model.num_heads,
    }
    paths = write_results("wwt_model", rows, meta, device=device, tag=args.tag, directory=args.output)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
