"""MoE MLP layer, forward + backward, against its peers: visionmoe's MoEMLP (capacity and dropless) and every
MoE library installed in the environment, with the dense MLP of the same active FLOPs, the Python expert loop and
the one-hot einsum (GShard) layer as yardsticks; time (interleaved rounds, minimum and median) and allocated peak
memory, in one run, for each K of ``--topk``.

Every row runs the same layer configuration: T tokens (one group), D -> F -> D experts, E experts, top-K token
choice, fp32, forward and backward with the same output gradient. Rows are labelled with their semantics and
compared like with like:

- ``capacity``: each expert keeps at most C = ceil(K T cf / E) assignments (cf = ``--capacity-factor``), the rest
  are dropped (zeros); the expert FLOPs are those of E C rows, kept or padding.
- ``dropless``: every assignment is computed (K T rows); DeepSpeed's dropless mode pads every expert to the
  largest expert's load instead, and says so in its row.
- ``dense``: one MLP D -> K F -> D on every token, the FLOPs of the K T kept rows with no routing at all: the
  ratio ``time_vs_dense`` is what the MoE layers are judged by.

The experts are GELU MLPs (w1, b1, GELU, w2, b2) wherever the peer takes an expert module or activation; a peer
that forces a gated activation runs GEGLU with hidden width 2F/3 (the same FLOPs: three D x 2F/3 matrices for two
D x F ones) and its row says so. Rows built on visionmoe's router and weights (the expert loop, the einsum, torch's
``F.grouped_mm``, Hugging Face's experts) are checked against visionmoe's output before they are timed (the
``check`` column); peers with their own router (DeepSpeed, st-moe-pytorch, Hugging Face's whole MoE blocks)
route the same configuration with their own gate, so their outputs differ, not their shapes of work. The expert
biases of the shared visionmoe layers are zero (Hugging Face's experts have none), which changes no timing.

Rows (skipped with a note in their row when the peer is absent, fails to import or does not support the setting):

- ``dense``; ``visionmoe`` capacity and dropless (``MoEMLP``, router "topk"); ``expert_loop`` (dropless, a Python
  loop over experts as Hugging Face's eager experts); ``einsum`` (capacity, one-hot dispatch/combine tensors);
  ``torch grouped_mm`` (dropless: sort by expert, ``F.grouped_mm`` per layer, ``index_add_`` combine).
- Hugging Face transformers: the non-gated experts module of NemotronH (GELU, no biases) with the ``eager`` and
  ``grouped_mm`` experts implementations, fed visionmoe's top-K; Mixtral's sparse MoE block (its own router,
  GEGLU 2F/3), eager and grouped_mm; SwitchTransformers' sparse MLP (capacity, top-1 only, GELU).
- DeepSpeed ``deepspeed.moe.layer.MoE`` (top-K gate, capacity with ``drop_tokens=True``, padded-to-max dropless
  with ``drop_tokens=False``; no random token selection, no sampled 2nd expert; a single-process gloo group).
- Tutel ``tutel.moe.moe_layer`` (capacity; with ``capacity_factor=0``, no drops, every expert padded to the
  largest load).
- lucidrains' st-moe-pytorch ``MoE`` (capacity, top-n >= 2 only; its capacity is T cf / E for all n choices, so
  it is given K cf; its 2nd-expert threshold routing is turned off so that every token goes to K experts).

Installing the peers (optional benchmark dependencies, never visionmoe's runtime ones; keep pip away from torch):
  pip install --no-deps -r benchmarks/requirements-peers.txt
lists the peers and the pure-Python packages they import; DeepSpeed with ``DS_BUILD_OPS=0`` (no compiled ops).
Tutel is not on PyPI: ``pip install --no-deps git+https://github.com/microsoft/tutel`` where GitHub is reachable.

Memory: ``allocated_peak_mb``, the peak of the bytes a step holds allocated through PyTorch's allocator beyond
what was allocated before it (``common.allocated_peak_bytes``), one step per implementation.

Usage:
  python benchmarks/bench_peers.py                         # CPU: T=8192, D=384, F=1536, E=16, K=1 and 2, cf 1.25
  python benchmarks/bench_peers.py --topk 2 --rounds 5 --tag k2
Results: benchmarks/results/peers_<device>[_<tag>].json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import math
import os
import statistics
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe_layer import route, run_einsum, run_expert_loop  # noqa: E402
from common import (  # noqa: E402
    allocated_peak_bytes,
    apply_benchmark_args,
    benchmark_parser,
    format_table,
    parse_benchmark_args,
    settings,
    timeit,
    timeit_round_samples,
    write_results,
)

from visionmoe.layers import MoEMLP  # noqa: E402

# The distributions whose versions go into the results' meta (absent ones as None).
PEER_DISTRIBUTIONS = ("transformers", "deepspeed", "tutel", "st-moe-pytorch")


# Set when this benchmark made the default process group (for DeepSpeed), which main() destroys at its end.
CREATED_PROCESS_GROUP: list = []


class Skip(Exception):
    """A peer that cannot run here (absent, failed import, setting not supported): a row with a note."""


def peer_versions() -> dict:
    versions = {"torch": torch.__version__}
    for name in PEER_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def import_peer(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as error:
        raise Skip(f"not installed ({error})") from error
    except Exception as error:  # a peer that is installed but broken here
        raise Skip(f"import failed: {type(error).__name__}: {error}") from error


def gelu_mlp(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Impl:
    """One row: ``forward(x [1, T, D]) -> [.., D]`` and the modules whose gradients a step writes."""

    def __init__(self, forward: Callable, modules: list, note: str = "", check: str = "own router"):
        self.forward, self.modules, self.note, self.check = forward, modules, note, check


# ---- builders: (args, k, shared) -> Impl; shared holds the visionmoe layers the in-house rows reuse ----


def build_dense(args, k, shared):
    mlp = gelu_mlp(args.dim, k * args.hidden).to(**shared["to"])
    return Impl(mlp, [mlp], f"D -> {k}F -> D", check="-")


def build_visionmoe(args, k, shared, semantics):
    layer = shared[semantics]
    return Impl(layer, [layer], check="-")


def build_expert_loop(args, k, shared):
    layer = shared["dropless"]
    return Impl(lambda x: run_expert_loop(layer, x), [layer], check="dropless")


def build_einsum(args, k, shared):
    layer = shared["capacity"]
    return Impl(lambda x: run_einsum(layer, x), [layer], "[T, E, C] one-hot dispatch and combine", check="capacity")


def sorted_assignments(layer, tokens):
    """visionmoe's top-K (softmax probabilities, not renormalised) sorted by expert: (token of each row, weight of
    each row, expert of each row, int32 end offset of each expert's rows)."""
    _, (top_probs, top_experts) = route(layer, tokens)
    experts, order = top_experts.reshape(-1).sort(stable=True)
    token_index = order // layer.router.k
    counts = torch.bincount(experts, minlength=layer.num_experts)
    return token_index, top_probs.reshape(-1)[order], experts, counts.cumsum(0).to(torch.int32)


