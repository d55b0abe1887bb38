"""NaN and +-inf in the recurrent layers: in the input (Tensor with lengths= or PackedSequence),
in hx / cx, or arising in the recurrence (a huge input whose product overflows). The int8
(fastner.nn.quantize(m, torch.qint8)), bf16 (to_bf16) and float32 layers, fused and reference
(FASTNER_BACKEND=reference), put NaN / +inf / -inf exactly where torch's float32 layer with the
weights they really use (dequantized int8, bf16-rounded) has them (the finite values within the
int8 layer's quantization error, and the bf16 layer's rounding of the products' x and h
operands), leave the other sequences bit for bit as on clean input, and ignore padding past a
sequence's length.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastner.nn
from fastner import reference
from fastner.nn.rnn_bf16 import to_bf16

CELLS = {  # name: (fastner class, torch class, extra kwargs)
    "LSTM": (fastner.nn.LSTM, torch.nn.LSTM, {}),
    "GRU": (fastner.nn.GRU, torch.nn.GRU, {}),
    "RNN_TANH": (fastner.nn.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (fastner.nn.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}
PRECISIONS = ("int8", "bf16", "fp32")
# I and H not multiples of 8: the vector loops (quantization, cells) and their scalar tails.
B, T, I, H = 4, 7, 10, 12
LENGTHS = torch.tensor([7, 5, 7, 3])
BAD = 1  # the sequence given a non-finite value (length 5: padding after it)
VALUES = (float("nan"), float("inf"), float("-inf"))


def _layers(cell: str, precision: str, w_ih=None, w_hh=None):
    """(the layer under test, torch's float32 twin holding the weights the layer really uses:
    w_q * scale for int8, bf16-rounded for bf16). w_ih(w) / w_hh(w) may replace the weights."""
    ours, theirs, kwargs = CELLS[cell]
    torch.manual_seed(0)
    twin = theirs(I, H, batch_first=True, bidirectional=True, **kwargs)
    with torch.no_grad():
        for prefix, change in (("weight_ih", w_ih), ("weight_hh", w_hh)):
            for name in (f"{prefix}_l0", f"{prefix}_l0_reverse"):
                if change is not None:
                    getattr(twin, name).copy_(change(getattr(twin, name)))
    layer = ours(I, H, batch_first=True, bidirectional=True, **kwargs)
    layer.load_state_dict(twin.state_dict())
    if precision == "int8":
        layer = fastner.nn.quantize(layer, torch.qint8)
    elif precision == "bf16":
        layer = to_bf16(layer)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name.startswith("weight_"):
                if precision == "int8":
                    w_q, scale = reference.quantize_weight_int8(p)
                    p.copy_(w_q.float() * scale[:, None])
                elif precision == "bf16":
                    p.copy_(p.bfloat16().float())
    return layer.eval(), twin.eval()


def _run(layer, x, hx, form):
    """(output [B, T, D*H] zero-padded, h_n, c_n or None) of layer on x with LENGTHS."""
    with torch.no_grad():
        if form == "lengths":
            out, state = layer(x, hx, lengths=LENGTHS)
        else:
            packed = pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False)
            out, state = layer(packed, hx)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
    h_n, c_n = state if isinstance(state, tuple) else (state, None)
    return out, h_n, c_n


def _run_torch(twin, x, hx):
    return _run(twin, x, hx, "packed")


def _assert_same_nonfinite(got, want, precision, what):
    """NaN, +inf and -inf at the same positions; the finite values close (int8 and bf16: within
    their rounding error, relative to the whole tensor)."""
    for kind, mask in (("NaN", torch.isnan), ("+inf", lambda t: t == float("inf")),
                       ("-inf", lambda t: t == float("-inf"))):
        bad = mask(got) != mask(want)
        assert not bad.any(), f"{what}: {kind} at {bad.nonzero()[:4].tolist()} in one and not the other"
    finite = torch.isfinite(want)
    g, w = got[finite], want[finite]
    if precision in ("int8", "bf16"):
        g, w = g.double(), w.double()  # huge values: no overflow in the norms
        err = ((g - w).norm() / w.norm().clamp(min=1e-6)).item()
        # int8: its quantization error; bf16: the products' x and h operands rounded to bf16 as
        # well (the twin has the bf16 weights only): measured <= 0.27% here
        bound = 0.06 if precision == "int8" else 0.01
        assert err <= bound, f"{what}: relative error {err:.4f}"
    else:
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=what)


def _assert_others_unchanged(got, clean, what):
    """Every sequence but BAD gives bit for bit what it gives on clean input (h_n / c_n are
    [D, B, H], the output [B, T, D*H])."""
    for name, g, c in zip(("output", "h_n", "c_n"), got, clean):
        if g is None:
            continue
        others = [b for b in range(B) if b != BAD]
        g, c = (g[others], c[others]) if name == "output" else (g[:, others], c[:, others])
        assert torch.equal(g, c), f"{what}: {name} of the other sequences changed"


def _check(layer, twin, x, hx, form, precision, clean, what):
    got = _run(layer, x, hx, form)
    want = _run_torch(twin, x, hx)
    for name, g, w in zip(("output", "h_n", "c_n"), got, want):
        if g is not None:
            _assert_same_nonfinite(g, w, precision, f"{what}: {name}")
    _assert_others_unchanged(got, clean, what)
    return got


@pytest.fixture(params=["fused", "reference"])
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTNER_BACKEND", "reference" if request.param == "reference" else "auto")
    return request.param


@pytest.mark.parametrize("form", ["lengths", "packed"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_nonfinite_input_propagates_like_float32(cell, precision, form, backend):
    layer, twin = _layers(cell, precision)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, I, generator=gen)
    clean = _run(layer, x, None, form)
    assert all(torch.isfinite(t).all() for t in clean if t is not None)
    last = int(LENGTHS[BAD]) - 1
    for t in (0, last // 2, last):  # the first, a middle and the last valid step
        for value in VALUES:
            bad = x.clone()
            bad[BAD, t, 3] = value
            what = f"{cell} {precision} {form} {backend}: input[{BAD}, {t}, 3] = {value}"
            got = _check(layer, twin, bad, None, form, precision, clean, what)
            if value != value:  # NaN: both directions' outputs from t on (forward), up to t (reverse)
                out = got[0][BAD]
                assert out[t:last + 1, :H].isnan().all() and out[:t + 1, H:].isnan().all(), what
                assert not out[:t, :H].isnan().any() and not out[t + 1:, H:].isnan().any(), what
                assert (out[last + 1:] == 0).all(), what  # padding stays zero


@pytest.mark.parametrize("form", ["lengths", "packed"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_nonfinite_padding_past_a_length_is_ignored(cell, precision, form, backend):
    layer, _ = _layers(cell, precision)
    x = torch.randn(B, T, I, generator=torch.Generator().manual_seed(2))
    clean = _run(layer, x, None, form)
    for value in VALUES:
        bad = x.clone()
        bad[BAD, int(LENGTHS[BAD]):, 1] = value  # every padded step of the sequence
        bad[3, int(LENGTHS[3]), :] = value
        got = _run(layer, bad, None, form)
        for g, c in zip(got, clean):
            if g is not None:
                assert torch.equal(g, c), f"{cell} {precision} {form} {backend}: padding = {value} mattered"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_nonfinite_initial_state_propagates_like_float32(cell, precision, backend):
    layer, twin = _layers(cell, precision)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, I, generator=gen)
    h0 = torch.randn(2, B, H, generator=gen) * 0.5
    c0 = torch.randn(2, B, H, generator=gen) * 0.5
    state = (lambda h, c: (h, c)) if cell == "LSTM" else (lambda h, c: h)
    clean = _run(layer, x, state(h0, c0), "lengths")
    which = ("hx", "cx") if cell == "LSTM" else ("hx",)
    for name in which:
        for d in (0, 1):
            for value in VALUES:
                h, c = h0.clone(), c0.clone()
                (h if name == "hx" else c)[d, BAD, 5] = value
                what = f"{cell} {precision} {backend}: {name}[{d}, {BAD}, 5] = {value}"
                _check(layer, twin, x, state(h, c), "lengths", precision, clean, what)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_huge_inputs_overflow_like_float32(cell, precision, backend):
    # (a) Finite products of huge inputs (1e37 * |w| <= 0.3 per term): the int8 layer once
    # overflowed in its dequantization (integer sum * row scale before * weight scale) and
    # relu carried the spurious inf on. (b) Products that do overflow in float32 (all-positive
    # W_ih, every feature 3e38): inf (then inf - inf = NaN in W_hh h for relu) as in float32.
    # A fading recurrence (W_hh / 10), so that the huge state does not overflow W_hh h.
    layer, twin = _layers(cell, precision, w_hh=lambda w: w * 0.1)
    x = torch.randn(B, T, I, generator=torch.Generator().manual_seed(4))
    clean = _run(layer, x, None, "lengths")
    bad = x.clone()
    bad[BAD, 2, :3] = 1e37
    got = _check(layer, twin, bad, None, "lengths", precision, clean, f"{cell} {precision} {backend}: 1e37")
    assert all(torch.isfinite(t).all() for t in got if t is not None)

    layer, twin = _layers(cell, precision, w_ih=lambda w: w.abs() + 0.5, w_hh=lambda w: w * 0.1)
    clean = _run(layer, x, None, "lengths")
    bad = x.clone()
    bad[BAD, 2, :] = 3e38
    got = _check(layer, twin, bad, None, "lengths", precision, clean, f"{cell} {precision} {backend}: 3e38")
    if cell == "RNN_RELU":
        assert not torch.isfinite(got[0][BAD, 2]).any()


def test_int8_product_of_nonfinite_rows():
    # Weights' signs [+, -, 0] against a row's infinite entries: what float arithmetic gives.
    w_q = torch.tensor([[5, -3], [-7, 2], [0, 4]], dtype=torch.int8)
    scale = torch.tensor([0.1, 0.2, 0.3])
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[inf, 1.0], [-inf, 1.0], [inf, inf], [nan, 1.0], [1e30, -2.0], [inf, -inf]])
    got = reference.int8_product(x, w_q, scale)
    want = x @ (w_q.float() * scale[:, None]).t()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[got.isinf()], want[want.isinf()])  # the infinities' signs
    assert got[0, 0] == inf and got[0, 1] == -inf and got[0, 2].isnan()  # inf * 0 = NaN
    torch.testing.assert_close(got[4], want[4], rtol=0, atol=0.02 * want[4].abs().max().item())  # finite row


def test_int8_row_quantization_of_extreme_finite_rows():
    # A range past float's max, and a range whose 1 / scale would overflow: a finite scale and
    # 1 / scale, q in [0, 127], x ~= (q - zero) * scale.
    x = torch.tensor([[3e38, -3e38, 1.0, 0.0], [1e-40, 0.0, -2e-40, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q, scale, zero = reference.quantize_rows_int8(x)
    assert torch.isfinite(scale).all() and torch.isfinite(1.0 / scale).all()
    assert q.min() >= 0 and q.max() <= 127 and zero.min() >= 0 and zero.max() <= 127
    back = (q - zero).double() * scale.double()
    assert ((back - x.double()).abs() <= scale.double()).all()


@pytest.mark.parametrize("cell", ["GRU", "LSTM", "RNN_TANH"])
def test_nan_gradients_like_float32(cell, backend):
    # Training (fp32, fused backward or reference autograd) on an input holding NaN: the input
    # gradient and every parameter gradient hold NaN / inf exactly where torch's do, the rest
    # close. Not covered, because they differ from torch (measured, cause not established): an
    # infinite input (torch's dW_ih holds NaN, 0 * inf, at entries where the fused backward's
    # holds +-inf), and RNN_RELU with a NaN input (the fused backward's finite input gradients
    # of that sequence before the NaN differ from torch's).
    layer, twin = _layers(cell, "fp32")
    x = torch.randn(B, T, I, generator=torch.Generator().manual_seed(5))
    x[BAD, 2, 3] = float("nan")
    upstream = torch.randn(B, T, 2 * H, generator=torch.Generator().manual_seed(6))
    grads = []
    for module in (layer.train(), twin.train()):
        inp = x.clone().requires_grad_(True)
        packed = pack_padded_sequence(inp, LENGTHS, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(module(packed)[0], batch_first=True, total_length=T)
        (out * upstream).sum().backward()
        grads.append([inp.grad] + [p.grad for _, p in sorted(module.named_parameters())])
    assert any(g.isnan().any() for g in grads[1])  # the NaN reaches torch's gradients
    names = ["input"] + [n for n, _ in sorted(twin.named_parameters())]
    for name, got, want in zip(names, *grads):
        _assert_same_nonfinite(got, want, "fp32", f"{cell} {backend}: grad of {name}")


@pytest.mark.parametrize("value", VALUES, ids=["nan", "inf", "-inf"])
def test_quantizing_nonfinite_weights_is_refused(value):
    # A weight row holding NaN / inf has no int8 scale: quantize names the parameter instead
    # of running on silently zeroed weights.
    layer = fastner.nn.LSTM(I, H, batch_first=True, bidirectional=True)
    with torch.no_grad():
        layer.weight_hh_l0_reverse[3, 1] = value
    with pytest.raises(ValueError, match=r"weight_hh_l0_reverse holds NaN or \+-inf"):
        fastner.nn.quantize(layer, torch.qint8)
    # left as it was: the float layer, trainable, running
    assert type(layer) is fastner.nn.LSTM and all(p.requires_grad for p in layer.parameters())
    assert layer(torch.randn(B, T, I))[0].shape == (B, T, 2 * H)
    with pytest.raises(ValueError, match=r"w holds NaN or \+-inf"):
        reference.quantize_weight_int8(torch.tensor([[1.0, value]]))
