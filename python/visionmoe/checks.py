"""Argument checks of the operators, worded once and shared by their fake kernels (``visionmoe.ops``) and their
references (``visionmoe.reference``), so that both raise what the C++ kernels raise for the same bad input.

The error contract (README.md, "Operators"): bad argument values, shapes, sizes, devices or index contents raise
``ValueError`` (C++: ``TORCH_CHECK_VALUE``); a wrong dtype raises ``TypeError`` (C++: ``TORCH_CHECK_TYPE``).
The messages start with the operator's name and name the argument, in the C++ kernels' words.

The checks use ``torch._check_value`` and ``torch._check_type``, which also work on the symbolic sizes of
``torch.compile``. A meta tensor beside a real one dispatches to the fake kernel rather than to the real kernel
(the Meta key wins), so a fake kernel that did not compare devices would hand back uninitialised real tensors;
each fake kernel therefore checks what the real kernels check about devices. This module sits in the bottom layer
and imports no compiled code, so that the reference stays usable without the extension.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import torch

from .constants import REDUCTIONS, TEACHER_FORMATS

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

ACTIVATIONS = ("gelu", "silu_gated")


def shape_of(value: Any):
    """A tensor's shape, or the type name of anything else, for error messages."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def check_count(op: str, name: str, value: Any, *, optional: bool = False) -> None:
    """Raises a ValueError naming ``name`` unless ``value`` is an integer >= 0 (Python, NumPy or symbolic), or None
    when ``optional``; a float such as 2.5 or nan, or a bool, is refused rather than truncated."""
    if value is None and optional:
        return
    is_integer = isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)
    if not is_integer or value < 0:
        alternative = ", or None" if optional else ""
        raise ValueError(f"{op}: {name} must be >= 0 and an integer{alternative}, got {value!r}")