def build_grouped_mm(args, k, shared):
    if not hasattr(F, "grouped_mm"):
        raise Skip(f"torch {torch.__version__} has no F.grouped_mm")
    layer = shared["dropless"]
    experts = layer.experts

    def forward(x):
        tokens = x.reshape(-1, x.shape[-1])
        token_index, weight, expert_of_row, offsets = sorted_assignments(layer, tokens)
        hidden = F.grouped_mm(tokens[token_index], experts.w1, offs=offsets) + experts.b1[expert_of_row]
        rows = F.grouped_mm(F.gelu(hidden), experts.w2, offs=offsets) + experts.b2[expert_of_row]
        return torch.zeros_like(tokens).index_add_(0, token_index, rows * weight.unsqueeze(-1)).view_as(x)

    return Impl(forward, [layer], "sort by expert, F.grouped_mm, index_add_", check="dropless")


def build_hf_experts(args, k, shared, implementation):
    import_peer("transformers")
    try:
        from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
    except ImportError as error:
        raise Skip(f"this transformers has no NemotronH experts: {error}") from error
    layer = shared["dropless"]
    config = NemotronHConfig(
        hidden_size=args.dim,
        moe_intermediate_size=args.hidden,
        n_routed_experts=args.experts,
        mlp_hidden_act="gelu",
        moe_latent_size=None,
    )
    config._experts_implementation = implementation
    hf = NemotronHExperts(config).to(**shared["to"])
    with torch.no_grad():  # visionmoe's weights (w1 [E, D, F], w2 [E, F, D]) in Hugging Face's [E, out, in]
        hf.up_proj.copy_(layer.experts.w1.transpose(1, 2))
        hf.down_proj.copy_(layer.experts.w2.transpose(1, 2))

    def forward(x):
        tokens = x.reshape(-1, x.shape[-1])
        _, (top_probs, top_experts) = route(layer, tokens)
        return hf(tokens, top_experts, top_probs).view_as(x)

    return Impl(
        forward,
        [layer, hf],
        f"NemotronHExperts (GELU, no biases), visionmoe's top-K, experts_implementation={implementation}",
        check="dropless",
    )


