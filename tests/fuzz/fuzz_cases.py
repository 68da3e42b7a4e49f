"""Seeded fuzz cases for every operator family of visionmoe, each judged "clear error or agreement with the
reference".

A case is drawn from ``(family, seed, index)`` alone: :func:`draw` returns its spec, a JSON-able dict that says
everything about the call (sizes, dtype, memory layouts, devices, special values, the defect injected), and
:func:`run` rebuilds the tensors from the spec and calls the operator. What a case expects:

- ``agree``: a valid input; the operator must return what the float64 reference returns (values and gradients).
- ``either``: an edge case (an empty size, NaN or infinity) that the operator may reject with a clear error or
  must otherwise compute as the reference does (NaN where the reference has NaN).
- ``reject``: an invalid input (a mixed or meta device, an out-of-range index, a wrong dtype, rank or shape, a
  bad option); the operator must raise a clear error.
- ``meta``: every input on the meta device; the operator must give the outputs the CPU gives, in shape and dtype,
  or the error the CPU gives.
- ``no_crash``: an internally inconsistent plan handed to the raw operators, which document that they trust their
  plan; a clear error or any result is fine, a crash or an out-of-bounds access is not.

A clear error is a ``RuntimeError``, ``ValueError``, ``TypeError`` or ``IndexError`` whose message names the
operator or one of its arguments. Crashes are caught by the runner (``fuzz_runner.py``), which runs cases in a
worker process.
"""

from __future__ import annotations

import json
import random
from typing import Callable, Dict, List, Optional, Sequence

import torch

from visionmoe import ops, reference

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (rtol, atol) of an operator's result against the float64 reference on the same (rounded) inputs.
TOLERANCES = {"float64": (1e-7, 1e-9), "float32": (1e-4, 1e-4), "float16": (2e-2, 2e-2), "bfloat16": (6e-2, 6e-2)}
CLEAR_ERROR_TYPES = (RuntimeError, ValueError, TypeError, IndexError)
# Outcomes that fail the suite.
FAILURES = ("crash", "hang", "wrong", "accepted_bad_input", "false_reject", "unclear_error", "meta_mismatch")


# ---- tensors with a chosen memory layout and device ----


def relayout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: ``contiguous``; ``strided`` (every other element of a larger
    buffer, last dimension); ``column`` (a column of a wider buffer, so every stride is larger than its size);
    ``offset`` (a view starting inside a larger buffer); ``transposed`` (last two dimensions swapped in memory);
    ``expanded`` (stride 0 along dimension 0, valid only when all rows are equal, which the drawer ensures)."""
    if layout == "contiguous" or tensor.dim() == 0:
        return tensor
    if layout == "strided":
        buffer = tensor.new_zeros(tensor.shape[:-1] + (2 * tensor.shape[-1],))
        view = buffer[..., ::2]
    elif layout == "column":
        buffer = tensor.new_zeros(tensor.shape + (3,))
        view = buffer[..., 1]
    elif layout == "offset":
        buffer = tensor.new_zeros((tensor.numel() + 5,))
        view = buffer[5:].view(tensor.shape)
    elif layout == "transposed":
        if tensor.dim() < 2:
            return relayout(tensor, "strided")
        return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "expanded":
        if tensor.shape[0] == 0:
            return tensor
        return tensor[:1].expand(tensor.shape)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    view.copy_(tensor)
    return view


def on_device(tensor: torch.Tensor, device: str) -> torch.Tensor:
    return tensor.to("meta") if device == "meta" else tensor.to(device)


def _generator(spec: dict) -> torch.Generator:
    return torch.Generator().manual_seed(spec["seed"])


def _floats(spec: dict, shape: Sequence[int], generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * scale


def _special(values: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Puts a NaN or an infinity at one drawn position (nothing for an empty tensor)."""
    if kind not in ("nan", "inf", "-inf") or values.numel() == 0:
        return values
    values = values.clone()
    position = int(torch.randint(values.numel(), (1,), generator=generator))
    values.view(-1)[position] = float(kind)
    return values


# ---- judging ----


def is_clear_error(error: BaseException, names: Sequence[str]) -> bool:
    message = str(error).split("\nException raised from")[0]
    return isinstance(error, CLEAR_ERROR_TYPES) and any(name in message for name in names)


def _first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def compare(results: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], dtype: str) -> Optional[str]:
    """None when every result matches its expected tensor in shape and (within the dtype's tolerance) value,
    else what differs first. A gradient that is None on one side must be all zeros on the other; where an input
    held NaN or infinity, either side may hold any non-finite value where the other holds one (the order of
    operations decides between NaN and infinity)."""
    rtol, atol = TOLERANCES[dtype]
    if len(results) != len(expected):
        return f"{len(results)} results, expected {len(expected)}"
    for position, (result, wanted) in enumerate(zip(results, expected)):
        if result is None or wanted is None:
            present = wanted if result is None else result
            if present is not None and present.device.type != "meta" and present.count_nonzero():
                return f"result {position}: a non-zero gradient where the other side has none"
            continue
        if tuple(result.shape) != tuple(wanted.shape):
            return f"result {position}: shape {tuple(result.shape)}, expected {tuple(wanted.shape)}"
        if not result.is_floating_point():
            if not torch.equal(result.cpu(), wanted.cpu().to(result.dtype)):
                return f"result {position}: integer values differ"
            continue
        result64, wanted64 = result.detach().cpu().double(), wanted.detach().cpu().double()
        finite = torch.isfinite(result64)
        if not torch.equal(finite, torch.isfinite(wanted64)):
            return f"result {position}: non-finite at other positions than the reference"
        infinite = torch.isinf(result64) & torch.isinf(wanted64)
        if not torch.equal(result64[infinite], wanted64[infinite]):
            return f"result {position}: infinities of another sign than the reference's"
        if not torch.allclose(result64[finite], wanted64[finite], rtol=rtol, atol=atol):
            difference = (result64[finite] - wanted64[finite]).abs().max().item()
            return f"result {position}: max abs difference {difference:.3g} (rtol {rtol}, atol {atol})"
    return None


