"""Property-based fuzzing of every fastner op and module (hypothesis): shapes, strides
(transposed, sliced, expanded), dtypes, devices (cpu, meta), lengths and masks, valid and broken.

For each drawn call: where the fused kernel and the reference both accept, their results agree;
where either refuses, both refuse, with ValueError or RuntimeError (never a crash, never garbage).
The default run draws a few hundred examples per op; `pytest -m slow` draws thousands (the
hypothesis settings of each test are picked by the marker of its `budget` parameter). The
sanitizer CI step runs the slow set against an ASan + UBSan build (README, Development).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence

import fastner.nn
from fastner import ops, reference

import testing

pytestmark = testing.requires_op("crf_forward")

# FASTNER_FUZZ_SLOW_EXAMPLES sizes the slow run (the sanitizer CI step uses fewer: ASan is slower).
EXAMPLES = {"default": 300, "slow": int(os.environ.get("FASTNER_FUZZ_SLOW_EXAMPLES", "2000"))}
BUDGETS = [pytest.param("default"), pytest.param("slow", marks=pytest.mark.slow)]
REFUSALS = (ValueError, RuntimeError)


def fuzz(test):
    """Run `test(data)` under the example budget named by the `budget` parameter."""

    @pytest.mark.parametrize("budget", BUDGETS)
    def run(budget):
        settings(max_examples=EXAMPLES[budget], deadline=None, database=None, derandomize=budget == "default",
                 suppress_health_check=list(HealthCheck))(given(st.data())(test))()

    run.__name__ = test.__name__
    return run


# ---- drawing tensors ----------------------------------------------------------------------------

def layout(data, x: torch.Tensor) -> torch.Tensor:
    """x's values in a drawn memory layout: contiguous, transposed, sliced or expanded."""
    kind = data.draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]), label="layout")
    if kind == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "sliced":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype) if x.dim() else x
        if x.dim():
            wide[..., 1::2] = x
            return wide[..., 1::2]
    if kind == "expanded" and x.dim() and x.shape[0] > 0:
        # Equal rows, stride 0 on dim 0 (what autograd hands in as a gradient of .sum()).
        return x[:1].expand(x.shape)
    return x


def randn(data, shape, dtype) -> torch.Tensor:
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    return layout(data, torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype))


def lengths_for(data, B: int, T: int) -> torch.Tensor:
    values = data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B), label="lengths")
    return layout(data, torch.tensor(values, dtype=torch.long))


# A drawn corruption of an otherwise valid call: what each op must refuse, on both paths.
CRF_CORRUPTIONS = ["none"] * 6 + [
    "length_above_t", "negative_length", "lengths_int32", "lengths_shape", "lengths_meta",
    "transitions_shape", "transitions_dtype", "transitions_meta", "start_shape", "end_meta",
    "emissions_2d", "emissions_int", "no_tags"]


def crf_call(data, with_tags=False):
    """(emissions, lengths, transitions, start, end, tags, corruption) of a drawn CRF call."""
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
                      label="dtype")
    B, T = data.draw(st.integers(0, 5), label="B"), data.draw(st.integers(0, 7), label="T")
    K = data.draw(st.integers(1, 6), label="K")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    emissions = randn(data, (B, T, K), dtype)
    lengths = lengths_for(data, B, T)
    transitions, start, end = randn(data, (K, K), acc), randn(data, (K,), acc), randn(data, (K,), acc)
    tags = None
    if with_tags:
        seed = data.draw(st.integers(0, 2**31 - 1), label="tag seed")
        tags = layout(data, torch.randint(0, K, (B, T), generator=torch.Generator().manual_seed(seed)))
    corruption = data.draw(st.sampled_from(CRF_CORRUPTIONS), label="corruption")
    if corruption == "length_above_t" and B:
        lengths = lengths.clone()
        lengths[-1] = T + 1
    elif corruption == "negative_length" and B:
        lengths = lengths.clone()
        lengths[0] = -1
    elif corruption == "lengths_int32":
        lengths = lengths.int()
    elif corruption == "lengths_shape":
        lengths = torch.zeros(B + 1, dtype=torch.long)
    elif corruption == "lengths_meta":
        lengths = lengths.to("meta")
    elif corruption == "transitions_shape":
        transitions = torch.zeros(K + 1, K, dtype=acc)
    elif corruption == "transitions_dtype":
        transitions = transitions.to(torch.float64 if acc == torch.float32 else torch.float32)
    elif corruption == "transitions_meta":
        transitions = transitions.to("meta")
    elif corruption == "start_shape":
        start = torch.zeros(K + 1, dtype=acc)
    elif corruption == "end_meta":
        end = end.to("meta")
    elif corruption == "emissions_2d":
        emissions = emissions.reshape(B * T, K) if B * T else torch.zeros(0, K, dtype=dtype)
    elif corruption == "emissions_int":
        emissions = torch.zeros(B, T, K, dtype=torch.long)
    elif corruption == "no_tags" and with_tags and B and T and int(lengths.max()) > 0:
        tags = tags.clone()
        tags[int(lengths.argmax()), 0] = K  # a tag outside [0, K) inside a length
    return emissions, lengths, transitions, start, end, tags