def build_hf_mixtral(args, k, shared, implementation):
    import_peer("transformers")
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as error:
        raise Skip(f"this transformers has no Mixtral block: {error}") from error
    if (2 * args.hidden) % 3:
        raise Skip(f"GEGLU of equal FLOPs needs 2F/3 whole; F={args.hidden}")
    config = MixtralConfig(
        hidden_size=args.dim,
        intermediate_size=2 * args.hidden // 3,
        num_local_experts=args.experts,
        num_experts_per_tok=k,
        hidden_act="gelu",
        router_jitter_noise=0.0,
    )
    config._experts_implementation = implementation
    torch.manual_seed(args.seed)
    block = MixtralSparseMoeBlock(config).to(**shared["to"])
    with torch.no_grad():  # from_config would initialise them; a bare module leaves torch.empty
        for parameter in block.parameters():
            nn.init.normal_(parameter, std=0.02)

    def forward(x):
        out = block(x)
        return out[0] if isinstance(out, tuple) else out

    return Impl(
        forward,
        [block],
        f"MixtralSparseMoeBlock, own router, GEGLU F'=2F/3 (FLOP-equal), experts_implementation={implementation}",
    )


def build_hf_switch(args, k, shared):
    import_peer("transformers")
    if k != 1:
        raise Skip("SwitchTransformers routes top-1 only")
    try:
        from transformers import SwitchTransformersConfig
        from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP
    except ImportError as error:
        raise Skip(f"this transformers has no SwitchTransformers: {error}") from error
    capacity = math.ceil(k * args.tokens * args.capacity_factor / args.experts)
    config = SwitchTransformersConfig(
        d_model=args.dim,
        d_ff=args.hidden,
        num_experts=args.experts,
        expert_capacity=capacity,
        router_jitter_noise=0.0,
        dropout_rate=0.0,
        dense_act_fn="gelu",
        router_dtype="float32",
    )
    torch.manual_seed(args.seed)
    block = SwitchTransformersSparseMLP(config).to(**shared["to"])
    with torch.no_grad():
        for parameter in block.parameters():
            nn.init.normal_(parameter, std=0.02)
    return Impl(block, [block], f"SwitchTransformersSparseMLP, own router, GELU, no biases, C={capacity}")


def distributed_world_of_one():
    """A single-process gloo group, which DeepSpeed's MoE layer asks for (expert-parallel groups of size 1), and
    DeepSpeed's communication layer on it."""
    if not torch.distributed.is_available():
        raise Skip("torch.distributed is not available")
    if not torch.distributed.is_initialized():
        store = torch.distributed.FileStore(tempfile.mktemp(prefix="bench_peers_store_"), 1)
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
        CREATED_PROCESS_GROUP.append(True)
    comm = import_peer("deepspeed.comm")
    if not comm.is_initialized():
        for variable, value in (
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29599"),
        ):
            os.environ.setdefault(variable, value)
        comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


def build_deepspeed(args, k, shared, drop_tokens):
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if shared["to"]["device"].type == "cpu" else "cuda")
    with contextlib.redirect_stdout(io.StringIO()):
        moe_layer = import_peer("deepspeed.moe.layer")
        distributed_world_of_one()
        torch.manual_seed(args.seed)
        layer = moe_layer.MoE(
            args.dim,
            gelu_mlp(args.dim, args.hidden),
            num_experts=args.experts,
            ep_size=1,
            k=k,
            capacity_factor=args.capacity_factor,
            eval_capacity_factor=args.capacity_factor,
            min_capacity=0,
            drop_tokens=drop_tokens,
            use_rts=False,
            noisy_gate_policy=None,
            top2_2nd_expert_sampling=False,
        ).to(**shared["to"])
        layer.set_deepspeed_parallelism()
    return Impl(
        lambda x: layer(x)[0],
        [layer],
        "MoE, own top-K gate, GELU experts" + ("" if drop_tokens else ", every expert padded to the largest load"),
    )


def build_tutel(args, k, shared, dropless):
    try:
        moe = import_peer("tutel.moe")
    except Skip as skip:
        raise Skip(f"{skip}; Tutel is not on PyPI, see benchmarks/requirements-peers.txt") from skip
    torch.manual_seed(args.seed)
    layer = moe.moe_layer(
        gate_type={"type": "top", "k": k, "capacity_factor": 0.0 if dropless else args.capacity_factor},
        model_dim=args.dim,
        experts={
            "type": "ffn",
            "count_per_node": args.experts,
            "hidden_size_per_expert": args.hidden,
            "activation_fn": F.gelu,
        },
        scan_expert_func=None,
    ).to(**shared["to"])
    return Impl(layer, [layer], "moe_layer, own top-K gate, GELU experts")


