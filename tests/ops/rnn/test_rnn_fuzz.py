"""Property-based fuzzing of the RNN layer op and fastner.nn.LSTM / GRU / RNN (hypothesis; the
harness is tests/ops/fuzzing.py): shapes, strides (transposed, sliced, expanded), dtypes, devices
(cpu, meta), lengths, valid and broken. Fused and reference agree, or both refuse."""
from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence

import fastner.nn
from fastner import ops, reference
from tests import testing
from tests.ops.fuzzing import assert_same, fuzz, lengths_for, outcome, randn

pytestmark = testing.requires_op("rnn_layer_forward")


RNN_CORRUPTIONS = ["none"] * 6 + ["length_above_t", "negative_length", "lengths_meta", "lengths_int32",
                                  "weight_shape", "weight_dtype", "weight_meta", "hx_shape", "too_few_weights",
                                  "bad_mode"]


def rnn_call(data):
    mode = data.draw(st.sampled_from(["lstm", "gru", "rnn_tanh", "rnn_relu"]), label="mode")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    B, T = data.draw(st.integers(0, 4), label="B"), data.draw(st.integers(0, 6), label="T")
    I, H = data.draw(st.integers(1, 5), label="I"), data.draw(st.integers(1, 5), label="H")
    bidirectional, batch_first = data.draw(st.booleans(), label="bidi"), data.draw(st.booleans(), label="bf")
    bias = data.draw(st.booleans(), label="bias")
    D, G = (2 if bidirectional else 1), {"lstm": 4, "gru": 3}.get(mode, 1)
    x = randn(data, (B, T, I) if batch_first else (T, B, I), dtype)
    lengths = lengths_for(data, B, T)
    weights = []
    for _ in range(D):
        weights += [randn(data, (G * H, I), dtype), randn(data, (G * H, H), dtype)]
        if bias:
            weights += [randn(data, (G * H,), dtype), randn(data, (G * H,), dtype)]
    hx = randn(data, (D, B, H), dtype) if data.draw(st.booleans(), label="hx") else None
    cx = randn(data, (D, B, H), dtype) if mode == "lstm" and data.draw(st.booleans(), label="cx") else None
    corruption = data.draw(st.sampled_from(RNN_CORRUPTIONS), label="corruption")
    if corruption == "length_above_t" and B:
        lengths = lengths.clone()
        lengths[0] = T + 1
    elif corruption == "negative_length" and B:
        lengths = lengths.clone()
        lengths[-1] = -1
    elif corruption == "lengths_meta":
        lengths = lengths.to("meta")
    elif corruption == "lengths_int32":
        lengths = lengths.int()
    elif corruption == "weight_shape":
        weights[0] = torch.zeros(G * H + 1, I, dtype=dtype)
    elif corruption == "weight_dtype":
        weights[1] = weights[1].to(torch.float64 if dtype == torch.float32 else torch.float32)
    elif corruption == "weight_meta":
        weights[-1] = weights[-1].to("meta")
    elif corruption == "hx_shape":
        hx = torch.zeros(D, B + 1, H, dtype=dtype)
    elif corruption == "too_few_weights":
        weights = weights[:1]
    elif corruption == "bad_mode":
        mode = "lstmm"
    return x, lengths, weights, hx, cx, mode, bidirectional, batch_first


@fuzz
def test_rnn_layer(data):
    x, L, w, hx, cx, mode, bidi, bf = rnn_call(data)
    training = data.draw(st.booleans(), label="training")

    def fused(*args):
        out, h_n, c_n, _ = torch.ops.fastner.rnn_layer_forward(*args, training)
        return out, h_n, c_n

    assert_same(outcome(fused, x, L, w, hx, cx, mode, bidi, bf),
                outcome(reference.rnn_layer, x, L, w, hx, cx, mode, bidi, bf), x.dtype, "rnn_layer_forward")


@fuzz
def test_rnn_layer_gradients(data):
    x, L, w, hx, cx, mode, bidi, bf = rnn_call(data)

    def grads(backend):
        leaves = [t.detach().clone().requires_grad_() if t.dtype.is_floating_point and t.device.type == "cpu" else t
                  for t in [x, *w]]
        with testing.backend(backend):
            out, h_n, _ = ops.rnn_layer(leaves[0], L, leaves[1:], hx, cx, mode, bidi, bf)
        total = out.sum() + h_n.sum()
        grads = torch.autograd.grad(total, leaves, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]  # unused = 0

    assert_same(outcome(grads, "fused"), outcome(grads, "reference"), x.dtype, "rnn_layer backward")


@fuzz
def test_rnn_modules(data):
    module_cls = data.draw(st.sampled_from([fastner.nn.LSTM, fastner.nn.GRU, fastner.nn.RNN]), label="module")
    B, T = data.draw(st.integers(1, 4), label="B"), data.draw(st.integers(1, 6), label="T")
    I, H = data.draw(st.integers(1, 4), label="I"), data.draw(st.integers(1, 4), label="H")
    layers = data.draw(st.integers(1, 2), label="layers")
    bidirectional, batch_first = data.draw(st.booleans(), label="bidi"), data.draw(st.booleans(), label="bf")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    module = module_cls(I, H, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first).to(dtype)
    x = randn(data, (B, T, I) if batch_first else (T, B, I), dtype)
    lengths = torch.tensor(data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B), label="lengths"))
    packed = data.draw(st.booleans(), label="packed")
    if packed:
        x = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)

    def run(backend):
        with testing.backend(backend):
            out, state = module(x) if packed else module(x, lengths=lengths)
        out = out.data if packed else out
        states = state if isinstance(state, tuple) else (state,)
        return (out,) + states

    assert_same(outcome(run, "fused"), outcome(run, "reference"), dtype, module_cls.__name__)
