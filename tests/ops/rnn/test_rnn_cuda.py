"""The RNN ops on CUDA (csrc/cuda/rnn.cu): against cuDNN (torch.nn.LSTM / GRU / RNN on the GPU),
against the CPU kernel, both paths (persistent and step-wise kernels, forward and backward, forced through
FASTNER_RNN_CUDA_PATH), float16 / bfloat16 against a float64 oracle, autocast, gradcheck in
float64, torch.library.opcheck, streams, and bad input. Skips cleanly without a GPU.

Every case draws its sizes, lengths and values fresh from a generator seeded by the conftest
seed and the case's index. cuDNN's and cuBLAS's TF32 are switched off so that float32 results
are compared at float32 precision.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastner.ops  # noqa: F401  (registers fake kernels and autograd formulas)
from fastner._extension import has_kernel
from tests.ops.rnn.samples import MODES, OP_MODE, OPS, LayerCase, sample_inputs, torch_layer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _exact_float32():
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _generator(index, salt):
    gen = torch.Generator()
    gen.manual_seed(int(os.environ.get("FASTNER_TEST_SEED", "0")) * 1_000_003 + salt * 1009 + index)
    return gen


def _forward(case, x, lengths, weights, hx, cx, training=True):
    return torch.ops.fastner.rnn_layer_forward(
        x, lengths, weights, hx, cx, OP_MODE[case.mode], case.bidirectional, case.batch_first, training
    )


def _results(case, out):
    """The differentiable results the schema defines: (output, h_n[, c_n])."""
    return tuple(out[:3]) if case.mode == "LSTM" else tuple(out[:2])


def _cudnn(case, x, lengths, weights, hx, cx):
    """The same layer through torch.nn on x's device (cuDNN on the GPU), packed by lengths."""
    module = torch_layer(
        case.mode, case.input_size, case.hidden, case.bidirectional, case.bias, x.dtype, x.device
    )
    with torch.no_grad():
        for p, w in zip(module._flat_weights, weights):
            p.copy_(w)
    module.requires_grad_(True)
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=case.batch_first, enforce_sorted=False)
    out, state = module(packed, (hx, cx) if cx is not None else hx)
    out, _ = pad_packed_sequence(out, batch_first=case.batch_first, total_length=case.time_len)
    return (out,) + (state if isinstance(state, tuple) else (state,)), module._flat_weights


def _tol(dtype):
    return {
        torch.float64: dict(rtol=1e-9, atol=1e-9),
        torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.float16: dict(rtol=2e-2, atol=2e-2),
        torch.bfloat16: dict(rtol=8e-2, atol=8e-2),
    }[dtype]


def _grads(results, leaves, cotangents):
    loss = sum((r.float() * c).sum() for r, c in zip(results, cotangents))
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def _assert_all_close(got, expected, dtype, what):
    for i, (g, e) in enumerate(zip(got, expected)):
        if e is None:
            continue
        torch.testing.assert_close(g.double(), e.double(), **_tol(dtype), msg=lambda m, i=i: f"{what} {i}: {m}")


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def test_rnn_ops_have_cuda_kernels():
    # A silent fall back to the reference would hide a broken CUDA build behind passing tests.
    missing = [op for op in OPS if not has_kernel(op, "cuda")]
    assert not missing, f"no CUDA kernel for {missing}"


# ---------------------------------------------------------------------------------------------
# Parity: cuDNN and the CPU kernel
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_matches_cudnn_forward_and_backward(mode, dtype, rnn_cuda_path):
    for index in range(3):
        case = LayerCase.draw(_generator(index + 10 * MODES.index(mode), salt=1), mode, dtype, min_length=1)
        x, lengths, weights, hx, cx = case.inputs(DEVICE, requires_grad=True)
        leaves = [x, hx] + ([cx] if cx is not None else [])
        expected, ref_weights = _cudnn(case, x, lengths, weights, hx, cx)
        got = _results(case, _forward(case, x, lengths, weights, hx, cx, training=True))
        _assert_all_close(got, expected, dtype, "result")
        cots = [torch.randn(e.shape, dtype=dtype, device=DEVICE) for e in expected]
        _assert_all_close(_grads(got, leaves + weights, cots), _grads(expected, leaves + ref_weights, cots), dtype, "grad")
        with torch.no_grad():  # inference: same values, no workspace
            inference = _forward(case, x, lengths, weights, hx, cx, training=False)
        assert inference[3].numel() == 0
        _assert_all_close(_results(case, inference), expected, dtype, "inference result")