def build_st_moe(args, k, shared):
    st_moe = import_peer("st_moe_pytorch")
    if k < 2:
        raise Skip("st-moe-pytorch's gate takes top-n >= 2 only")
    torch.manual_seed(args.seed)
    experts = nn.ModuleList(gelu_mlp(args.dim, args.hidden) for _ in range(args.experts))
    layer = st_moe.MoE(
        args.dim,
        num_experts=args.experts,
        gating_top_n=k,
        threshold_train=1e-9,
        threshold_eval=1e-9,
        capacity_factor_train=k * args.capacity_factor,
        capacity_factor_eval=k * args.capacity_factor,
        experts=experts,
        is_distributed=False,
    ).to(**shared["to"])
    return Impl(
        lambda x: layer(x)[0],
        [layer],
        "MoE, own top-n gate (2nd-expert threshold off), GELU experts, dispatch/combine einsum",
    )


# (name, semantics, peer, builder(args, k, shared)); the first row is the yardstick.
IMPLEMENTATIONS = [
    ("dense", "dense", "-", build_dense),
    ("visionmoe", "capacity", "visionmoe", lambda a, k, s: build_visionmoe(a, k, s, "capacity")),
    ("visionmoe", "dropless", "visionmoe", lambda a, k, s: build_visionmoe(a, k, s, "dropless")),
    ("expert_loop", "dropless", "-", build_expert_loop),
    ("einsum", "capacity", "-", build_einsum),
    ("torch grouped_mm", "dropless", "torch", build_grouped_mm),
    ("hf experts eager", "dropless", "transformers", lambda a, k, s: build_hf_experts(a, k, s, "eager")),
    ("hf experts grouped_mm", "dropless", "transformers", lambda a, k, s: build_hf_experts(a, k, s, "grouped_mm")),
    ("hf mixtral eager", "dropless", "transformers", lambda a, k, s: build_hf_mixtral(a, k, s, "eager")),
    ("hf mixtral grouped_mm", "dropless", "transformers", lambda a, k, s: build_hf_mixtral(a, k, s, "grouped_mm")),
    ("hf switch", "capacity", "transformers", build_hf_switch),
    ("deepspeed", "capacity", "deepspeed", lambda a, k, s: build_deepspeed(a, k, s, True)),
    ("deepspeed", "dropless (padded)", "deepspeed", lambda a, k, s: build_deepspeed(a, k, s, False)),
    ("tutel", "capacity", "tutel", lambda a, k, s: build_tutel(a, k, s, False)),
    ("tutel", "dropless (padded)", "tutel", lambda a, k, s: build_tutel(a, k, s, True)),
    ("st-moe-pytorch", "capacity", "st-moe-pytorch", build_st_moe),
]


def shared_layers(args, k, device, dtype) -> dict:
    """visionmoe's capacity and dropless layers with the same weights (expert biases zero)."""
    torch.manual_seed(args.seed)
    capacity = (
        MoEMLP(args.dim, args.hidden, args.experts, "topk", k=k, capacity_factor=args.capacity_factor, noise_std=0.0)
        .to(device=device, dtype=dtype)
        .train()
    )
    dropless = (
        MoEMLP(args.dim, args.hidden, args.experts, "topk", k=k, capacity_factor=None, noise_std=0.0)
        .to(device=device, dtype=dtype)
        .train()
    )
    with torch.no_grad():
        capacity.experts.b1.zero_()
        capacity.experts.b2.zero_()
    dropless.load_state_dict(capacity.state_dict())
    return {"capacity": capacity, "dropless": dropless, "to": {"device": device, "dtype": dtype}}


def selected(args, name, peer) -> bool:
    return args.only is None or name in args.only or peer in args.only