class Call:
    """What a case runs: ``operator(device)`` and ``oracle()`` each return a list of tensors (outputs, then
    gradients); ``names`` are the words a clear error may name."""

    def __init__(
        self,
        operator: Callable[[str], List[torch.Tensor]],
        oracle: Callable[[], List[torch.Tensor]],
        names: Sequence[str],
    ):
        self.operator, self.oracle, self.names = operator, oracle, names


def judge(spec: dict, call: Call) -> Dict[str, str]:
    expect, device = spec["expect"], spec.get("device", "cpu")
    try:
        results = call.operator(device)
    except Exception as error:  # noqa: BLE001 - the point is to classify whatever the operator raises
        if not is_clear_error(error, call.names):
            return {"status": "unclear_error", "detail": _first_line(error)}
        if expect == "agree":
            return {"status": "false_reject", "detail": _first_line(error)}
        if expect == "meta":
            return _meta_outcome(call, None, error)
        return {"status": "rejected", "detail": _first_line(error)}
    if expect == "reject":
        return {"status": "accepted_bad_input", "detail": "returned a result for an invalid input"}
    if expect == "no_crash":
        return {"status": "ran", "detail": ""}
    if expect == "meta":
        return _meta_outcome(call, results, None)
    try:
        expected = call.oracle()
    except Exception as error:  # noqa: BLE001
        return {
            "status": "wrong",
            "detail": f"the operator accepted an input its reference rejects: {_first_line(error)}",
        }
    difference = compare(results, expected, spec["dtype"])
    if difference is not None:
        return {"status": "wrong", "detail": difference}
    return {"status": "agree", "detail": ""}


def _meta_outcome(call: Call, meta_results, meta_error) -> Dict[str, str]:
    try:
        cpu_results = call.operator("cpu")
    except Exception as error:  # noqa: BLE001
        if meta_error is not None:
            return {"status": "rejected", "detail": _first_line(meta_error)}
        return {"status": "meta_mismatch", "detail": f"meta returned, the CPU raised {_first_line(error)}"}
    if meta_error is not None:
        return {"status": "meta_mismatch", "detail": f"meta raised {_first_line(meta_error)}, the CPU returned"}
    shapes = [None if r is None else (tuple(r.shape), r.dtype) for r in meta_results]
    cpu_shapes = [None if r is None else (tuple(r.shape), r.dtype) for r in cpu_results]
    if shapes != cpu_shapes:
        return {"status": "meta_mismatch", "detail": f"meta gave {shapes}, the CPU {cpu_shapes}"}
    return {"status": "agree", "detail": ""}


def _grads(
    outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], generator_seed: int
) -> List[Optional[torch.Tensor]]:
    """Gradients of a fixed random projection of ``outputs`` with respect to ``inputs`` (None where unused)."""
    differentiable = [o for o in outputs if o is not None and o.requires_grad]
    if not differentiable:
        return [None for _ in inputs]
    generator = torch.Generator().manual_seed(generator_seed)
    cotangents = [
        torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.device, o.dtype) for o in differentiable
    ]
    return list(torch.autograd.grad(differentiable, inputs, cotangents, allow_unused=True))


def _wants_grad(spec: dict) -> bool:
    """Gradients are compared in float32 and float64, and not where an input holds NaN or infinity: there the
    derivative is undefined and the reference's autograd yields NaN even through empty products (dv = 0)."""
    return (
        spec["expect"] in ("agree", "either")
        and spec["dtype"] in ("float32", "float64")
        and spec["values"] not in ("nan", "inf", "-inf")
    )


# ---- drawing helpers ----


def _common(rng: random.Random, spec: dict, special_values: Sequence[str] = ("nan", "inf", "-inf")) -> None:
    spec["dtype"] = rng.choice(["float32", "float32", "float64", "float16", "bfloat16"])
    spec["values"] = rng.choice(["normal"] * 6 + list(special_values))
    spec["seed"] = rng.randrange(2**31)


def _layouts(rng: random.Random, names: Sequence[str]) -> Dict[str, str]:
    return {
        name: rng.choice(["contiguous", "contiguous", "strided", "column", "offset", "transposed"]) for name in names
    }


def _expect(spec: dict, sizes: Sequence[int]) -> str:
    if spec.get("defect", "none") != "none":
        return "reject"
    if spec.get("device") == "meta":
        return "meta"
    if spec["values"] != "normal" or 0 in sizes:
        return "either"
    return "agree"


