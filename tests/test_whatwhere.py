"""What-where attention: reference agreement, softmax axes, gradcheck, opcheck, torch.compile, bad input."""

import pytest
import torch
from op_contract import OpTester

from visionmoe import ops
from visionmoe import reference as ref

# The operator accumulates in float32 (float64 for float64) and rounds each output once; the oracle is the
# reference in float64 on the same input values. float16 and bfloat16 logits are rounded to the input dtype
# before the softmaxes (|logits| up to about 4 here: half an ulp is 2e-3 in float16, 1.6e-2 in bfloat16), and
# the gradients add float32 rounding of sums over N and S.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=3e-2),
}

SHAPES = [
    # (B, H, N, S, dh, dv)
    (2, 3, 7, 5, 8, 8),
    (1, 2, 1, 4, 6, 6),  # one token: the softmax over tokens is all ones
    (2, 1, 9, 1, 4, 4),  # one slot: the softmax over slots is all ones
    (1, 2, 13, 16, 16, 12),  # value width differs from the key width
    (1, 1, 4, 37, 5, 3),  # more slots than tokens; widths not multiples of the vector width
    (2, 2, 196, 16, 64, 64),  # a WWT-B/16 head at 224 px
]

OUTPUTS = ("token_update", "slot_update", "logits")
INPUTS = ("q", "k", "v_tokens", "v_slots", "where")