def run_k(args, k, device, dtype) -> list[dict]:
    shared = shared_layers(args, k, device, dtype)
    torch.manual_seed(args.seed + 1)
    x = torch.randn(1, args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    with torch.no_grad():
        expected = {"capacity": shared["capacity"](x), "dropless": shared["dropless"](x)}

    rows, impls = [], {}
    for name, semantics, peer, builder in IMPLEMENTATIONS:
        if not selected(args, name, peer) and name != "dense":
            continue
        row = {"K": k, "implementation": name, "semantics": semantics, "peer": peer}
        rows.append(row)
        try:
            impl = builder(args, k, shared)
            with torch.no_grad():
                out = impl.forward(x)
            if impl.check in expected:
                try:
                    torch.testing.assert_close(out.reshape(x.shape), expected[impl.check], atol=1e-4, rtol=1e-4)
                except AssertionError as error:
                    message = " ".join(str(error).split())
                    raise Skip(f"output differs from visionmoe {impl.check}: {message}") from error
            impls[len(rows) - 1] = impl
            row["note"] = impl.note
            row["check"] = f"= visionmoe {impl.check}" if impl.check in expected else impl.check
        except Skip as skip:
            row["note"], row["check"] = f"skipped: {skip}", "-"
        except Exception as error:  # a peer that fails at this setting: a note, never the end of the benchmark
            message = " ".join(f"{type(error).__name__}: {error}".split())
            row["note"], row["check"] = f"skipped: {message[:300]}", "-"
            if args.verbose:
                traceback.print_exc()
        print(f"K={k} {name} [{semantics}]: {row['note'] or 'ok'}", flush=True)

    def step_of(impl):
        def step():
            impl.forward(x).reshape(x.shape).backward(grad)

        return step

    def clear():
        x.grad = None
        for impl in impls.values():
            for module in impl.modules:
                module.zero_grad(set_to_none=True)

    steps = {index: step_of(impl) for index, impl in impls.items()}
    for step in steps.values():  # warm every implementation up once before the rounds
        timeit(step, args.warmup, 1, device, setup=clear)
    samples = timeit_round_samples(steps, 0, args.repeat, args.rounds, device, setup=clear)
    for index, row in enumerate(rows):
        if index in impls:
            clear()
            row["min_ms"] = min(samples[index]) * 1e3
            row["median_ms"] = statistics.median(samples[index]) * 1e3
            row["allocated_peak_mb"] = allocated_peak_bytes(steps[index], device) / 2**20
        else:
            row["min_ms"] = row["median_ms"] = row["allocated_peak_mb"] = None
    clear()
    dense = rows[0]
    for row in rows:
        for column, ratio in (
            ("min_ms", "min_vs_dense"),
            ("median_ms", "median_vs_dense"),
            ("allocated_peak_mb", "allocated_vs_dense"),
        ):
            row[ratio] = None if row[column] is None or not dense[column] else row[column] / dense[column]
    # Like with like: each row's time against visionmoe's row of the same semantics (DeepSpeed's padded dropless
    # against visionmoe's dropless).
    ours = {row["semantics"]: row for row in rows if row["implementation"] == "visionmoe"}
    for row in rows:
        same = ours.get(row["semantics"].split(" ")[0])
        row["min_vs_visionmoe"] = (
            None if same is None or row["min_ms"] is None or not same["min_ms"] else row["min_ms"] / same["min_ms"]
        )
    order = [
        "K",
        "implementation",
        "semantics",
        "peer",
        "min_ms",
        "median_ms",
        "min_vs_dense",
        "median_vs_dense",
        "min_vs_visionmoe",
        "allocated_peak_mb",
        "allocated_vs_dense",
        "check",
        "note",
    ]
    return [{column: row[column] for column in order} for row in rows]


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, warmup=1, repeat=1, rounds=7)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--only", nargs="+", help="implementation or peer names to run (dense always runs)")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a peer that fails")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parse_benchmark_args(parser, argv)
    if any(k < 1 or k > args.experts for k in args.topk):
        parser.error("--topk must be in [1, experts]")
    if args.capacity_factor <= 0:
        parser.error("--capacity-factor must be > 0")
    device, dtype = apply_benchmark_args(args)
    print(
        f"MoE MLP forward + backward against peers: T={args.tokens} D={args.dim} F={args.hidden} "
        f"E={args.experts} cf={args.capacity_factor} {args.dtype} on {device}"
    )
    rows = []
    try:
        for k in args.topk:
            rows += run_k(args, k, device, dtype)
            print(format_table([row for row in rows if row["K"] == k]), flush=True)
    finally:
        if CREATED_PROCESS_GROUP:
            torch.distributed.destroy_process_group()
            CREATED_PROCESS_GROUP.clear()
    meta = {
        "benchmark": "MoE MLP forward + backward: visionmoe against the installed MoE peers, dense, expert loop "
        "and one-hot einsum",
        **settings(args),
        "peer_versions": peer_versions(),
        "timing": "each round times every implementation once in turn (after one warm-up pass); min and "
        "median over the rounds",
        "memory": "allocated: peak bytes allocated through PyTorch's allocator during one step",
    }
    paths = write_results("peers", rows, meta, device=device, tag=args.tag, directory=args.output)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