def _defect(
    rng: random.Random, spec: dict, defects: Sequence[str], inputs: Sequence[str], floats_must_match: bool = True
) -> None:
    """Half the cases are valid; of the rest, a fifth move every input to meta and the others inject a defect:
    one of ``defects``, one input on the meta device, or one input of another dtype (int64, or another floating
    dtype when the operator wants its floating inputs of one dtype)."""
    spec["defect"] = "none"
    roll = rng.random()
    choice = rng.choice(list(defects) + ["meta_input", "meta_input", "other_dtype"])
    if roll < 0.5:
        return
    if roll < 0.6 or (choice == "meta_input" and len(inputs) == 1):
        spec["device"] = "meta"  # meta tensors have no values: the special ones cannot be checked there
        spec["values"] = "normal" if spec["values"] in ("nan", "inf", "-inf", "negative") else spec["values"]
        return
    if choice == "meta_input":
        spec["devices"] = {rng.choice(list(inputs)): "meta"}
    elif choice == "other_dtype":
        floats = [d for d in DTYPES if d != spec["dtype"]] if floats_must_match else []
        spec["dtypes"] = {rng.choice(list(inputs)): rng.choice(floats + ["int64"])}
    spec["defect"] = choice


DTYPES_WITH_INT = dict(DTYPES, int64=torch.int64)


def _input_dtype(spec: dict, name: str) -> torch.dtype:
    return DTYPES_WITH_INT[spec.get("dtypes", {}).get(name, spec["dtype"])]


def _place(spec: dict, name: str, values: torch.Tensor, device: str, requires_grad: bool = False) -> torch.Tensor:
    """``values`` (float64 or int64) in the case's dtype (floats), layout and device for input ``name``."""
    if values.is_floating_point():
        values = values.to(_input_dtype(spec, name))
    elif name in spec.get("dtypes", {}):
        values = values.to(_input_dtype(spec, name))
    tensor = relayout(
        on_device(values, spec.get("devices", {}).get(name, device)), spec.get("layouts", {}).get(name, "contiguous")
    )
    if requires_grad and tensor.is_floating_point() and tensor.device.type != "meta":
        tensor = tensor.detach().requires_grad_(True)
    return tensor


