"""The operator-test contract of DESIGN.md, written once (as torchvision's ``RoIOpTester``).

A family's test file subclasses ``OpTester`` with a ``Test`` name and gets, on the CPU and (through the ``device``
fixture) on CUDA: agreement of values and of gradients with the pure-PyTorch reference in every dtype it lists,
gradcheck in float64, ``torch.library.opcheck`` on the raw operators, ``torch.compile(fullgraph=True,
dynamic=True)`` with the aot_eager backend, and determinism. The family file keeps only its hand-computed cases
and the tests particular to it.

Cases are class attributes, not fixtures, so that every case stays its own test (and its own line in a failure
report) while the inputs, which need the device, are built inside the test.
"""

import torch


class OpTester:
    # Each of these lists parametrizes the test argument of the same name without the "s" (see
    # pytest_generate_tests); a family sets the ones its inputs need.
    dtypes = (torch.float32,)
    cases = (None,)
    gradcheck_cases = (None,)
    opcheck_cases = (None,)

    # dtype -> keyword arguments of torch.testing.assert_close for values and gradients, against the reference
    # run in the same dtype.
    tolerances = {}
    # dtype -> the tolerances above for gradients, where a family's differ from those for values.
    grad_tolerances = {}
    # dtype -> keyword arguments of assert_close for the op in that dtype against the reference in float64: a
    # family that lists a dtype here says how close its reduced-precision kernels come to the truth, not only to
    # a reference that rounds alike. A value may also be a function of the float64 result, for errors that scale
    # with its magnitude. Every dtype in ``dtypes`` is in ``tolerances``, here, or both.
    accuracy = {}

    op = None  # the public function under test, called as op(*sample_inputs(...))
    reference = None  # its pure-PyTorch reference, with the same signature

    def pytest_generate_tests(self, metafunc):
        for name in ("dtype", "case", "gradcheck_case", "opcheck_case"):
            if name in metafunc.fixturenames:
                values = getattr(metafunc.cls, name + "s")
                metafunc.parametrize(name, values, ids=[str(value) for value in values])

    # ---- what a family provides ----

    def sample_inputs(self, device, dtype, case):
        """The arguments of ``op`` for one agreement case; floating tensors that require grad get gradients
        compared too."""
        raise NotImplementedError

    def gradcheck_inputs(self, device, case):
        """Float64 arguments of ``op`` on tiny shapes; gradcheck differentiates those that require grad. By
        default sample_inputs' in float64, ``gradcheck_cases`` being agreement cases."""
        return self.sample_inputs(device, torch.float64, case)

    def op_samples(self, device, *options):
        """``{raw operator name: its arguments}``, for the default opcheck_sample."""
        raise NotImplementedError

    def opcheck_sample(self, device, case):
        """``(overload, args)``: one raw operator and its arguments, for torch.library.opcheck. By default
        ``case`` is ``(name, *options)`` and the arguments those op_samples gives for ``name``."""
        name, *options = case
        return getattr(torch.ops.visionmoe, name).default, self.op_samples(device, *options)[name]

    def compile_fn(self, *args):
        """The function compiled with fullgraph=True; a family may wrap ``op`` in the code around it."""
        return self.op(*args)

    def compile_inputs(self, device):
        """Argument tuples of ``compile_fn`` of different sizes: the second must reuse the dynamic graph."""
        raise NotImplementedError

    def determinism_inputs(self, device):
        """Arguments of ``op`` large enough for a parallel kernel to reorder its sums if it could."""
        raise NotImplementedError

    def outputs(self, result):
        """The tensors of a result to compare; a family whose op returns an object says which of its fields."""
        return [result] if isinstance(result, torch.Tensor) else [t for t in result if isinstance(t, torch.Tensor)]

    # ---- the contract ----

    def test_matches_reference(self, device, dtype, case):
        self._check_agreement(device, dtype, case, gradients=False)

    def test_gradients_match_reference(self, device, dtype, case):
        self._check_agreement(device, dtype, case, gradients=True)

    def test_gradcheck(self, device, gradcheck_case):
        args = self.gradcheck_inputs(device, gradcheck_case)
        positions = [i for i, arg in enumerate(args) if _differentiable(arg)]

        def op_of_differentiable(*tensors):
            full = list(args)
            for i, tensor in zip(positions, tensors):
                full[i] = tensor
            # Only the differentiable outputs: gradcheck misaligns its Jacobians when integer ones come first.
            return tuple(out for out in self.outputs(self.op(*full)) if out.requires_grad)

        assert torch.autograd.gradcheck(op_of_differentiable, tuple(args[i] for i in positions))

    def test_opcheck(self, device, opcheck_case):
        overload, args = self.opcheck_sample(device, opcheck_case)
        torch.library.opcheck(overload, args)

    def test_compile_fullgraph_dynamic(self, device):
        torch._dynamo.reset()
        compiled = torch.compile(self.compile_fn, backend="aot_eager", fullgraph=True, dynamic=True)
        for args in self.compile_inputs(device):
            got, got_grads = self._run(compiled, args, loss="square")
            want, want_grads = self._run(self.compile_fn, args, loss="square")
            for a, b in zip(got + got_grads, want + want_grads):
                torch.testing.assert_close(a, b)

    def test_deterministic(self, device):
        # CUDA kernels promise determinism only under this flag (DESIGN.md); the CPU ones always. warn_only: the
        # flag still selects the deterministic kernels, but a cuBLAS call does not raise for want of
        # CUBLAS_WORKSPACE_CONFIG, which this test does not set; the comparison below is the check.
        previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(device.type == "cuda", warn_only=True)
        try:
            args = self.determinism_inputs(device)
            first, second = (self._run(self.op, args) for _ in range(2))
        finally:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        for a, b in zip(first[0] + first[1], second[0] + second[1]):
            assert torch.equal(a, b)

    # ---- helpers ----

    def _check_agreement(self, device, dtype, case, gradients):
        """The op's outputs, or the gradients of its differentiable arguments, against the reference's."""
        assert dtype in self.tolerances or dtype in self.accuracy, dtype
        part = 1 if gradients else 0
        args = self.sample_inputs(device, dtype, case)
        actual = self._run(self.op, args, backward=gradients)[part]
        assert actual, "nothing to compare"
        if dtype in self.tolerances:
            tolerance = self.grad_tolerances.get(dtype, self.tolerances[dtype]) if gradients else self.tolerances[dtype]
            expected = self._run(self.reference, args, backward=gradients)[part]
            assert len(actual) == len(expected)
            for got, want in zip(actual, expected):
                torch.testing.assert_close(got, want, **tolerance)
        if dtype in self.accuracy:
            exact = [arg.detach().double().requires_grad_(arg.requires_grad) if _floating(arg) else arg for arg in args]
            truth = self._run(self.reference, exact, backward=gradients, cotangent_dtype=dtype)[part]
            assert len(actual) == len(truth)
            for got, want in zip(actual, truth):
                tolerance = self.accuracy[dtype]
                tolerance = tolerance(want) if callable(tolerance) else tolerance
                if got.is_floating_point():
                    assert got.dtype == dtype  # the op computes in the sample's dtype, not in a wider one
                    got = got.double()
                torch.testing.assert_close(got, want, **tolerance)

    def _run(self, fn, args, backward=True, loss="cotangent", cotangent_dtype=None):
        """fn's output tensors and the gradients of its differentiable arguments, on fresh leaves so that two
        runs never share a .grad. The backward pass takes random cotangents from a fixed seed (the same for two
        functions whose outputs have the same shapes; rounded to ``cotangent_dtype`` first, so that a float64
        run sees the values a reduced-precision run saw), or, with loss="square", the sum of squares."""
        leaves = [arg.detach().clone().requires_grad_() if _differentiable(arg) else arg for arg in args]
        outputs = self.outputs(fn(*leaves))
        inputs = [leaf for leaf, arg in zip(leaves, args) if _differentiable(arg)]
        differentiable = [out for out in outputs if out.requires_grad]
        if not backward or not inputs or not differentiable:
            return [out.detach() for out in outputs], []
        if loss == "square":
            total = sum(out.float().square().sum() for out in differentiable)
            grads = torch.autograd.grad(total, inputs)
        else:
            generator = torch.Generator().manual_seed(1)
            cotangents = [
                torch.randn(out.shape, generator=generator, dtype=torch.float64)
                .to(cotangent_dtype or out.dtype)
                .to(out)
                for out in differentiable
            ]
            grads = torch.autograd.grad(differentiable, inputs, cotangents)
        return [out.detach() for out in outputs], list(grads)


def _differentiable(arg):
    return isinstance(arg, torch.Tensor) and arg.requires_grad


def _floating(arg):
    return isinstance(arg, torch.Tensor) and arg.is_floating_point()