def outcome(fn, *args):
    """("ok", result) or ("refused", exception); anything but ValueError/RuntimeError propagates."""
    try:
        return "ok", fn(*args)
    except REFUSALS as error:
        return "refused", error


def tolerance(dtype, out_dtype):
    if out_dtype in (torch.float16, torch.bfloat16):
        return testing.tolerances(out_dtype)  # a float32 result rounded to 8 or 11 bits
    if dtype in (torch.float16, torch.bfloat16):
        return dict(rtol=1e-3, atol=1e-3)  # both paths compute in float32 from the same values
    return testing.tolerances(dtype)


def assert_same(fused, ref, dtype, what):
    kind_f, out_f = fused
    kind_r, out_r = ref
    assert kind_f == kind_r, f"{what}: fused {kind_f} ({out_f!r:.300}) but reference {kind_r} ({out_r!r:.300})"
    if kind_f == "refused":
        return
    outs_f = out_f if isinstance(out_f, (tuple, list)) else (out_f,)
    outs_r = out_r if isinstance(out_r, (tuple, list)) else (out_r,)
    for a, b in zip(outs_f, outs_r):
        if isinstance(a, torch.Tensor):
            if a.dtype == torch.long:
                assert torch.equal(a, b), what
            else:
                torch.testing.assert_close(a, b.to(a.dtype), equal_nan=True, **tolerance(dtype, a.dtype))
        else:
            assert a == b, what


# ---- CRF ops ------------------------------------------------------------------------------------

def fused_and_reference(data, op_name, fused_args, ref_fn, ref_args, dtype, check=None):
    fused = outcome(getattr(torch.ops.fastner, op_name), *fused_args)
    ref = outcome(ref_fn, *ref_args)
    assert_same(fused, ref, dtype, op_name)
    if check and fused[0] == "ok":
        check(fused[1])


@fuzz
def test_crf_forward(data):
    e, L, tr, s, n, tags = crf_call(data, with_tags=data.draw(st.booleans(), label="with tags"))

    def ref(*args):
        log_z, gold, _ = reference.crf_forward(*args)
        return log_z, gold

    fused = outcome(lambda *a: torch.ops.fastner.crf_forward(*a)[:2], e, tags, L, tr, s, n)
    assert_same(fused, outcome(ref, e, tags, L, tr, s, n), e.dtype, "crf_forward")


@fuzz
def test_crf_forward_backward_and_backward(data):
    e, L, tr, s, n, tags = crf_call(data, with_tags=True)
    fused = outcome(torch.ops.fastner.crf_forward_backward, e, tags, L, tr, s, n)

    def ref(*args):
        log_z, gold, _ = reference.crf_forward(*args)
        B = log_z.shape[0]
        grads = reference.crf_backward(-torch.ones(B, dtype=log_z.dtype), torch.ones(B, dtype=log_z.dtype),
                                       *args)
        return ((gold - log_z).sum(),) + tuple(grads)

    assert_same(fused, outcome(ref, e, tags, L, tr, s, n), e.dtype, "crf_forward_backward")

    def fused_backward(*args):
        log_z, _, alphas = torch.ops.fastner.crf_forward(*args)
        B = log_z.shape[0]
        return torch.ops.fastner.crf_backward(-torch.ones(B, dtype=log_z.dtype), torch.ones(B, dtype=log_z.dtype),
                                              *args, log_z, alphas)

    def ref_backward(*args):
        B = args[0].shape[0]
        dtype = reference.crf_accumulate_dtype(args[0].dtype)
        return reference.crf_backward(-torch.ones(B, dtype=dtype), torch.ones(B, dtype=dtype), *args)

    assert_same(outcome(fused_backward, e, tags, L, tr, s, n), outcome(ref_backward, e, tags, L, tr, s, n),
                e.dtype, "crf_backward")


@fuzz
def test_crf_viterbi(data):
    e, L, tr, s, n, _ = crf_call(data)
    fused_and_reference(data, "crf_viterbi", (e, L, tr, s, n), reference.crf_viterbi, (e, L, tr, s, n), e.dtype)