def make_inputs(B, H, N, S, dh, dv, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    return draw(B, H, N, dh), draw(B, H, S, dh), draw(B, H, N, dv), draw(B, H, S, dv), draw(B, H, N, S)


def make_output_grads(B, H, N, S, dh, dv, dtype, device, seed=1):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    return draw(B, H, N, dv), draw(B, H, S, dv), draw(B, H, N, S)


def outputs_and_grads(function, inputs, output_grads):
    """(outputs, gradients of every input) of ``function``, given gradients for those outputs that have them."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    outputs = function(*leaves)
    used = [(out, grad) for out, grad in zip(outputs, output_grads) if grad is not None]
    grads = torch.autograd.grad([out for out, _ in used], leaves, [grad for _, grad in used], allow_unused=True)
    grads = [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(leaves, grads)]
    return list(outputs), grads


def oracle(inputs, output_grads):
    """The reference in float64 on the same values."""
    wide = [x.double() for x in inputs]
    wide_grads = [None if g is None else g.double() for g in output_grads]
    return outputs_and_grads(ref.whatwhere_attention, wide, wide_grads)


def assert_matches_oracle(inputs, output_grads, tolerance):
    outputs, grads = outputs_and_grads(ops.whatwhere_attention, inputs, output_grads)
    expected_outputs, expected_grads = oracle(inputs, output_grads)
    for name, out, expected in zip(OUTPUTS, outputs, expected_outputs):
        assert out.dtype == inputs[0].dtype and out.shape == expected.shape, name
        torch.testing.assert_close(out.double(), expected, **tolerance, msg=lambda m: f"{name}: {m}")
    for name, grad, expected in zip(INPUTS, grads, expected_grads):
        assert grad.dtype == inputs[0].dtype and grad.shape == expected.shape, name
        torch.testing.assert_close(grad.double(), expected, **tolerance, msg=lambda m: f"grad of {name}: {m}")


def transposed_storage(t):
    """The same values in a non-contiguous layout."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def op_samples(device, dtype, contiguous, with_grads):
    shape = (2, 2, 6, 4, 5, 3)
    inputs = make_inputs(*shape, dtype, device)
    output_grads = make_output_grads(*shape, dtype, device)
    if not contiguous:
        inputs, output_grads = map(transposed_storage, inputs), map(transposed_storage, output_grads)
    inputs, output_grads = tuple(inputs), tuple(output_grads)
    _, _, logits, token_logsumexp, slot_logsumexp = torch.ops.visionmoe.whatwhere_attention(*inputs)
    grads = output_grads if with_grads else (None, output_grads[1], None)
    return {
        "whatwhere_attention": tuple(x.clone().requires_grad_() for x in inputs),
        "whatwhere_attention_backward": (*grads, *inputs[:4], logits, token_logsumexp, slot_logsumexp),
    }


def what_where_block(q, k, v_tokens, v_slots, where):
    token_update, slot_update, logits = ops.whatwhere_attention(q, k, v_tokens, v_slots, where)
    return token_update.tanh().sum(dim=-1), slot_update.square().mean(dim=-1), torch.sigmoid(logits)


class TestWhatWhereAttention(OpTester):
    op = staticmethod(ops.whatwhere_attention)
    reference = staticmethod(ref.whatwhere_attention)
    dtypes = list(TOLERANCES)
    cases = SHAPES
    accuracy = TOLERANCES
    # Against the reference in float32 too, on every shape: both accumulate in float32.
    tolerances = {torch.float32: dict(atol=2e-5, rtol=2e-5)}
    gradcheck_cases = [(1, 2, 3, 4, 5, 3), (2, 1, 1, 3, 2, 2), (1, 1, 4, 1, 3, 2), (1, 1, 5, 3, 2, 4)]
    opcheck_cases = [
        (name, dtype, contiguous, with_grads)
        for name in ("whatwhere_attention", "whatwhere_attention_backward")
        for dtype in (torch.float32, torch.float64, torch.bfloat16)
        for contiguous in (True, False)
        for with_grads in (True, False)
    ]

    def sample_inputs(self, device, dtype, shape):
        return [x.requires_grad_() for x in make_inputs(*shape, dtype, device)]

    op_samples = staticmethod(op_samples)

    compile_fn = staticmethod(what_where_block)

    def compile_inputs(self, device):
        # A second size must reuse the dynamic graph, not break it.
        return [
            self.sample_inputs(device, torch.float32, shape) for shape in ((2, 3, 12, 4, 8, 8), (3, 2, 17, 6, 8, 5))
        ]

    def determinism_inputs(self, device):
        return self.sample_inputs(device, torch.float32, (4, 3, 300, 16, 64, 64))  # several chunks of rows per head


@pytest.mark.parametrize(
    "used", [(True, False, False), (False, True, False), (False, False, True), (True, False, True), (False, True, True)]
)
def test_gradients_of_a_subset_of_the_outputs(device, used):
    # Outputs nothing depends on bring no gradient; the backward skips their terms.
    shape = (2, 2, 11, 6, 8, 5)
    inputs = make_inputs(*shape, torch.float64, device)
    output_grads = [g if u else None for g, u in zip(make_output_grads(*shape, torch.float64, device), used)]
    assert_matches_oracle(inputs, output_grads, TOLERANCES[torch.float64])


def test_softmax_axes(device):
    # With v_slots = I (dv = S), token_update[n] is row n of the softmax over tokens, whose columns sum to 1;
    # with v_tokens = I (dv = N), slot_update[s] is column s of the softmax over slots, whose rows sum to 1.
    B, H, N, S, dh = 2, 3, 10, 4, 8
    q, k, _, _, where = make_inputs(B, H, N, S, dh, 1, torch.float64, device)
    eye_slots = torch.eye(S, dtype=torch.float64, device=device).expand(B, H, S, S)
    eye_tokens = torch.eye(N, dtype=torch.float64, device=device).expand(B, H, N, N)
    token_update, _, logits = ops.whatwhere_attention(
        q, k, torch.zeros(B, H, N, S, dtype=torch.float64, device=device), eye_slots, where
    )
    torch.testing.assert_close(token_update, torch.softmax(logits, dim=-2))
    torch.testing.assert_close(token_update.sum(dim=-2), torch.ones(B, H, S, dtype=torch.float64, device=device))
    _, slot_update, _ = ops.whatwhere_attention(
        q, k, eye_tokens, torch.zeros(B, H, S, N, dtype=torch.float64, device=device), where
    )
    torch.testing.assert_close(slot_update, torch.softmax(logits, dim=-1).transpose(-1, -2))
    torch.testing.assert_close(slot_update.sum(dim=-2), torch.ones(B, H, N, dtype=torch.float64, device=device))


def test_logits_and_logsumexps(device):
    shape = (2, 2, 9, 5, 4, 3)
    q, k, v_tokens, v_slots, where = make_inputs(*shape, torch.float64, device)
    _, _, logits, token_logsumexp, slot_logsumexp = torch.ops.visionmoe.whatwhere_attention(
        q, k, v_tokens, v_slots, where
    )
    expected_logits = where + q @ k.transpose(-1, -2) / 2.0  # sqrt(dh) = 2
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(token_logsumexp, torch.logsumexp(expected_logits, dim=-1))
    torch.testing.assert_close(slot_logsumexp, torch.logsumexp(expected_logits, dim=-2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_logsumexps_are_kept_in_float32(device, dtype):
    inputs = make_inputs(1, 2, 5, 3, 4, 4, dtype, device)
    _, _, logits, token_logsumexp, slot_logsumexp = torch.ops.visionmoe.whatwhere_attention(*inputs)
    assert token_logsumexp.dtype == slot_logsumexp.dtype == torch.float32
    # Computed from the logits as rounded to the input dtype, which the backward recomputes the softmaxes from.
    torch.testing.assert_close(token_logsumexp, torch.logsumexp(logits.float(), dim=-1))
    torch.testing.assert_close(slot_logsumexp, torch.logsumexp(logits.float(), dim=-2))


def test_masked_and_widely_spread_where(device):
    # where-maps may mask pairs with -inf (as long as every row and column keeps one finite entry) and may
    # spread the logits over thousands: the softmaxes and their recomputation in the backward stay exact.
    shape = (1, 2, 12, 6, 8, 8)
    q, k, v_tokens, v_slots, where = make_inputs(*shape, torch.float64, device)
    where = where * 1000.0
    mask = torch.rand(where.shape, generator=torch.Generator().manual_seed(3)).to(device) < 0.3
    mask[..., torch.arange(6), torch.arange(6)] = False  # token n < 6 keeps slot n
    mask[..., 6:, 0] = False  # tokens 6.. keep slot 0
    where = where.masked_fill(mask, float("-inf"))
    output_grads = make_output_grads(*shape, torch.float64, device)
    inputs = (q, k, v_tokens, v_slots, where)
    outputs, grads = outputs_and_grads(ops.whatwhere_attention, inputs, output_grads)
    expected_outputs, expected_grads = oracle(inputs, output_grads)
    for got, expected in zip(outputs + grads, expected_outputs + expected_grads):
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
    # Masked pairs have zero probability under both softmaxes: only the logits' own gradient reaches where.
    assert torch.isfinite(grads[4]).all() and torch.equal(grads[4][mask], output_grads[2][mask])


def test_non_contiguous_inputs(device):
    # Any layout is accepted: strided views are copied to contiguous memory by the operator.
    B, H, N, S, dh, dv = 2, 3, 8, 5, 6, 4
    q, k, v_tokens, v_slots, where = make_inputs(B, H, N, S, dh, dv, torch.float64, device)
    inputs = (
        q.transpose(1, 2).contiguous().transpose(1, 2),  # [B, H, N, dh] stored as [B, N, H, dh]
        k.transpose(-1, -2).contiguous().transpose(-1, -2),
        v_tokens[..., :dv],
        torch.cat([v_slots, v_slots], dim=-1)[..., ::2],
        where.transpose(0, 1).contiguous().transpose(0, 1),
    )
    assert not any(x.is_contiguous() for x in inputs[:2] + inputs[3:])
    grads = make_output_grads(B, H, N, S, dh, dv, torch.float64, device)
    grads = tuple(g.transpose(-1, -2).contiguous().transpose(-1, -2) for g in grads)
    assert_matches_oracle(inputs, grads, TOLERANCES[torch.float64])


@pytest.mark.parametrize("shape", [(0, 2, 5, 3, 4, 4), (2, 1, 0, 3, 4, 4), (2, 1, 5, 0, 4, 4), (1, 2, 5, 3, 4, 0)])
def test_empty_dimensions(device, shape):
    # No tokens or no slots: every update is an empty sum, so zero, as the reference's einsums give.
    inputs = make_inputs(*shape, torch.float32, device)
    assert_matches_oracle(inputs, make_output_grads(*shape, torch.float32, device), TOLERANCES[torch.float32])


def test_autograd_saves_no_probability_tensor(device):
    # The inputs, the logits (an output) and two log-sum-exps [B, H, N] and [B, H, S]: no [B, H, N, S]
    # softmax is kept from the forward to the backward.
    B, H, N, S, dh, dv = 2, 3, 10, 4, 8, 6
    inputs = [x.requires_grad_() for x in make_inputs(B, H, N, S, dh, dv, torch.float32, device)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _, _, logits = ops.whatwhere_attention(*inputs)
    assert [tuple(t.shape) for t in saved] == [
        (B, H, N, dh),
        (B, H, S, dh),
        (B, H, N, dv),
        (B, H, S, dv),
        (B, H, N, S),
        (B, H, N),
        (B, H, S),
    ]
    assert all(saved_tensor is given for saved_tensor, given in zip(saved, inputs[:4]))
    assert torch.equal(saved[4], logits)


def test_deterministic_and_independent_of_the_thread_count():
    shape = (4, 3, 70, 16, 32, 32)
    inputs = make_inputs(*shape, torch.float32, "cpu")
    output_grads = make_output_grads(*shape, torch.float32, "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (threads, threads, 1):
            torch.set_num_threads(num_threads)
            outputs, grads = outputs_and_grads(ops.whatwhere_attention, inputs, output_grads)
            results.append(list(outputs) + list(grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_gradcheck_of_one_output_at_a_time(device):
    inputs = [x.requires_grad_() for x in make_inputs(1, 2, 4, 3, 3, 2, torch.float64, device)]
    for index in range(3):
        assert torch.autograd.gradcheck(lambda *xs: ops.whatwhere_attention(*xs)[index], inputs)


# ---- bad input: clear errors naming the argument ----


def good_inputs(dtype=torch.float32, device="cpu"):
    return list(make_inputs(2, 3, 5, 4, 6, 7, dtype, device))


def test_wrong_rank_is_rejected():
    for index, name, letters in (
        (0, "q", "B, H, N, dh"),
        (1, "k", "B, H, S, dh"),
        (2, "v_tokens", "B, H, N, dv"),
        (3, "v_slots", "B, H, S, dv"),
        (4, "where", "B, H, N, S"),
    ):
        inputs = good_inputs()
        inputs[index] = inputs[index][0]
        with pytest.raises(ValueError, match=rf"whatwhere_attention: {name} must have shape \[{letters}\], got"):
            ops.whatwhere_attention(*inputs)


@pytest.mark.parametrize(
    "index,size,message",
    [
        (1, (3, 3, 4, 6), r"k must have shape \[B, H, S, dh\] with B, H and dh of q .* \(dimension 0 must be 2\)"),
        (1, (2, 3, 4, 5), r"k must have shape \[B, H, S, dh\] .* \(dimension 3 must be 6\)"),
        (2, (2, 3, 6, 7), r"v_tokens must have shape \[B, H, N, dv\] .* \(dimension 2 must be 5\)"),
        (3, (2, 3, 5, 7), r"v_slots must have shape \[B, H, S, dv\] .*S of k.* \(dimension 2 must be 4\)"),
        (3, (2, 3, 4, 8), r"v_slots must have shape \[B, H, S, dv\] .*dv of v_tokens.* \(dimension 3 must be 7\)"),
        (4, (2, 3, 5, 5), r"where must have shape \[B, H, N, S\] .* \(dimension 3 must be 4\)"),
        (4, (2, 2, 5, 4), r"where must have shape \[B, H, N, S\] .* \(dimension 1 must be 3\)"),
    ],
)
def test_shape_mismatch_names_the_argument(index, size, message):
    inputs = good_inputs()
    inputs[index] = torch.randn(size)
    with pytest.raises(ValueError, match=message):
        ops.whatwhere_attention(*inputs)


def test_wrong_dtype_is_rejected():
    inputs = good_inputs()
    inputs[3] = inputs[3].double()
    with pytest.raises(TypeError, match=r"v_slots must have the dtype of q \(Float\), got Double"):
        ops.whatwhere_attention(*inputs)
    with pytest.raises(TypeError, match="q must be float32, float64, float16 or bfloat16, got Long"):
        ops.whatwhere_attention(*[x.long() for x in good_inputs()])


def test_zero_width_heads_are_rejected():
    inputs = good_inputs()
    inputs[0], inputs[1] = inputs[0][..., :0], inputs[1][..., :0]
    with pytest.raises(ValueError, match=r"q must have dh >= 1 features per head"):
        ops.whatwhere_attention(*inputs)


def test_wrong_device_is_rejected():
    inputs = good_inputs()
    inputs[2] = inputs[2].to("meta")
    with pytest.raises(ValueError, match="whatwhere_attention: v_tokens must be on cpu like q, got meta"):
        ops.whatwhere_attention(*inputs)


@pytest.mark.cuda
def test_cpu_where_with_cuda_inputs_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    inputs = good_inputs(device="cuda")
    inputs[4] = inputs[4].cpu()
    with pytest.raises(ValueError, match="where must be on cuda:0 like q, got cpu"):
        ops.whatwhere_attention(*inputs)


def test_backward_operator_checks_its_arguments():
    q, k, v_tokens, v_slots, where = good_inputs()
    _, _, logits, token_logsumexp, slot_logsumexp = torch.ops.visionmoe.whatwhere_attention(
        q, k, v_tokens, v_slots, where
    )
    backward = torch.ops.visionmoe.whatwhere_attention_backward
    saved = (q, k, v_tokens, v_slots, logits, token_logsumexp, slot_logsumexp)
    with pytest.raises(ValueError, match=r"grad_token_update must have shape \[B, H, N, dv\] like token_update"):
        backward(torch.randn(2, 3, 5, 6), None, None, *saved)
    with pytest.raises(TypeError, match=r"grad_slot_update must have the dtype of q \(Float\), got Double"):
        backward(None, torch.randn(2, 3, 4, 7, dtype=torch.float64), None, *saved)
    with pytest.raises(ValueError, match=r"grad_logits must have shape \[B, H, N, S\]"):
        backward(None, None, torch.randn(2, 3, 4, 5), *saved)
    with pytest.raises(ValueError, match=r"token_logsumexp must have shape \[B, H, N\] = \[2, 3, 5\]"):
        backward(None, None, None, *saved[:5], slot_logsumexp, slot_logsumexp)
    with pytest.raises(TypeError, match=r"slot_logsumexp must have dtype Float \(the opmath type of q's Float\)"):
        backward(None, None, None, *saved[:6], slot_logsumexp.double())
    with pytest.raises(ValueError, match=r"logits must have shape \[B, H, N, S\]"):
        backward(None, None, None, *saved[:4], logits[:, :, :4], *saved[5:])
