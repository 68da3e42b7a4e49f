#!/usr/bin/env python
"""TGR-MoE's routing-distillation loss, forward and forward + backward: the fused operator against PyTorch.

Implementations (all compute the mean over T tokens of KL(p_teacher || softmax(student_logits)) over E):
  visionmoe  ``visionmoe.ops.teacher_routing_loss``: one pass per token row in the forward (row maximum,
             log-sum-exp, KL sum), one in the backward, which recomputes the softmaxes from the inputs and the
             per-token log-sum-exps; autograd saves nothing of size [T, E] beyond the inputs.
  reference  ``visionmoe.reference.teacher_routing_loss``: ``log_softmax`` of the student's logits,
             ``kl_div(reduction="none")`` summed over E (with ``log_softmax`` of the teacher and
             ``log_target=True`` for teacher logits), then the mean, under plain autograd.
  kl_div     the one-line PyTorch idiom, ``F.kl_div(F.log_softmax(s, -1), p, reduction="batchmean")`` (for
             teacher logits ``F.kl_div(F.log_softmax(s, -1), F.log_softmax(a, -1), reduction="batchmean",
             log_target=True)``), the same value.

For each E and teacher format, two steps are timed: the forward alone (autograd recording, as in training) and
forward + backward (``loss.backward()``; the teacher needs no gradient). The implementations are timed in turn
for several rounds and each one's median over the rounds reported (see benchmarks/common.py). Before timing,
each implementation's loss and gradient are checked against the float64 reference, so that a wrong result is
never timed. ``ns_per_entry`` = forward + backward median / (T * E); ``saved_mb`` is what autograd keeps for
the backward (the distinct storages), ``beyond_inputs_mb`` the same without the storages of the student's logits
and the teacher, which the caller holds anyway; ``peak_mb`` is the peak memory the forward + backward step
allocates beyond its inputs (``common.allocated_peak_bytes``).

Usage:
  python benchmarks/bench_teacher_routing.py                   # CPU, T=16384, E in 8 32 128, both formats
  python benchmarks/bench_teacher_routing.py --threads 1 --tag threads1
  python benchmarks/bench_teacher_routing.py --device cuda --dtype bfloat16
Results: benchmarks/results/teacher_routing_<device>[_<tag>].json and .md.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
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

# Agreement with the float64 reference that a correct implementation reaches at these sizes: the loss is a mean
# of values of order one, the gradient entries are of order 1 / T.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-3, rtol=2e-2),
    torch.float16: dict(atol=1e-4, rtol=5e-3),
}


def kl_div_batchmean(student_logits, teacher, reduction="mean", teacher_format="probabilities"):
    log_student = F.log_softmax(student_logits, dim=-1)
    if teacher_format == "logits":
        return F.kl_div(log_student, F.log_softmax(teacher, dim=-1), reduction="batchmean", log_target=True)
    return F.kl_div(log_student, teacher, reduction="batchmean")


IMPLEMENTATIONS = {
    "visionmoe": ops.teacher_routing_loss,
    "reference": reference.teacher_routing_loss,
    "kl_div": kl_div_batchmean,
}


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, warmup=3, repeat=20, rounds=3)
    parser.add_argument("--tokens", type=int, default=16384, help="T (default 16384)")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128], help="E values (default 8 32 128)")
    parser.add_argument(
        "--formats",
        nargs="+",
        choices=ops.TEACHER_FORMATS,
        default=list(ops.TEACHER_FORMATS),
        help="teacher formats (default both)",
    )
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_benchmark_args(parser, argv)
    if args.tokens < 1 or min(args.experts) < 1:
        parser.error("--tokens and --experts must be >= 1")
    return args


def make_inputs(T: int, E: int, teacher_format: str, dtype: torch.dtype, device: torch.device, seed: int):
    """Student logits (2 * standard normal) and the teacher: logits (standard normal) or their softmax."""
    generator = torch.Generator().manual_seed(seed)
    student_logits = (2 * torch.randn(T, E, generator=generator)).to(device, dtype).requires_grad_()
    teacher_logits = torch.randn(T, E, generator=generator)
    teacher = teacher_logits if teacher_format == "logits" else teacher_logits.softmax(dim=-1)
    return student_logits, teacher.to(device, dtype)


def check_against_float64(name: str, loss_fn, student_logits, teacher, teacher_format: str) -> None:
    """Aborts the benchmark when an implementation's loss or gradient differs from the float64 reference's: its
    timings would be meaningless."""
    results = []
    for function, (s, p) in (
        (loss_fn, (student_logits, teacher)),
        (reference.teacher_routing_loss, (student_logits.double(), teacher.double())),
    ):
        leaf = s.detach().clone().requires_grad_()
        loss = function(leaf, p, "mean", teacher_format)
        loss.backward()
        results.append({"loss": loss.detach().double(), "student_logits.grad": leaf.grad.double()})
    abort_unless_close(name, *results, "the float64 reference", **TOLERANCES[student_logits.dtype])


def run_config(args, device, dtype, E: int, teacher_format: str) -> list[dict]:
    T = args.tokens
    student_logits, teacher = make_inputs(T, E, teacher_format, dtype, device, args.seed)

    def clear_grad():
        """So that each backward writes the gradient instead of adding to the previous one."""
        student_logits.grad = None

    forwards, steps = {}, {}
    for name, loss_fn in IMPLEMENTATIONS.items():
        check_against_float64(name, loss_fn, student_logits, teacher, teacher_format)

        def forward(loss_fn=loss_fn):
            return loss_fn(student_logits, teacher, "mean", teacher_format)

        def forward_backward(forward=forward):
            forward().backward()

        forwards[f"{name} forward"] = forward
        steps[name] = forward_backward
    seconds = timeit_rounds({**forwards, **steps}, args.warmup, args.repeat, args.rounds, device, clear_grad)

    rows = []
    for name in IMPLEMENTATIONS:
        storages = saved_storages(forwards[f"{name} forward"])
        inputs = {student_logits.untyped_storage().data_ptr(), teacher.untyped_storage().data_ptr()}
        saved_bytes = sum(storages.values())
        beyond_inputs_bytes = sum(nbytes for pointer, nbytes in storages.items() if pointer not in inputs)
        clear_grad()
        peak = allocated_peak_bytes(steps[name], device)
        rows.append(
            {
                "teacher": teacher_format,
                "experts": E,
                "implementation": name,
                "forward_ms": seconds[f"{name} forward"] * 1e3,
                "forward_backward_ms": seconds[name] * 1e3,
                "visionmoe_speedup": seconds[name] / seconds["visionmoe"],
                "ns_per_entry": seconds[name] * 1e9 / (T * E),
                "saved_mb": saved_bytes / 1e6,
                "beyond_inputs_mb": beyond_inputs_bytes / 1e6,
                "peak_mb": peak / 1e6,
            }
        )
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = apply_benchmark_args(args)
    print(
        f"teacher_routing_loss (mean), forward and forward + backward: T={args.tokens} E={args.experts} "
        f"teacher {args.formats} {args.dtype} on {device}, {torch.get_num_threads()} CPU threads"
    )
    rows = []
    for teacher_format in args.formats:
        for E in args.experts:
            rows += run_config(args, device, dtype, E, teacher_format)
            print(format_table(rows[-len(IMPLEMENTATIONS) :]), flush=True)

    print()
    print(format_table(rows))
    print(
        "visionmoe_speedup = implementation's forward + backward median / visionmoe's; "
        "ns_per_entry = forward + backward median / (T * E); saved_mb = storages autograd keeps for the backward, "
        "beyond_inputs_mb = the same without the inputs' storages"
    )
    meta = {
        "benchmark": "teacher_routing_loss (reduction mean), forward and forward + backward",
        "device": str(device),
        "dtype": args.dtype,
        "tokens": args.tokens,
        "experts": args.experts,
        "teacher_formats": args.formats,
        "inputs": "student logits 2 * standard normal; teacher logits standard normal, probabilities their softmax",
        "memory": "saved_mb: distinct storages saved by autograd (saved_tensors_hooks); beyond_inputs_mb: without "
        "the student's logits and the teacher; peak_mb: peak allocated during a step beyond what was "
        "allocated before it",
        "warmup": args.warmup,
        "repeat": args.repeat,
        "rounds": args.rounds,
        "seed": args.seed,
        # Other work on a shared machine inflates the medians: the system load over 1, 5 and 15 minutes at the end.
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }
    paths = write_results("teacher_routing", rows, meta, device=device, tag=args.tag, directory=args.output)
    print("\nwrote " + ", ".join(str(path) for path in paths))


if __name__ == "__main__":
    main()