@fuzz
def test_crf_kbest(data):
    e, L, tr, s, n, _ = crf_call(data)
    k = data.draw(st.integers(-1, 4), label="k")
    fused_and_reference(data, "crf_kbest", (e, L, tr, s, n, k), reference.crf_kbest, (e, L, tr, s, n, k), e.dtype)


@fuzz
def test_crf_marginals(data):
    e, L, tr, s, n, _ = crf_call(data)
    fused_and_reference(data, "crf_marginals", (e, L, tr, s, n), reference.crf_marginals, (e, L, tr, s, n),
                        e.dtype)


@fuzz
def test_crf_lengths(data):
    B, T = data.draw(st.integers(0, 5), label="B"), data.draw(st.integers(0, 7), label="T")
    batch_first = data.draw(st.booleans(), label="batch_first")
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B), label="lengths"),
                           dtype=torch.long)
    mask = testing.mask_from_lengths(lengths, T, batch_first=batch_first)
    if data.draw(st.booleans(), label="gap") and B and T > 1:
        mask = mask.clone()
        mask[(0, T - 1) if batch_first else (T - 1, 0)] = True
        mask[(0, 0) if batch_first else (0, 0)] = False
    mask = layout(data, mask.to(data.draw(st.sampled_from([torch.bool, torch.uint8, torch.float32]))))
    fused_and_reference(data, "crf_lengths", (mask, batch_first), reference.crf_lengths, (mask, batch_first),
                        torch.float32)


@fuzz
def test_tag_lists(data):
    B, T = data.draw(st.integers(0, 5), label="B"), data.draw(st.integers(0, 7), label="T")
    tags = layout(data, torch.randint(-1, 9, (B, T)))
    lengths = lengths_for(data, B, T)
    if data.draw(st.booleans(), label="corrupt") and B:
        lengths = lengths.clone()
        lengths[0] = data.draw(st.sampled_from([-1, T + 1, 10**9]), label="bad length")
    with testing.backend("fused"):
        fused = outcome(ops.tag_lists, tags, lengths)
    with testing.backend("reference"):
        ref = outcome(ops.tag_lists, tags, lengths)
    assert fused[0] == ref[0]
    if fused[0] == "ok":
        assert fused[1] == ref[1] == [row[:n] for row, n in zip(tags.tolist(), lengths.tolist())]


@fuzz
def test_crf_ops_on_meta_give_the_cpu_shapes(data):
    e, L, tr, s, n, _ = crf_call(data)
    cpu = outcome(torch.ops.fastner.crf_viterbi, e, L, tr, s, n)
    meta_args = [x.to("meta") for x in (e, L, tr, s, n)]
    meta = outcome(torch.ops.fastner.crf_viterbi, *meta_args)
    if cpu[0] == "ok" and meta[0] == "ok":
        assert [t.shape for t in meta[1]] == [t.shape for t in cpu[1]]
        assert all(t.device.type == "meta" for t in meta[1])
    elif meta[0] == "ok":
        # The meta kernel cannot see values, and an all-meta call has no mixed devices: only
        # those refusals may pass it.
        assert "lengths[" in str(cpu[1]) or "must be on" in str(cpu[1]), cpu[1]
    else:
        assert cpu[0] == "refused", meta[1]


# ---- recurrent layers ---------------------------------------------------------------------------

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


# ---- modules ------------------------------------------------------------------------------------

@fuzz
def test_crf_module(data):
    e, L, tr, s, n, tags = crf_call(data, with_tags=True)
    if e.dim() != 3 or L.device.type != "cpu" or L.dtype != torch.long or L.shape != e.shape[:1] or not e.is_floating_point():
        return  # the module's own arguments are emissions, tags and a mask: corruptions of those below
    B, T, K = e.shape
    batch_first = data.draw(st.booleans(), label="batch_first")
    crf = fastner.nn.CRF(K, batch_first=batch_first)
    mask = testing.mask_from_lengths(L.clamp(0, T), T, batch_first=batch_first)
    emissions = e if batch_first else e.transpose(0, 1)
    tags_in = tags if batch_first else tags.transpose(0, 1)

    def run(backend):
        with testing.backend(backend):
            x = emissions.detach().float().requires_grad_()
            llh = crf(x, tags_in, mask=mask, reduction="sum")
            (grad,) = torch.autograd.grad(llh, x)
            return llh, grad, crf.decode(x.detach(), mask=mask)

    assert_same(outcome(run, "fused"), outcome(run, "reference"), torch.float32, "CRF module")


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