def _oracle_input(spec: dict, values: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    """What the operator saw, rounded to the case's dtype, as a float64 leaf."""
    tensor = values.to(DTYPES[spec["dtype"]]).double()
    return tensor.requires_grad_(requires_grad)


# ---- families ----


def draw_dispatch(rng: random.Random) -> dict:
    """Routing plans from explicit assignments, dispatch in both layouts, combine, and their backwards."""
    spec = {
        "T": rng.choice([0, 1, 2, 3, 5, 8]),
        "D": rng.choice([0, 1, 3, 8]),
        "E": rng.choice([1, 2, 3, 5]),
        "K": rng.choice([0, 1, 2, 3]),
        "capacity": rng.choice([None, 0, 1, 2, 4, 7]),
        "with_num_tokens": rng.random() < 0.7,
        "constant_indices": rng.random() < 0.1,
    }
    spec["layout"] = "packed" if spec["capacity"] is None else rng.choice(["padded", "packed"])
    _common(rng, spec)
    spec["layouts"] = _layouts(rng, ["x", "token_index", "expert_index", "weight"])
    if spec["constant_indices"]:
        spec["layouts"]["token_index"] = spec["layouts"]["expert_index"] = "expanded"
    spec["plan_layout"] = rng.choice(["contiguous"] * 3 + ["strided", "column", "offset"])
    _defect(
        rng,
        spec,
        [
            "token_out_of_range",
            "expert_out_of_range",
            "negative_expert",
            "index_int32",
            "x_rank",
            "weight_shape",
            "negative_capacity",
            "expert_out_shape",
        ],
        ["x", "token_index", "expert_index", "weight"],
        floats_must_match=False,
    )
    if spec["defect"] == "other_dtype" and list(spec["dtypes"]) in (["token_index"], ["expert_index"]):
        spec["dtypes"] = {next(iter(spec["dtypes"])): "float32"}
    if spec["defect"] != "none":  # a defect needs something to act on
        spec.update(T=max(spec["T"], 1), K=max(spec["K"], 1), D=max(spec["D"], 1))
    spec["expect"] = _expect(spec, [spec["T"], spec["D"], spec["K"]])
    return spec


def _dispatch_values(spec: dict):
    generator = _generator(spec)
    T, D, E, K = spec["T"], spec["D"], spec["E"], spec["K"]
    A = T * K
    tokens = torch.arange(T).repeat(K) if A else torch.zeros(0, dtype=torch.long)
    experts = torch.randint(E, (A,), generator=generator)
    if spec["constant_indices"] and A:
        tokens, experts = torch.zeros(A, dtype=torch.long), torch.full((A,), E - 1)
    defect = spec["defect"]
    if A and defect in ("token_out_of_range", "expert_out_of_range", "negative_expert"):
        position = int(torch.randint(A, (1,), generator=generator))
        if defect == "token_out_of_range":
            tokens[position] = T + 3
        elif defect == "expert_out_of_range":
            experts[position] = E
        else:
            experts[position] = -1
        spec["layouts"]["token_index"] = spec["layouts"]["expert_index"] = "contiguous"
    x = _special(_floats(spec, (T, D), generator), spec["values"], generator)
    weight = torch.rand(A, generator=generator, dtype=torch.float64)
    scale = _floats(spec, (1, D), generator)
    return tokens, experts, x, weight, scale


def _relayout_plan(plan, layout: str):
    fields = {
        name: getattr(plan, name)
        for name in ("sorted_token", "sorted_expert", "slot", "offsets", "order", "token_offsets", "token_rows")
    }
    fields = {name: None if t is None else relayout(t, layout) for name, t in fields.items()}
    return type(plan)(
        weight=plan.weight, num_experts=plan.num_experts, capacity=plan.capacity, num_groups=plan.num_groups, **fields
    )


def run_dispatch(spec: dict) -> Dict[str, str]:
    tokens, experts, x_values, weight_values, scale = _dispatch_values(spec)
    T, E, capacity, layout, defect = spec["T"], spec["E"], spec["capacity"], spec["layout"], spec["defect"]
    num_tokens = T if spec["with_num_tokens"] else None
    if defect == "negative_capacity":
        capacity = -1
    grads = _wants_grad(spec)

    def run_with(module, x, token_index, expert_index, weight, relayout_plan: bool):
        plan = module.make_plan(token_index, expert_index, weight, E, capacity, num_tokens=num_tokens)
        if relayout_plan:
            plan = _relayout_plan(plan, spec["plan_layout"])
        rows = module.dispatch(x, plan, layout)
        expert_out = rows * scale.to(rows.dtype).to(rows.device) + 0.5
        if defect == "expert_out_shape":  # one expert (padded) or assignment (packed) short: D is free
            expert_out = expert_out[:-1]
        y = module.combine(expert_out, plan, T)
        outputs = [rows, y]
        return outputs + (_grads(outputs, [x, weight], spec["seed"]) if grads else [])

    def operator(device: str):
        x = _place(spec, "x", x_values, device, grads)
        if defect == "x_rank":
            x = x.unsqueeze(0)
        index_dtype = {"index_int32": torch.int32}.get(defect)
        token_index = _place(spec, "token_index", tokens if index_dtype is None else tokens.to(index_dtype), device)
        expert_index = _place(spec, "expert_index", experts, device)
        weight = _place(
            spec, "weight", weight_values if defect != "weight_shape" else weight_values[:-1], device, grads
        )
        return run_with(ops, x, token_index, expert_index, weight, relayout_plan=True)

    def oracle():
        return run_with(
            reference,
            _oracle_input(spec, x_values, grads),
            tokens,
            experts,
            _oracle_input(spec, weight_values, grads),
            relayout_plan=False,
        )

    names = [
        "make_plan",
        "dispatch",
        "combine",
        "token_index",
        "expert_index",
        "weight",
        "x",
        "capacity",
        "num_tokens",
        "expert_out",
        "token_major",
        "sorted_token",
    ]
    return judge(spec, Call(operator, oracle, names))


def draw_plan_raw(rng: random.Random) -> dict:
    """Internally inconsistent plans handed straight to ``torch.ops.visionmoe`` dispatch, combine and backwards."""
    spec = {
        "T": rng.choice([1, 2, 4, 7]),
        "D": rng.choice([1, 3]),
        "E": rng.choice([1, 2, 3]),
        "K": rng.choice([1, 2]),
        "capacity": rng.choice([None, 1, 2, 3]),
        "dtype": "float32",
        "values": "normal",
        "seed": rng.randrange(2**31),
        "expect": "no_crash",
    }
    spec["defect"] = rng.choice(
        [
            "offsets_last",
            "offsets_decreasing",
            "offsets_negative",
            "offsets_short",
            "slot_negative",
            "slot_large",
            "sorted_token_large",
            "sorted_token_negative",
            "sorted_expert_large",
            "sorted_expert_negative",
            "sorted_expert_unsorted",
            "token_rows_large",
            "token_offsets_last",
            "token_offsets_decreasing",
        ]
    )
    spec["layout"] = "packed" if spec["capacity"] is None else rng.choice(["padded", "packed"])
    return spec


def _corrupt_plan(spec: dict, plan, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    fields = {
        name: getattr(plan, name).clone()
        for name in ("sorted_token", "sorted_expert", "slot", "offsets", "token_offsets", "token_rows")
    }
    A, T, E = plan.num_assignments, spec["T"], plan.num_experts
    position = int(torch.randint(max(A, 1), (1,), generator=generator))
    big = 1 << 40
    edits = {
        "offsets_last": lambda f: f["offsets"].__setitem__(-1, A + 5),
        "offsets_decreasing": lambda f: f["offsets"].__setitem__(1, A + 1),
        "offsets_negative": lambda f: f["offsets"].__setitem__(0, -3),
        "offsets_short": lambda f: f.__setitem__("offsets", f["offsets"][:1]),
        "slot_negative": lambda f: f["slot"].__setitem__(position, -1),
        "slot_large": lambda f: f["slot"].__setitem__(position, big),
        "sorted_token_large": lambda f: f["sorted_token"].__setitem__(position, T + big),
        "sorted_token_negative": lambda f: f["sorted_token"].__setitem__(position, -2),
        "sorted_expert_large": lambda f: f["sorted_expert"].__setitem__(position, E + big),
        "sorted_expert_negative": lambda f: f["sorted_expert"].__setitem__(position, -1),
        "sorted_expert_unsorted": lambda f: f["sorted_expert"].copy_(f["sorted_expert"].flip(0)),
        "token_rows_large": lambda f: f["token_rows"].__setitem__(position, A + big),
        "token_offsets_last": lambda f: f["token_offsets"].__setitem__(-1, A + big),
        "token_offsets_decreasing": lambda f: f["token_offsets"].__setitem__(1, -big),
    }
    edits[spec["defect"]](fields)
    return fields


def run_plan_raw(spec: dict) -> Dict[str, str]:
    generator = _generator(spec)
    T, D, E, K, capacity = spec["T"], spec["D"], spec["E"], spec["K"], spec["capacity"]
    tokens = torch.arange(T).repeat(K)
    plan = ops.make_plan(
        tokens, torch.randint(E, (T * K,), generator=generator), torch.rand(T * K), E, capacity, num_tokens=T
    )
    fields = _corrupt_plan(spec, plan, generator)
    padded = spec["layout"] == "padded"
    raw = torch.ops.visionmoe
    plan_args = (fields["sorted_token"], fields["sorted_expert"], fields["slot"], fields["offsets"])
    token_view = (fields["token_offsets"], fields["token_rows"])
    x = torch.randn(T, D, generator=generator)
    rows_shape = (E, capacity, D) if padded else (plan.num_assignments, D)
    expert_out = torch.randn(rows_shape, generator=generator)
    weight = torch.rand(plan.num_assignments, generator=generator)

    def operator(device: str):
        return [
            raw.dispatch(x, *plan_args, *token_view, capacity, padded),
            raw.dispatch_backward(expert_out, *plan_args, *token_view, capacity),
            raw.combine(expert_out, weight, *plan_args, *token_view, capacity),
            *raw.combine_backward(x, expert_out, weight, *plan_args, capacity),
        ]

    names = [
        "dispatch",
        "combine",
        "offsets",
        "slot",
        "sorted_token",
        "sorted_expert",
        "token_offsets",
        "token_rows",
        "plan",
    ]
    return judge(spec, Call(operator, lambda: [], names))


def draw_routing(rng: random.Random) -> dict:
    """Top-K token choice (with Batch Priority Routing) and expert choice, as routing plans."""
    spec = {
        "op": rng.choice(["topk", "expert_choice"]),
        "G": rng.choice([0, 1, 2, 3]),
        "T": rng.choice([0, 1, 2, 5, 9]),
        "E": rng.choice([1, 2, 3, 4, 7]),
        "two_dim": rng.random() < 0.3,
        "batch_priority": rng.random() < 0.5,
        "renormalize": rng.random() < 0.3,
        "with_weights": rng.random() < 0.5,
    }
    spec["k"] = rng.randint(1, spec["E"])
    spec["capacity"] = rng.choice(([None] if spec["op"] == "topk" else []) + [0, 1, 2, 5])
    _common(rng, spec, special_values=("nan", "inf", "ties", "signed_zeros", "signed_zeros"))
    if spec["two_dim"]:
        spec["G"] = 1
    spec["layouts"] = _layouts(rng, ["scores", "weights"])
    _defect(
        rng,
        spec,
        ["k_zero", "k_large", "negative_capacity", "scores_rank", "weights_shape"],
        ["scores", "weights"] if spec["with_weights"] else ["scores"],
        floats_must_match=False,
    )
    if (
        spec["op"] == "expert_choice"
        and spec["defect"] in ("k_zero", "k_large")
        or spec["defect"] == "weights_shape"
        and not spec["with_weights"]
    ):
        spec["defect"] = "negative_capacity"
    special = "normal" if spec["values"] in ("ties", "signed_zeros") else spec["values"]
    spec["expect"] = _expect(dict(spec, values=special), [spec["G"], spec["T"]])
    return spec


def _scores(spec: dict, shape, generator) -> torch.Tensor:
    kind = spec["values"]
    if kind == "ties":
        return torch.tensor([0.0, 0.25, 0.5], dtype=torch.float64)[torch.randint(3, shape, generator=generator)]
    if kind == "signed_zeros":
        return torch.tensor([-0.0, 0.0, 0.5, -0.5], dtype=torch.float64)[torch.randint(4, shape, generator=generator)]
    return _special(torch.rand(shape, generator=generator, dtype=torch.float64), kind, generator)


def run_routing(spec: dict) -> Dict[str, str]:
    generator = _generator(spec)
    G, T, E, defect = spec["G"], spec["T"], spec["E"], spec["defect"]
    shape = (T, E) if spec["two_dim"] else (G, T, E)
    score_values = _scores(spec, shape, generator)
    weight_values = torch.rand(shape, generator=generator, dtype=torch.float64) if spec["with_weights"] else None
    k = {"k_zero": 0, "k_large": E + 1}.get(defect, spec["k"])
    capacity = -1 if defect == "negative_capacity" else spec["capacity"]
    grads = _wants_grad(spec)

    def route(module, scores, weights):
        if defect == "scores_rank":
            scores = scores.reshape(-1)
        if defect == "weights_shape" and weights is not None:
            weights = weights[..., :-1]
        if spec["op"] == "topk":
            plan = module.topk_route(
                scores,
                k,
                capacity,
                batch_priority=spec["batch_priority"],
                weights=weights,
                renormalize=spec["renormalize"],
            )
        else:
            plan = module.expert_choice_route(scores, capacity, weights=weights)
        outputs = [
            plan.sorted_token,
            plan.sorted_expert,
            plan.slot,
            plan.offsets,
            plan.token_offsets,
            plan.token_rows,
            plan.weight,
        ]
        leaves = [scores if weights is None else weights]
        return outputs + (_grads(outputs, leaves, spec["seed"]) if grads else [])

    def operator(device: str):
        scores = _place(spec, "scores", score_values, device, grads and weight_values is None)
        weights = None if weight_values is None else _place(spec, "weights", weight_values, device, grads)
        return route(ops, scores, weights)

    def oracle():
        scores = _oracle_input(spec, score_values, grads and weight_values is None)
        weights = None if weight_values is None else _oracle_input(spec, weight_values, grads)
        return route(reference, scores, weights)

    names = ["topk_route", "expert_choice_route", "scores", "weights", "k", "capacity"]
    return judge(spec, Call(operator, oracle, names))


def draw_sinkhorn(rng: random.Random) -> dict:
    """Log-domain Sinkhorn normalisation and its backward, with large common offsets among the special values."""
    spec = {
        "G": rng.choice([0, 1, 2]),
        "T": rng.choice([0, 1, 2, 5, 9]),
        "E": rng.choice([0, 1, 2, 3, 6]),
        "two_dim": rng.random() < 0.3,
        "iterations": rng.choice([0, 1, 3, 20]),
        "validate": rng.random() < 0.8,
    }
    _common(rng, spec, special_values=("nan", "inf", "offset", "offset", "scaled"))
    spec["offset"] = rng.choice([1e3, 1e6, 1e7, 1e8, -1e8])
    if spec["two_dim"]:
        spec["G"] = 1
    spec["layouts"] = _layouts(rng, ["logits"])
    # One input, so another dtype can only be a non-floating one.
    _defect(rng, spec, ["negative_iterations", "logits_rank"], ["logits"], floats_must_match=False)
    large = spec["values"] in ("offset", "scaled")
    spec["expect"] = _expect(
        dict(spec, values="normal" if large else spec["values"]), [spec["G"], spec["T"], spec["E"]]
    )
    if spec["values"] in ("nan", "inf") and not spec["validate"] and spec["expect"] == "either":
        spec["expect"] = "no_crash"
    if large and spec["dtype"] in ("float16", "bfloat16"):
        spec["values"] = "scaled"
    return spec


def run_sinkhorn(spec: dict) -> Dict[str, str]:
    generator = _generator(spec)
    shape = (spec["T"], spec["E"]) if spec["two_dim"] else (spec["G"], spec["T"], spec["E"])
    values = _floats(spec, shape, generator)
    if spec["values"] == "offset":
        values = values + spec["offset"]
    elif spec["values"] == "scaled":
        values = values * 30
    else:
        values = _special(values, spec["values"], generator)
    iterations = -1 if spec["defect"] == "negative_iterations" else spec["iterations"]
    grads = _wants_grad(spec)

    def normalise(module, logits):
        if spec["defect"] == "logits_rank":
            logits = logits.reshape(-1)
        log_plan = module.sinkhorn(logits, iterations, validate=spec["validate"])
        return [log_plan] + (_grads([log_plan], [logits], spec["seed"]) if grads else [])

    return judge(
        spec,
        Call(
            lambda device: normalise(ops, _place(spec, "logits", values, device, grads)),
            lambda: normalise(reference, _oracle_input(spec, values, grads)),
            ["sinkhorn", "logits", "num_iterations"],
        ),
    )


def draw_soft_moe(rng: random.Random) -> dict:
    """Soft MoE's dispatch of tokens into slots and combine of slots into tokens, with their backwards."""
    spec = {
        "op": rng.choice(["soft_dispatch", "soft_combine"]),
        "G": rng.choice([0, 1, 2]),
        "T": rng.choice([0, 1, 3, 6]),
        "S": rng.choice([0, 1, 2, 4]),
        "D": rng.choice([0, 1, 4]),
    }
    _common(rng, spec)
    spec["layouts"] = _layouts(rng, ["features", "logits"])
    # Only the size both inputs share can differ: T for the dispatch, S for the combine.
    shared = "tokens_differ" if spec["op"] == "soft_dispatch" else "slots_differ"
    _defect(rng, spec, ["features_rank", "groups_differ", shared], ["features", "logits"])
    spec["expect"] = _expect(spec, [spec["G"], spec["T"], spec["S"], spec["D"]])
    return spec


def run_soft_moe(spec: dict) -> Dict[str, str]:
    generator = _generator(spec)
    G, T, S, D, defect = spec["G"], spec["T"], spec["S"], spec["D"], spec["defect"]
    dispatching = spec["op"] == "soft_dispatch"
    features = _floats(spec, (G, T if dispatching else S, D), generator)
    logits = _special(_floats(spec, (G, T, S), generator), spec["values"], generator)
    if defect == "groups_differ":
        features = features.new_zeros((G + 1,) + features.shape[1:])
    elif defect == "tokens_differ":
        logits = _floats(spec, (G, T + 1, S), generator)
    elif defect == "slots_differ":
        logits = _floats(spec, (G, T, S + 1), generator)
    grads = _wants_grad(spec)

    def mix(module, x, z):
        if defect == "features_rank":
            x = x.reshape(-1)
        out = getattr(module, spec["op"])(x, z)
        return [out] + (_grads([out], [x, z], spec["seed"]) if grads else [])

    def operator(device):
        return mix(
            ops, _place(spec, "features", features, device, grads), _place(spec, "logits", logits, device, grads)
        )

    return judge(
        spec,
        Call(
            operator,
            lambda: mix(reference, _oracle_input(spec, features, grads), _oracle_input(spec, logits, grads)),
            ["soft_dispatch", "soft_combine", "x", "y", "logits"],
        ),
    )


def draw_expert_mlp(rng: random.Random) -> dict:
    """Every expert's MLP on padded [E, C, D] or packed [M, D] rows with expert offsets, and its backward."""
    spec = {
        "layout": rng.choice(["padded", "packed"]),
        "E": rng.choice([0, 1, 2, 3]),
        "C": rng.choice([0, 1, 3]),
        "D": rng.choice([0, 1, 4]),
        "F": rng.choice([0, 1, 5]),
        "activation": rng.choice(["gelu", "silu_gated"]),
    }
    _common(rng, spec)
    spec["layouts"] = _layouts(rng, ["x", "w1", "b1", "w2", "b2", "expert_offsets"])
    _defect(
        rng,
        spec,
        [
            "offsets_end",
            "offsets_decreasing",
            "offsets_negative",
            "offsets_length",
            "offsets_int32",
            "offsets_for_padded",
            "offsets_missing",
            "w1_shape",
            "b2_shape",
            "activation_name",
        ],
        ["x", "w1", "b1", "w2", "b2"],
    )
    if spec["layout"] == "padded" and spec["defect"].startswith("offsets_"):
        spec["defect"] = "offsets_for_padded"
    elif spec["layout"] == "packed" and spec["defect"] == "offsets_for_padded":
        spec["defect"] = "offsets_missing"
    spec["expect"] = _expect(spec, [spec["E"], spec["C"], spec["D"], spec["F"]])
    return spec


def run_expert_mlp(spec: dict) -> Dict[str, str]:
    generator = _generator(spec)
    E, C, D, F, defect = spec["E"], spec["C"], spec["D"], spec["F"], spec["defect"]
    hidden = 2 * F if spec["activation"] == "silu_gated" else F
    if spec["layout"] == "packed":
        counts = torch.randint(C + 1, (E,), generator=generator)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        x = _floats(spec, (int(offsets[-1]), D), generator)
    else:
        offsets = None
        x = _floats(spec, (E, C, D), generator)
    x = _special(x, spec["values"], generator)
    weights = {
        "w1": _floats(spec, (E, D, hidden), generator, 0.5),
        "b1": _floats(spec, (E, hidden), generator),
        "w2": _floats(spec, (E, F, D), generator, 0.5),
        "b2": _floats(spec, (E, D), generator),
    }
    if defect == "w1_shape":
        weights["w1"] = weights["w1"][:, :, :-1] if hidden else _floats(spec, (E, D, 1), generator)
    elif defect == "b2_shape":
        weights["b2"] = _floats(spec, (E, D + 1), generator)
    if offsets is not None:
        bad = offsets.clone()
        if defect == "offsets_end":
            bad[-1] += 2
        elif defect == "offsets_decreasing" and E:
            bad[1] = bad[-1] + 1
        elif defect == "offsets_negative":
            bad -= 1
        elif defect == "offsets_length":
            bad = torch.cat([bad, bad[-1:]])
        elif defect == "offsets_int32":
            bad = bad.to(torch.int32)
        elif defect == "offsets_missing":
            bad = None
        offsets = bad
    elif defect == "offsets_for_padded":
        offsets = torch.arange(E + 1) * C
    if defect == "offsets_decreasing" and E == 0:  # [0] has nothing to reorder: the input stays valid
        spec["expect"] = "either"
    activation = "relu_squared" if defect == "activation_name" else spec["activation"]
    grads = _wants_grad(spec)
    names = ["x", "w1", "b1", "w2", "b2"]

    def mlp(module, tensors, expert_offsets):
        y = module.expert_mlp(*[tensors[n] for n in names], activation=activation, expert_offsets=expert_offsets)
        return [y] + (_grads([y], [tensors[n] for n in names], spec["seed"]) if grads else [])

    def operator(device):
        tensors = {n: _place(spec, n, values, device, grads) for n, values in dict(weights, x=x).items()}
        expert_offsets = None if offsets is None else _place(spec, "expert_offsets", offsets, device)
        return mlp(ops, tensors, expert_offsets)

    def oracle():
        return mlp(reference, {n: _oracle_input(spec, v, grads) for n, v in dict(weights, x=x).items()}, offsets)

    return judge(spec, Call(operator, oracle, ["expert_mlp"] + names + ["expert_offsets", "activation"]))


def draw_teacher_routing(rng: random.Random) -> dict:
    """TGR-MoE's routing-distillation loss and its backward."""
    spec = {
        "T": rng.choice([0, 1, 3, 7]),
        "E": rng.choice([0, 1, 2, 5]),
        "reduction": rng.choice(["none", "mean", "sum"]),
        "format": rng.choice(["probabilities", "logits"]),
        "one_hot": rng.random() < 0.2,
        "special_in": rng.choice(["student_logits", "teacher"]),
    }
    _common(rng, spec, special_values=("nan", "inf", "-inf", "negative"))
    spec["layouts"] = _layouts(rng, ["student_logits", "teacher"])
    _defect(rng, spec, ["shapes_differ", "rank", "reduction_name", "format_name"], ["student_logits", "teacher"])
    spec["expect"] = _expect(spec, [spec["T"], spec["E"]])
    return spec


def run_teacher_routing(spec: dict) -> Dict[str, str]:
    generator = _generator(spec)
    T, E, defect = spec["T"], spec["E"], spec["defect"]
    student = _floats(spec, (T, E), generator)
    teacher = _floats(spec, (T, E), generator)
    if spec["format"] == "probabilities":
        teacher = teacher.softmax(-1)
        if spec["one_hot"] and E:
            teacher = torch.nn.functional.one_hot(teacher.argmax(-1), E).double()
    if spec["values"] == "negative":
        if spec["format"] == "probabilities" and teacher.numel():
            teacher[0, 0] = -0.25
        elif spec["expect"] == "either":
            spec["expect"] = "agree" if 0 not in (T, E) else "either"
    else:
        if spec["special_in"] == "teacher":
            teacher = _special(teacher, spec["values"], generator)
        else:
            student = _special(student, spec["values"], generator)
    if defect == "shapes_differ":
        teacher = _floats(spec, (T, E + 1), generator)
    reduction = "average" if defect == "reduction_name" else spec["reduction"]
    teacher_format = "log_probabilities" if defect == "format_name" else spec["format"]
    grads = _wants_grad(spec)

    def loss(module, s, t):
        if defect == "rank":
            s, t = s.unsqueeze(0), t.unsqueeze(0)
        value = module.teacher_routing_loss(s, t, reduction, teacher_format)
        return [value] + (_grads([value], [s], spec["seed"]) if grads else [])

    def operator(device):
        return loss(
            ops, _place(spec, "student_logits", student, device, grads), _place(spec, "teacher", teacher, device)
        )

    return judge(
        spec,
        Call(
            operator,
            lambda: loss(reference, _oracle_input(spec, student, grads), _oracle_input(spec, teacher, False)),
            ["teacher_routing_loss", "student_logits", "teacher", "reduction", "teacher_format"],
        ),
    )


def draw_whatwhere(rng: random.Random) -> dict:
    """The What-Where Transformer's shared-logit attention between tokens and slots, and its backward."""
    spec = {
        "B": rng.choice([0, 1, 2]),
        "H": rng.choice([0, 1, 2]),
        "N": rng.choice([0, 1, 3, 5]),
        "S": rng.choice([0, 1, 2, 4]),
        "dh": rng.choice([1, 2, 8]),
        "dv": rng.choice([0, 1, 3]),
    }
    _common(rng, spec)
    inputs = ["q", "k", "v_tokens", "v_slots", "where"]
    spec["layouts"] = _layouts(rng, inputs)
    _defect(rng, spec, ["head_dims_differ", "where_shape", "rank", "zero_head_dim"], inputs)
    spec["expect"] = _expect(spec, [spec["B"], spec["H"], spec["N"], spec["S"], spec["dv"]])
    return spec


def run_whatwhere(spec: dict) -> Dict[str, str]:
    generator = _generator(spec)
    B, H, N, S, dh, dv, defect = (spec[key] for key in ("B", "H", "N", "S", "dh", "dv", "defect"))
    if defect == "zero_head_dim":
        dh = 0
    shapes = {
        "q": (B, H, N, dh),
        "k": (B, H, S, dh + (defect == "head_dims_differ")),
        "v_tokens": (B, H, N, dv),
        "v_slots": (B, H, S, dv),
        "where": (B, H, N, S + (defect == "where_shape")),
    }
    values = {name: _floats(spec, shape, generator) for name, shape in shapes.items()}
    values["where"] = _special(values["where"], spec["values"], generator)
    names = list(shapes)
    grads = _wants_grad(spec)

    def attend(module, tensors):
        if defect == "rank":
            tensors = dict(tensors, q=tensors["q"].flatten(0, 1))
        outputs = list(module.whatwhere_attention(*[tensors[n] for n in names]))
        return outputs + (_grads(outputs, [tensors[n] for n in names], spec["seed"]) if grads else [])

    def operator(device):
        return attend(ops, {n: _place(spec, n, v, device, grads) for n, v in values.items()})

    return judge(
        spec,
        Call(
            operator,
            lambda: attend(reference, {n: _oracle_input(spec, v, grads) for n, v in values.items()}),
            ["whatwhere_attention"] + names,
        ),
    )


FAMILIES = {
    "dispatch": (draw_dispatch, run_dispatch),
    "plan_raw": (draw_plan_raw, run_plan_raw),
    "routing": (draw_routing, run_routing),
    "sinkhorn": (draw_sinkhorn, run_sinkhorn),
    "soft_moe": (draw_soft_moe, run_soft_moe),
    "expert_mlp": (draw_expert_mlp, run_expert_mlp),
    "teacher_routing": (draw_teacher_routing, run_teacher_routing),
    "whatwhere": (draw_whatwhere, run_whatwhere),
}


def draw(family: str, seed: int, index: int, device: str = "cpu") -> dict:
    """The spec of case ``index`` of ``family`` for ``seed``: the same on every machine and run."""
    spec = FAMILIES[family][0](random.Random(f"{family}:{seed}:{index}"))
    spec.setdefault("device", device)
    return {"family": family, "seed_of_run": seed, "index": index, **spec}


def run(spec: dict) -> Dict[str, str]:
    """Runs the case and classifies the outcome (see the module docstring); JSON-able."""
    spec = json.loads(json.dumps(spec))  # the run must not depend on anything but the spec's JSON
    return FAMILIES[spec["family"]][1](spec)