@pytest.mark.parametrize("mode", MODES)
def test_matches_cpu_kernel(mode, rnn_cuda_path):
    if not all(has_kernel(op, "cpu") for op in OPS):
        pytest.skip("no CPU kernel for the RNN ops in this build")
    for index in range(3):
        case = LayerCase.draw(_generator(index + 10 * MODES.index(mode), salt=2), mode, torch.float64)
        results, grads = [], []
        for device in ("cpu", DEVICE):
            x, lengths, weights, hx, cx = case.inputs(device, requires_grad=True)
            leaves = [x, hx] + ([cx] if cx is not None else []) + weights
            out = _results(case, _forward(case, x, lengths, weights, hx, cx))
            gen = _generator(index, salt=3)
            cots = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(device) for o in out]
            results.append([o.cpu() for o in out])
            grads.append([g.cpu() for g in _grads(out, leaves, cots)])
        _assert_all_close(results[1], results[0], torch.float64, "result")
        _assert_all_close(grads[1], grads[0], torch.float64, "grad")


@pytest.mark.parametrize("mode", MODES)
def test_zero_lengths_keep_initial_state(mode, rnn_cuda_path):
    case = LayerCase.draw(_generator(MODES.index(mode), salt=4), mode, torch.float64, max_batch=5, min_batch=2)
    case.lengths[-1] = case.time_len
    case.lengths[0] = 0
    x, lengths, weights, hx, cx = case.inputs(DEVICE)
    out, h_n, c_n, _ = _forward(case, x, lengths, weights, hx, cx)
    column = out[0] if case.batch_first else out[:, 0]
    assert bool((column == 0).all())
    assert torch.equal(h_n[:, 0], hx[:, 0])
    if mode == "LSTM":
        assert torch.equal(c_n[:, 0], cx[:, 0])
    else:
        assert c_n.numel() == 0


@pytest.mark.parametrize("mode", MODES)
def test_all_lengths_zero_and_empty_batch(mode, rnn_cuda_path):
    case = LayerCase.draw(_generator(MODES.index(mode), salt=5), mode, torch.float64)
    x, lengths, weights, hx, cx = case.inputs(DEVICE, requires_grad=True)
    lengths = torch.zeros_like(lengths)
    out, h_n, c_n, ws = _forward(case, x, lengths, weights, hx, cx)
    assert bool((out == 0).all()) and torch.equal(h_n, hx)
    grads = torch.autograd.grad(out.sum() + h_n.sum(), [x, hx] + weights)
    assert bool((grads[0] == 0).all()) and bool((grads[1] == 1).all())
    assert all(bool((g == 0).all()) for g in grads[2:])


