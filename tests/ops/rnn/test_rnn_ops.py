"""The RNN ops themselves (torch.ops.fastner.rnn_layer_forward / rnn_layer_backward):
against a one-layer torch.nn module, gradcheck in float64, torch.library.opcheck, and
gradcheck through the fastner.nn modules.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastner.nn
import fastner.ops  # noqa: F401  (registers fake kernels and autograd formulas)
from fastner._extension import has_kernel
from tests.ops.rnn.rnn_cases import MODES, case_generator, fastner_class
from tests.ops.rnn.samples import OP_MODE, OPS, LayerCase, sample_inputs


needs_kernels = pytest.mark.skipif(
    not all(has_kernel(op, "cpu") for op in OPS), reason="the RNN ops have no CPU kernel in this build"
)


def test_rnn_ops_have_cpu_kernels():
    # A silent fall back to the reference would hide a broken build behind passing tests.
    missing = [op for op in OPS if not has_kernel(op, "cpu")]
    assert not missing, f"no CPU kernel for {missing}: {fastner.backend()}"


def _forward(x, lengths, weights, hx, cx, mode, bidirectional, batch_first, training):
    return torch.ops.fastner.rnn_layer_forward(
        x, lengths, weights, hx, cx, OP_MODE[mode], bidirectional, batch_first, training
    )


def _torch_layer(module, x, lengths, hx, cx, batch_first):
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out, state = module(packed, (hx, cx) if cx is not None else hx)
    out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=x.shape[1 if batch_first else 0])
    return (out,) + (state if isinstance(state, tuple) else (state,))


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_layer_op_matches_torch_forward_and_backward(mode, dtype):
    gen = case_generator(MODES.index(mode) * 2 + (dtype == torch.float64), salt=211)
    for _ in range(3):
        # lengths >= 1, so torch can pack
        case = LayerCase.draw(gen, mode, dtype, min_length=1)
        module, x, lengths, hx, cx = case.module, case.x, case.lengths, case.hx, case.cx
        bidirectional, batch_first = case.bidirectional, case.batch_first
        leaves = [x.requires_grad_(), hx.requires_grad_()] + ([cx.requires_grad_()] if cx is not None else [])
        expected = _torch_layer(module, x, lengths, hx, cx, batch_first)
        weights = case.weights(requires_grad=True)
        got = _forward(x, lengths, weights, hx, cx, mode, bidirectional, batch_first, True)
        got = got[:3] if mode == "LSTM" else got[:2]
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, **_tol(dtype))
        cots = [torch.randn(e.shape, generator=gen, dtype=dtype) for e in expected]
        exp_grads = torch.autograd.grad(sum((e * c).sum() for e, c in zip(expected, cots)), leaves + module._flat_weights)
        got_grads = torch.autograd.grad(sum((g * c).sum() for g, c in zip(got, cots)), leaves + weights)
        for i, (g, e) in enumerate(zip(got_grads, exp_grads)):
            torch.testing.assert_close(g, e, **_tol(dtype), msg=lambda m, i=i: f"grad {i}: {m}")

        # inference (training=False) gives the same values and keeps no workspace
        with torch.no_grad():
            inference = _forward(x, lengths, weights, hx, cx, mode, bidirectional, batch_first, False)
        assert inference[3].numel() == 0
        for g, e in zip(inference[:3] if mode == "LSTM" else inference[:2], expected):
            torch.testing.assert_close(g, e, **_tol(dtype))


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
def test_layer_op_zero_length_keeps_initial_state(mode):
    gen = case_generator(MODES.index(mode), salt=223)
    case = LayerCase(gen, mode, torch.float64, batch=3, time_len=5, input_size=3, hidden=4, bidirectional=True,
                     batch_first=False, bias=True, lengths=[5, 0, 2])
    x, lengths, weights, hx, cx = case.inputs()
    out, h_n, c_n, _ = _forward(x, lengths, weights, hx, cx, mode, True, False, True)
    assert bool((out[:, 1] == 0).all()) and bool((out[2:, 2] == 0).all())
    assert torch.equal(h_n[:, 1], hx[:, 1])
    if mode == "LSTM":
        assert torch.equal(c_n[:, 1], cx[:, 1])
    else:
        assert c_n.numel() == 0


@needs_kernels
@pytest.mark.parametrize("bidirectional,batch_first,bias", [(True, False, True), (False, True, False)])
@pytest.mark.parametrize("mode", MODES)
def test_layer_op_gradcheck(mode, bidirectional, batch_first, bias):
    gen = case_generator(MODES.index(mode), salt=227)
    # full, length 1, and an empty sequence
    case = LayerCase(gen, mode, torch.float64, batch=3, time_len=4, input_size=3, hidden=2,
                     bidirectional=bidirectional, batch_first=batch_first, bias=bias, lengths=[4, 1, 0])
    x, lengths, weights, hx, cx = case.inputs(requires_grad=True)
    count = len(weights)

    def fn(x, hx, *rest):
        cx, ws = (rest[0], list(rest[1:])) if mode == "LSTM" else (None, list(rest))
        out, h_n, c_n, _ = _forward(x, lengths, ws, hx, cx, mode, bidirectional, batch_first, True)
        return (out, h_n, c_n) if mode == "LSTM" else (out, h_n)

    args = (x, hx) + ((cx,) if cx is not None else ()) + tuple(weights)
    assert len(args) == 2 + (mode == "LSTM") + count
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


OPCHECK_GRID = list(itertools.product(MODES, [True, False], [False, True]))


@needs_kernels
@pytest.mark.parametrize("mode,bidirectional,with_hx", OPCHECK_GRID)
def test_opcheck_rnn_layer_forward(mode, bidirectional, with_hx):
    gen = case_generator(OPCHECK_GRID.index((mode, bidirectional, with_hx)), salt=229)
    # both layouts covered across the grid (opcheck's cost goes with its count of calls)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    for training in (True, False):
        for args in sample_inputs("rnn_layer_forward", dtype=torch.float32, modes=[mode], bidirectional=[bidirectional],
                                  batch_first=[bidirectional], with_state=[with_hx], requires_grad=training,
                                  training=training, seed=seed + training):
            torch.library.opcheck(torch.ops.fastner.rnn_layer_forward.default, args)


@needs_kernels
@pytest.mark.parametrize("mode,bidirectional,with_hx", OPCHECK_GRID)
def test_opcheck_rnn_layer_backward(mode, bidirectional, with_hx):
    gen = case_generator(OPCHECK_GRID.index((mode, bidirectional, with_hx)), salt=233)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    for args in sample_inputs("rnn_layer_backward", dtype=torch.float64, modes=[mode], bidirectional=[bidirectional],
                              batch_first=[not bidirectional], with_state=[with_hx], seed=seed):
        torch.library.opcheck(torch.ops.fastner.rnn_layer_backward.default, args)


# ---------------------------------------------------------------------------------------------
# gradcheck through the modules (both backends)
# ---------------------------------------------------------------------------------------------


GRADCHECK_FORMS = ["padded", "lengths", "packed_unsorted"]


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("form", GRADCHECK_FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_module_gradcheck(mode, form, backend, monkeypatch):
    if backend == "reference":
        monkeypatch.setenv("FASTNER_BACKEND", "reference")
    gen = case_generator(MODES.index(mode) * 3 + GRADCHECK_FORMS.index(form), salt=239)
    kwargs = {"nonlinearity": "relu" if mode == "RNN_RELU" else "tanh"} if mode.startswith("RNN") else {}
    batch_first = form == "lengths"
    module = fastner_class(mode)(3, 2, num_layers=2, bidirectional=True, batch_first=batch_first, **kwargs).double()
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    x = torch.randn((3, 4, 3) if batch_first else (4, 3, 3), generator=gen, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 1, 3])

    def fn(x, h0, c0, *ps):
        hx = (h0, c0) if mode == "LSTM" else h0
        state = dict(zip(names, ps))
        if form == "padded":
            out, h_n = torch.func.functional_call(module, state, (x, hx))
        elif form == "lengths":
            out, h_n = torch.func.functional_call(module, state, (x, hx), {"lengths": lengths})
        else:
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            out, h_n = torch.func.functional_call(module, state, (packed, hx))
            out = out.data
        return (out,) + (h_n if isinstance(h_n, tuple) else (h_n,))

    inputs = (x, h0, c0 if mode == "LSTM" else c0.detach()) + tuple(params)
    # fast_mode checks random projections of the Jacobian: the same bugs, a fraction of the time.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# fastner.ops.rnn_layer: fused kernel against the reference (lengths 0 included), and dispatch
# ---------------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_rnn_layer_fused_matches_reference(mode, dtype, monkeypatch):
    from fastner import ops

    gen = case_generator(MODES.index(mode) * 2 + (dtype == torch.float64), salt=241)
    for _ in range(3):
        case = LayerCase.draw(gen, mode, dtype, min_length=1)
        x, lengths, hx, cx = case.x, case.lengths, case.hx, case.cx
        bidirectional, batch_first = case.bidirectional, case.batch_first
        lengths[int(torch.randint(0, len(lengths), (1,), generator=gen))] = 0  # empty sequences too
        with_hx = bool(torch.rand((), generator=gen) < 0.5)
        hx, cx = (hx, cx) if with_hx else (None, None)
        leaves = [x] + ([hx] if hx is not None else []) + ([cx] if cx is not None else [])
        results = {}
        for backend in ("fused", "reference"):
            monkeypatch.setenv("FASTNER_BACKEND", "reference" if backend == "reference" else "auto")
            ls = [t.detach().clone().requires_grad_() for t in leaves]
            ws = case.weights(requires_grad=True)
            lx, lhx, lcx = ls[0], (ls[1] if hx is not None else None), (ls[2] if cx is not None else None)
            out = ops.rnn_layer(lx, lengths, ws, lhx, lcx, OP_MODE[mode], bidirectional, batch_first)
            out = [o for o in out if o.numel() > 0]
            cot = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=dtype) for i, o in enumerate(out)]
            grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(out, cot)), ls + ws)
            results[backend] = [o.detach() for o in out] + list(grads)
        assert len(results["fused"]) == len(results["reference"])
        for i, (g, e) in enumerate(zip(results["fused"], results["reference"])):
            torch.testing.assert_close(g, e, **_tol(dtype), msg=lambda m, i=i: f"item {i}: {m}")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_backend_env_var_picks_the_path(backend, monkeypatch):
    # FASTNER_BACKEND is read at each call: the reference tests really test the reference.
    from fastner import reference

    calls = []
    real = reference.rnn_layer
    monkeypatch.setattr(reference, "rnn_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("FASTNER_BACKEND", backend)
    module = fastner.nn.GRU(3, 4, num_layers=2)
    module(torch.randn(5, 2, 3))
    if backend == "reference" or not has_kernel("rnn_layer_forward", "cpu"):
        assert len(calls) == 2  # one per layer
    else:
        assert calls == []


@needs_kernels
def test_torch_compile_traces_rnn_layer_without_graph_breaks():
    # DESIGN: torch.compile and torch.export must trace through the ops (register_fake). The
    # modules themselves are skipped by Dynamo (it refuses nn.RNNBase subclasses), so trace the op
    # entry point: fullgraph=True fails on any graph break, e.g. an untraceable backend check.
    torch._dynamo.reset()
    gen = case_generator(0, salt=251)
    case = LayerCase(gen, "LSTM", torch.float32, batch=4, time_len=7, input_size=6, hidden=5, bidirectional=True,
                     batch_first=True, bias=True, lengths=[7, 3, 1, 5], with_state=False)
    x, lengths, weights, _, _ = case.inputs(requires_grad=True)

    def step(x, weights):
        out, h_n, c_n = fastner.ops.rnn_layer(x, lengths, weights, None, None, "lstm", True, True)
        return out.square().sum() + h_n.sum() + c_n.sum()

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(x, weights)
    expected = step(x, weights)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got_grads = torch.autograd.grad(got, [x] + weights)
    exp_grads = torch.autograd.grad(expected, [x] + weights)
    for g, e in zip(got_grads, exp_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