def check_same_device(op: str, like_name: str, like: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """Raises a ValueError naming the first of ``tensors`` (None ones are skipped) not on ``like``'s device."""
    for name, tensor in tensors.items():
        if tensor is not None:
            torch._check_value(
                tensor.device == like.device,
                lambda: f"{op}: {name} must be on {like.device} like {like_name}, got {tensor.device}",
            )


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    """Raises a TypeError unless ``t`` is a floating-point tensor."""
    torch._check_type(t.is_floating_point(), lambda: f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def check_float_dtype(op: str, name: str, t: torch.Tensor) -> None:
    """Raises a TypeError unless ``t`` is float32, float64, float16 or bfloat16."""
    torch._check_type(
        t.dtype in FLOAT_DTYPES, lambda: f"{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}"
    )


def check_dtype_like(op: str, name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """Raises a TypeError unless ``t`` has ``like``'s dtype."""
    torch._check_type(
        t.dtype == like.dtype, lambda: f"{op}: {name} must have the dtype of {like_name} ({like.dtype}), got {t.dtype}"
    )


# ---- Sinkhorn ----


def check_sinkhorn(op: str, logits: torch.Tensor, num_iterations: int) -> None:
    """logits [G, T, E] (or [T, E]) floating point with T, E >= 1, and num_iterations >= 0."""
    torch._check_value(
        logits.dim() in (2, 3), lambda: f"{op}: logits must have shape [T, E] or [G, T, E], got {tuple(logits.shape)}"
    )
    check_floating(op, "logits", logits)
    torch._check_value(num_iterations >= 0, lambda: f"{op}: num_iterations must be >= 0, got {num_iterations}")
    torch._check_value(
        logits.shape[-2] >= 1 and logits.shape[-1] >= 1,
        lambda: f"{op}: logits must have T >= 1 tokens and E >= 1 experts per group, got shape {list(logits.shape)}",
    )


# ---- routing ----


def check_scores(op: str, scores: torch.Tensor) -> None:
    """scores [G, T, E] (or [T, E]) floating point with E >= 1."""
    torch._check_value(
        scores.dim() in (2, 3), lambda: f"{op}: scores must have shape [T, E] or [G, T, E], got {tuple(scores.shape)}"
    )
    check_floating(op, "scores", scores)
    torch._check_value(
        scores.shape[-1] >= 1,
        lambda: f"{op}: scores must have at least one expert (E >= 1), got shape {list(scores.shape)}",
    )


# ---- expert MLP ----


def check_expert_mlp(op: str, x, w1, w2, expert_offsets, activation) -> tuple[int, int]:
    """The checks of the expert MLP kernels that shapes alone allow; returns (F', F)."""
    torch._check_value(
        activation in ACTIVATIONS, lambda: f'{op}: activation must be "gelu" or "silu_gated", got "{activation}"'
    )
    torch._check_value(
        x.dim() in (2, 3), lambda: f"{op}: x must have shape [E, C, D] (padded) or [M, D] (packed), got {list(x.shape)}"
    )
    check_float_dtype(op, "x", x)
    torch._check_value(w1.dim() == 3, lambda: f"{op}: w1 must have shape [E, D, F'], got {list(w1.shape)}")
    check_like_x(op, "w1", w1, x)
    E, D, pre_width = w1.shape
    torch._check_value(
        x.shape[-1] == D,
        lambda: f"{op}: w1 must have shape [E, D, F'] with D = {x.shape[-1]} (the width of x), got {list(w1.shape)}",
    )
    if activation == "silu_gated":
        torch._check_value(
            pre_width % 2 == 0,
            lambda: (
                f"{op}: w1 must have an even number of columns 2F (gate and "
                f'value) for activation "silu_gated", got {list(w1.shape)}'
            ),
        )
    hidden = pre_width // 2 if activation == "silu_gated" else pre_width
    torch._check_value(w2.dim() == 3, lambda: f"{op}: w2 must have shape [E, F, D], got {list(w2.shape)}")
    check_like_x(op, "w2", w2, x)
    torch._check_value(
        w2.shape == (E, hidden, D),
        lambda: f"{op}: w2 must have shape [E, F, D] = {[E, hidden, D]}, got {list(w2.shape)}",
    )
    if x.dim() == 3:
        torch._check_value(expert_offsets is None, lambda: f"{op}: expert_offsets must be None for padded x [E, C, D]")
        torch._check_value(
            x.shape[0] == E, lambda: f"{op}: x must have shape [E, C, D] with E = {E}, got {list(x.shape)}"
        )
    else:
        torch._check_value(expert_offsets is not None, lambda: f"{op}: expert_offsets [E + 1] is required for packed x")
        torch._check_value(
            expert_offsets.shape == (E + 1,),
            lambda: f"{op}: expert_offsets must have shape [E + 1] = [{E + 1}], got {list(expert_offsets.shape)}",
        )
        torch._check_type(
            expert_offsets.dtype == torch.int64,
            lambda: f"{op}: expert_offsets must have dtype int64, got {expert_offsets.dtype}",
        )
        check_same_device(op, "x", x, expert_offsets=expert_offsets)
    return pre_width, hidden


def check_like_x(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    check_dtype_like(op, name, t, "x", x)
    check_same_device(op, "x", x, **{name: t})


def check_expert_mlp_biases(op: str, x, w1, b1, b2, pre_width: int) -> None:
    check_like_x(op, "b1", b1, x)
    torch._check_value(
        b1.shape == (w1.shape[0], pre_width),
        lambda: f"{op}: b1 must have shape [E, F'] = {[w1.shape[0], pre_width]}, got {list(b1.shape)}",
    )
    check_like_x(op, "b2", b2, x)
    torch._check_value(
        b2.shape == (w1.shape[0], w1.shape[1]),
        lambda: f"{op}: b2 must have shape [E, D] = {[w1.shape[0], w1.shape[1]]}, got {list(b2.shape)}",
    )


def check_expert_offsets_values(op: str, offsets: list, rows: int) -> None:
    """The packed offsets' values (read on the host): offsets[0] = 0, non-decreasing, offsets[E] = M."""
    torch._check_value(offsets[0] == 0, lambda: f"{op}: expert_offsets[0] must be 0, got {offsets[0]}")
    for e in range(1, len(offsets)):
        torch._check_value(
            offsets[e] >= offsets[e - 1],
            lambda: (
                f"{op}: expert_offsets must be non-decreasing, got expert_offsets[{e}] = "
                f"{offsets[e]} < expert_offsets[{e - 1}] = {offsets[e - 1]}"
            ),
        )
    torch._check_value(
        offsets[-1] == rows, lambda: f"{op}: expert_offsets[E] must be M = {rows} (the rows of x), got {offsets[-1]}"
    )


# ---- Soft MoE ----


def check_soft_inputs(op: str, features: torch.Tensor, features_name: str, logits: torch.Tensor) -> None:
    """features [G, *, D] (x [G, T, D] or y [G, S, D]) and logits [G, T, S] of one dtype and device."""
    letters = "[G, T, D]" if features_name == "x" else "[G, S, D]"
    torch._check_value(
        features.dim() == 3, lambda: f"{op}: {features_name} must have shape {letters}, got {list(features.shape)}"
    )
    check_float_dtype(op, features_name, features)
    torch._check_value(logits.dim() == 3, lambda: f"{op}: logits must have shape [G, T, S], got {list(logits.shape)}")
    check_dtype_like(op, "logits", logits, features_name, features)
    check_same_device(op, features_name, features, logits=logits)
    if features_name == "x":
        torch._check_value(
            logits.shape[0] == features.shape[0] and logits.shape[1] == features.shape[1],
            lambda: (
                f"{op}: logits must have shape [G, T, S] = [{features.shape[0]}, "
                f"{features.shape[1]}, S], got {list(logits.shape)}"
            ),
        )
        torch._check_value(
            features.shape[1] > 0 or features.shape[0] == 0 or logits.shape[2] == 0,
            lambda: (
                f"{op}: x has no tokens (T = 0), so the softmax over tokens that gives each slot "
                "its dispatch weights is undefined"
            ),
        )
    else:
        torch._check_value(
            logits.shape[0] == features.shape[0] and logits.shape[2] == features.shape[1],
            lambda: (
                f"{op}: logits must have shape [G, T, S] = [{features.shape[0]}, T, "
                f"{features.shape[1]}], got {list(logits.shape)}"
            ),
        )
        torch._check_value(
            features.shape[1] > 0 or features.shape[0] == 0 or logits.shape[1] == 0,
            lambda: (
                f"{op}: y has no slots (S = 0), so the softmax over slots that gives each token "
                "its combine weights is undefined"
            ),
        )


# ---- teacher-routing loss ----


def check_teacher_routing(op: str, student_logits, teacher, reduction: str, teacher_format: str) -> None:
    torch._check_value(
        reduction in REDUCTIONS, lambda: f'{op}: reduction must be "none", "mean" or "sum", got "{reduction}"'
    )
    torch._check_value(
        teacher_format in TEACHER_FORMATS,
        lambda: f'{op}: teacher_format must be "probabilities" or "logits", got "{teacher_format}"',
    )
    torch._check_value(
        student_logits.dim() == 2,
        lambda: f"{op}: student_logits must have shape [T, E], got {list(student_logits.shape)}",
    )
    check_floating(op, "student_logits", student_logits)
    torch._check_value(
        student_logits.shape[1] >= 1,
        lambda: f"{op}: student_logits must have E >= 1 experts, got shape {list(student_logits.shape)}",
    )
    torch._check_value(
        teacher.shape == student_logits.shape,
        lambda: (
            f"{op}: teacher must have the shape of student_logits ({list(student_logits.shape)}), "
            f"got {list(teacher.shape)}"
        ),
    )
    check_dtype_like(op, "teacher", teacher, "student_logits", student_logits)
    check_same_device(op, "student_logits", student_logits, teacher=teacher)


# ---- what-where attention ----


def check_whatwhere_operand(op: str, name: str, letters: str, t: torch.Tensor, expected: tuple, q: torch.Tensor):
    torch._check_value(t.dim() == len(expected), lambda: f"{op}: {name} must have shape {letters}, got {list(t.shape)}")
    for dim, size in enumerate(expected):
        if size is not None:
            torch._check_value(
                t.shape[dim] == size,
                lambda: f"{op}: {name} must have shape {letters}, got {list(t.shape)} (dimension {dim} must be {size})",
            )
    check_dtype_like(op, name, t, "q", q)
    check_same_device(op, "q", q, **{name: t})


def check_whatwhere(op: str, q, k, v_tokens, v_slots) -> tuple:
    """q [B, H, N, dh], k [B, H, S, dh], v_tokens [B, H, N, dv], v_slots [B, H, S, dv]; returns (B, H, N, S, dh,
    dv)."""
    torch._check_value(q.dim() == 4, lambda: f"{op}: q must have shape [B, H, N, dh], got {list(q.shape)}")
    check_float_dtype(op, "q", q)
    torch._check_value(
        q.shape[3] >= 1,
        lambda: (
            f"{op}: q must have dh >= 1 features per head (the logits are "
            f"scaled by 1 / sqrt(dh)), got shape {list(q.shape)}"
        ),
    )
    B, H, N, dh = q.shape
    check_whatwhere_operand(op, "k", "[B, H, S, dh]", k, (B, H, None, dh), q)
    check_whatwhere_operand(op, "v_tokens", "[B, H, N, dv]", v_tokens, (B, H, N, None), q)
    S, dv = k.shape[2], v_tokens.shape[3]
    check_whatwhere_operand(op, "v_slots", "[B, H, S, dv]", v_slots, (B, H, S, dv), q)
    return B, H, N, S, dh, dv


# ---- dispatch ----


def check_index(op: str, name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """A 1-D int64 index tensor on ``like``'s device."""
    torch._check_value(t.dim() == 1, lambda: f"{op}: {name} must be a 1-D tensor, got shape {list(t.shape)}")
    torch._check_type(t.dtype == torch.int64, lambda: f"{op}: {name} must have dtype int64, got {t.dtype}")
    check_same_device(op, like_name, like, **{name: t})


def check_make_plan(op: str, token_index, expert_index, num_experts: int, num_tokens) -> None:
    check_index(op, "token_index", token_index, "expert_index", expert_index)
    check_index(op, "expert_index", expert_index, "expert_index", expert_index)
    torch._check_value(
        token_index.shape[0] == expert_index.shape[0],
        lambda: (
            f"{op}: token_index and expert_index must have one length, got {token_index.shape[0]} "
            f"and {expert_index.shape[0]}"
        ),
    )
    torch._check_value(num_experts >= 1, lambda: f"{op}: num_experts must be >= 1, got {num_experts}")
    torch._check_value(
        num_tokens is None or num_tokens >= 0, lambda: f"{op}: num_tokens must be >= 0, got {num_tokens}"
    )


def check_teacher_routing_values(
    op: str, student_logits: torch.Tensor, teacher: torch.Tensor, teacher_format: str
) -> None:
    """The kernels' value checks (on CPU and CUDA alike): every student logit finite, and the teacher finite
    logits or finite probabilities >= 0. Names the first entry of the first offending token, the student's
    before the teacher's, as the kernels do."""
    student_bad = ~torch.isfinite(student_logits)
    teacher_bad = ~torch.isfinite(teacher)
    if teacher_format == "probabilities":
        teacher_bad |= teacher < 0
    bad_tokens = (student_bad.any(-1) | teacher_bad.any(-1)).nonzero()
    if bad_tokens.numel() == 0:
        return
    t = int(bad_tokens[0, 0])
    if student_bad[t].any():
        e = int(student_bad[t].nonzero()[0, 0])
        raise ValueError(
            f"{op}: student_logits must be finite, got student_logits[{t}, {e}] = {float(student_logits[t, e])}"
        )
    e = int(teacher_bad[t].nonzero()[0, 0])
    if teacher_format == "logits":
        raise ValueError(
            f'{op}: teacher must be finite logits (teacher_format="logits"), got teacher[{t}, {e}] = '
            f"{float(teacher[t, e])}"
        )
    raise ValueError(
        f'{op}: teacher must hold probabilities, finite and >= 0 (teacher_format="probabilities"), '
        f"got teacher[{t}, {e}] = {float(teacher[t, e])}"
    )