def test_lengths_on_cpu_or_gpu_agree():
    case = LayerCase.draw(_generator(0, salt=6), "LSTM", torch.float64)
    x, lengths, weights, hx, cx = case.inputs(DEVICE)
    on_gpu = _forward(case, x, lengths, weights, hx, cx, training=False)
    on_cpu = _forward(case, x, lengths.cpu(), weights, hx, cx, training=False)
    for a, b in zip(on_gpu[:3], on_cpu[:3]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Low precision and autocast
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_matches_float64(mode, dtype, rnn_cuda_path):
    for index in range(2):
        case = LayerCase.draw(_generator(index + 10 * MODES.index(mode), salt=7), mode, torch.float64, max_hidden=48)
        x, lengths, weights, hx, cx = case.inputs(DEVICE, dtype=dtype, requires_grad=True)
        # The oracle runs in float64 from the same rounded values.
        to64 = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
        x64, hx64, cx64 = to64(x), to64(hx), to64(cx)
        w64 = [to64(w) for w in weights]
        got = _results(case, _forward(case, x, lengths, weights, hx, cx))
        expected = _results(case, _forward(case, x64, lengths, w64, hx64, cx64))
        for g in got:
            assert g.dtype == dtype
        _assert_all_close(got, expected, dtype, "result")
        cots = [torch.randn(e.shape, dtype=torch.float64, device=DEVICE) for e in expected]
        leaves = [x, hx] + ([cx] if cx is not None else []) + weights
        leaves64 = [x64, hx64] + ([cx64] if cx64 is not None else []) + w64
        got_grads = _grads(got, leaves, cots)
        exp_grads = _grads(expected, leaves64, cots)
        for g, leaf in zip(got_grads, leaves):
            assert g.dtype == dtype and g.shape == leaf.shape
        # Gradients sum over time and batch: compare relative to their scale.
        for i, (g, e) in enumerate(zip(got_grads, exp_grads)):
            scale = max(float(e.abs().max()), 1.0)
            torch.testing.assert_close(
                g.double() / scale, e / scale, **_tol(dtype), msg=lambda m, i=i: f"grad {i}: {m}"
            )


def test_autocast_runs_in_half_and_matches_float32():
    case = LayerCase.draw(_generator(0, salt=8), "LSTM", torch.float32, min_length=1)
    x, lengths, weights, hx, cx = case.inputs(DEVICE, requires_grad=True)
    expected = _results(case, _forward(case, x, lengths, weights, hx, cx))
    with torch.autocast("cuda", dtype=torch.float16):
        got = _results(case, _forward(case, x, lengths, weights, hx, cx))
    for g in got:
        assert g.dtype == torch.float16
    _assert_all_close(got, expected, torch.float16, "result")
    grads = torch.autograd.grad(sum(g.float().sum() for g in got), [x] + weights)
    assert grads[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads[1:])


def test_autocast_leaves_float64_alone():
    case = LayerCase.draw(_generator(1, salt=8), "GRU", torch.float64)
    x, lengths, weights, hx, cx = case.inputs(DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = _forward(case, x, lengths, weights, hx, cx, training=False)
    assert out[0].dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, streams
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional,batch_first,bias", [(True, False, True), (False, True, False)])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode, bidirectional, batch_first, bias, rnn_cuda_path):
    gen = _generator(MODES.index(mode), salt=9)
    # full, length 1, and an empty sequence
    case = LayerCase(gen, mode, torch.float64, batch=3, time_len=4, input_size=3, hidden=2,
                     bidirectional=bidirectional, batch_first=batch_first, bias=bias, lengths=[4, 1, 0])
    x, lengths, weights, hx, cx = case.inputs(DEVICE, requires_grad=True)

    def fn(x, hx, *rest):
        cx, ws = (rest[0], list(rest[1:])) if mode == "LSTM" else (None, list(rest))
        out = torch.ops.fastner.rnn_layer_forward(
            x, lengths, ws, hx, cx, OP_MODE[mode], bidirectional, batch_first, True
        )
        return tuple(out[:3]) if mode == "LSTM" else tuple(out[:2])

    args = (x, hx) + ((cx,) if cx is not None else ()) + tuple(weights)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode, training):
    # both directions and layouts, with and without an initial state
    for args in sample_inputs("rnn_layer_forward", DEVICE, torch.float32, modes=[mode], requires_grad=training,
                              training=training, seed=MODES.index(mode)):
        torch.library.opcheck(torch.ops.fastner.rnn_layer_forward.default, args)


def test_side_stream_gives_the_same_result():
    # Every launch and GEMM must follow the current stream (and its fork/join), not stream 0.
    case = LayerCase.draw(_generator(0, salt=11), "LSTM", torch.float32, max_batch=16, max_time=20)
    case.bidirectional = True
    case.module = torch_layer("LSTM", case.input_size, case.hidden, True, case.bias, torch.float32, "cpu")
    case.hx, case.cx = (torch.randn(2, case.batch, case.hidden) for _ in range(2))
    x, lengths, weights, hx, cx = case.inputs(DEVICE)
    expected = _forward(case, x, lengths, weights, hx, cx, training=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = _forward(case, x, lengths, weights, hx, cx, training=False)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for g, e in zip(got[:3], expected[:3]):
        assert torch.equal(g, e)


# ---------------------------------------------------------------------------------------------
# The fastner.nn modules on CUDA: PackedSequence and lengths=
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,form", list(itertools.product(MODES, ("packed", "lengths"))))
def test_module_matches_cudnn(mode, form):
    nn = pytest.importorskip("fastner.nn")
    if not hasattr(nn, "LSTM"):
        pytest.skip("fastner.nn has no RNN modules in this tree")
    gen = _generator(MODES.index(mode), salt=12)
    cls = {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(mode, getattr(nn, "RNN", None))
    kwargs = {"nonlinearity": "relu" if mode == "RNN_RELU" else "tanh"} if mode.startswith("RNN") else {}
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    ours = cls(7, 9, num_layers=2, bidirectional=True, batch_first=True, **kwargs).to(DEVICE)
    torch_cls = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU}.get(mode, torch.nn.RNN)
    ref = torch_cls(7, 9, num_layers=2, bidirectional=True, batch_first=True, **kwargs).to(DEVICE)
    ref.load_state_dict(ours.state_dict())
    lengths = torch.randint(1, 11, (5,), generator=gen)
    lengths[0] = 10
    x = torch.randn(5, 10, 7, generator=gen).to(DEVICE)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    expected, _ = pad_packed_sequence(ref(packed)[0], batch_first=True, total_length=10)
    if form == "packed":
        got, _ = pad_packed_sequence(ours(packed)[0], batch_first=True, total_length=10)
    else:
        got = ours(x, lengths=lengths.to(DEVICE))[0]
    torch.testing.assert_close(got, expected, **_tol(torch.float32))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_raises_value_errors():
    case = LayerCase.draw(_generator(0, salt=13), "GRU", torch.float32)
    x, lengths, weights, hx, cx = case.inputs(DEVICE)
    bad_lengths = lengths.clone()
    bad_lengths[0] = case.time_len + 1
    with pytest.raises(ValueError, match="lengths must lie in"):
        _forward(case, x, bad_lengths, weights, hx, cx)
    with pytest.raises(ValueError, match="lengths must be int64"):
        _forward(case, x, lengths.int(), weights, hx, cx)
    with pytest.raises(ValueError, match="w_ih"):
        _forward(case, x, lengths, [weights[0].double()] + weights[1:], hx, cx)
    with pytest.raises(ValueError, match="hx must have shape"):
        _forward(case, x, lengths, weights, hx[:, :1], cx)
    with pytest.raises(ValueError, match="mode must be"):
        torch.ops.fastner.rnn_layer_forward(x, lengths, weights, hx, cx, "lstmx", case.bidirectional, case.batch_first, True)


# ---------------------------------------------------------------------------------------------
# Large shapes (int64 indexing, the persistent kernel's grid choice, many steps)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [1, 32, 256])
def test_large_shapes_match_cudnn(mode, batch, rnn_cuda_path):
    gen = _generator(batch, salt=14)
    case = LayerCase.draw(gen, mode, torch.float32)
    case.batch, case.time_len, case.input_size, case.hidden = batch, 60, 130, 200
    case.bidirectional, case.batch_first, case.bias = True, True, True
    case.module = torch_layer(mode, 130, 200, True, True, torch.float32, "cpu")
    case.lengths = torch.randint(1, 61, (batch,), generator=gen)
    case.lengths[0] = 60
    case.x = torch.randn(batch, 60, 130, generator=gen)
    case.hx = torch.randn(2, batch, 200, generator=gen)
    case.cx = torch.randn(2, batch, 200, generator=gen) if mode == "LSTM" else None
    x, lengths, weights, hx, cx = case.inputs(DEVICE, requires_grad=True)
    expected, ref_weights = _cudnn(case, x, lengths, weights, hx, cx)
    got = _results(case, _forward(case, x, lengths, weights, hx, cx))
    tol = dict(rtol=1e-3, atol=1e-3)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **tol)
    cots = [torch.randn(e.shape, device=DEVICE) for e in expected]
    leaves = [x, hx] + ([cx] if cx is not None else [])
    for g, e in zip(_grads(got, leaves + weights, cots), _grads(expected, leaves + ref_weights, cots)):
        scale = max(float(e.abs().max()), 1.0)
        torch.testing.assert_close(g / scale, e / scale, **tol)
