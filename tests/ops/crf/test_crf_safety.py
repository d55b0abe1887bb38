"""Regression tests of issue 12's native/op defects in the CRF ops (and tag_lists, which reads
their decodes): every public op refuses bad arguments with a ValueError naming them (fused and
reference paths alike) and never reads freed or out-of-bounds memory. The property-based version
over many shapes is tests/ops/crf/test_crf_fuzz.py; the RNN's is tests/ops/rnn/test_rnn_safety.py."""
import math

import pytest
import torch

import fastner
import fastner.nn
from fastner import ops, reference

from tests import testing

BACKENDS = pytest.mark.parametrize("backend", ["fused", "reference"])


def crf_args(B=3, T=5, K=6, dtype=torch.float32):
    return (torch.randn(B, T, K, dtype=dtype), torch.tensor([T, 3, 0][:B]),
            torch.randn(K, K, dtype=dtype), torch.randn(K, dtype=dtype), torch.randn(K, dtype=dtype))


# ---- items 2 and 3: pointers into freed temporaries ----------------------------------------------

@pytest.mark.parametrize("op", ["crf_marginals", "crf_kbest", "crf_viterbi", "crf_forward"])
def test_strided_transition_scores_give_the_contiguous_result(op):
    e, L, tr, s, n = crf_args(K=6)
    strided = (torch.randn(6, 6, 2)[..., 0], torch.randn(6, 2)[:, 0], torch.randn(6, 3)[:, 1])
    dense = tuple(x.contiguous() for x in strided)
    extra = {"crf_kbest": (3,), "crf_forward": ()}.get(op, ())
    call = getattr(torch.ops.fastner, op)
    if op == "crf_forward":
        got, want = call(e, None, L, *strided), call(e, None, L, *dense)
    else:
        got, want = call(e, L, *strided, *extra), call(e, L, *dense, *extra)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["crf_viterbi", "crf_marginals", "crf_kbest"])
def test_non_contiguous_lengths_are_read_correctly(op):
    e, L, tr, s, n = crf_args()
    strided = torch.stack([L, torch.full_like(L, 99)], dim=1)[:, 0]  # valid values, stride 2
    assert not strided.is_contiguous()
    extra = (2,) if op == "crf_kbest" else ()
    got = getattr(torch.ops.fastner, op)(e, strided, tr, s, n, *extra)
    want = getattr(torch.ops.fastner, op)(e, L, tr, s, n, *extra)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_contiguous_lengths_out_of_range_name_the_true_value():
    e, L, tr, s, n = crf_args()
    strided = torch.tensor([[5, 0], [6, 0], [0, 0]])[:, 0]
    with pytest.raises(ValueError, match=r"lengths\[1\] = 6 is outside \[0, T = 5\]"):
        torch.ops.fastner.crf_viterbi(e, strided, tr, s, n)


# ---- item 4: tag_lists --------------------------------------------------------------------------

@BACKENDS
def test_tag_lists_refuses_lengths_beyond_the_row(backend):
    with testing.backend(backend):
        with pytest.raises(ValueError, match=r"tag_lists: lengths\[0\] = 1000000000 is outside \[0, T = 3\]"):
            ops.tag_lists(torch.zeros(1, 3, dtype=torch.long), torch.tensor([10**9]))
        with pytest.raises(ValueError, match="lengths\\[0\\] = -1"):
            ops.tag_lists(torch.zeros(1, 3, dtype=torch.long), torch.tensor([-1]))
        with pytest.raises(ValueError, match="lengths must have shape \\[2\\]"):
            ops.tag_lists(torch.zeros(2, 3, dtype=torch.long), torch.tensor([1]))
        with pytest.raises(ValueError, match="tags must be int64"):
            ops.tag_lists(torch.zeros(1, 3, dtype=torch.int32), torch.tensor([1]))
        with pytest.raises(ValueError, match="lengths must be on cpu"):
            ops.tag_lists(torch.zeros(1, 3, dtype=torch.long), torch.tensor([1], device="meta"))


def test_tag_lists_reads_strided_tags():
    tags = torch.arange(24).view(4, 6)[:, ::2]  # [4, 3], row stride 6, column stride 2
    lengths = torch.tensor([3, 0, 1, 2])
    assert ops.tag_lists(tags, lengths) == [row[:n] for row, n in zip(tags.tolist(), lengths.tolist())]


@pytest.mark.skipif(not fastner._extension.extension_loaded(), reason="needs the extension")
def test_raw_pointer_helper_is_not_public():
    from fastner import _C

    assert not hasattr(_C, "tag_lists")
    assert all(name.startswith("_") or name in ("cpu_isa", "rnn_workspace_width", "rnn_gemm_choices", "rnn_int8_kernel", "rnn_bf16_kernel") for name in dir(_C) if not name.startswith("__"))
    with pytest.raises(ValueError):
        _C._tag_lists_unchecked(0, 0, 1, 0)  # null addresses: refused, not dereferenced


# ---- item 7: the reference path checks lengths and keeps marginals in [0, 1] ----------------------

@BACKENDS
@pytest.mark.parametrize("bad", [6, -1])
@pytest.mark.parametrize("op", ["crf_forward", "crf_viterbi", "crf_kbest", "crf_marginals"])
def test_lengths_outside_zero_to_t_are_refused(backend, bad, op):
    e, L, tr, s, n = crf_args()
    L = torch.tensor([5, bad, 0])
    args = {"crf_forward": (e, None, L, tr, s, n), "crf_kbest": (e, L, tr, s, n, 2)}.get(op, (e, L, tr, s, n))
    with testing.backend(backend), pytest.raises(ValueError, match=rf"lengths\[1\] = {bad} is outside \[0, T = 5\]"):
        getattr(ops, op)(*args)


def test_reference_marginals_stay_probabilities_over_long_float32_sequences():
    # |log Z| ~ T * scale: 2000 steps of scale 30 gave marginals up to 1.45 before the fix (the
    # issue's T = 20000 at scale 3 has the same magnitude and costs 10x the time).
    T, K = 2000, 5
    g = torch.Generator().manual_seed(0)
    e = torch.randn(1, T, K, generator=g) * 30
    tr, s, n = torch.randn(K, K, generator=g), torch.randn(K, generator=g), torch.randn(K, generator=g)
    L = torch.tensor([T])
    got = reference.crf_marginals(e, L, tr, s, n)
    want = reference.crf_marginals(e.double(), L, tr.double(), s.double(), n.double())
    assert float(got.max()) <= 1 + 1e-5
    torch.testing.assert_close(got.sum(-1), torch.ones(1, T), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=0)


# ---- item 8: every tensor on the emissions' / input's device --------------------------------------

@BACKENDS
@pytest.mark.parametrize("op", ["crf_forward", "crf_viterbi", "crf_kbest", "crf_marginals"])
def test_crf_lengths_on_another_device_are_refused(backend, op):
    e, L, tr, s, n = crf_args()
    L = L.to("meta")
    args = {"crf_forward": (e, None, L, tr, s, n), "crf_kbest": (e, L, tr, s, n, 2)}.get(op, (e, L, tr, s, n))
    with testing.backend(backend), pytest.raises(ValueError, match="lengths must be on cpu"):
        getattr(ops, op)(*args)
    if backend == "fused":  # the registered op itself (its Meta kernel saw real CPU emissions)
        with pytest.raises(ValueError, match="lengths must be on cpu"):
            getattr(torch.ops.fastner, op)(*args)


@pytest.mark.parametrize("name", ["transitions", "start_transitions", "end_transitions"])
def test_crf_scores_on_another_device_are_refused(name):
    e, L, tr, s, n = crf_args()
    args = dict(transitions=tr, start_transitions=s, end_transitions=n)
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=f"{name} must be on cpu"):
        torch.ops.fastner.crf_viterbi(e, L, *args.values())


# ---- item 9: NaN propagates into the gradients (malformed PackedSequence: tests/ops/rnn/test_rnn_safety.py) ---

@BACKENDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_nan_emission_gives_nan_gradients_like_the_reference(backend, dtype):
    B, T, K = 4, 5, 4
    e = torch.randn(B, T, K, dtype=dtype)
    e[0, 1, 2] = math.nan  # inside sequence 0
    e[2, 4, 1] = math.nan  # past the length of sequence 2: ignored
    L = torch.tensor([5, 3, 4, 5])
    tags = torch.randint(0, K, (B, T))
    crf = fastner.nn.CRF(K, batch_first=True).to(dtype)
    mask = torch.arange(T) < L[:, None]

    def grads(backend_name):
        x = e.clone().requires_grad_()
        crf.zero_grad()
        with testing.backend(backend_name):
            loss = crf(x, tags, mask=mask, reduction="sum")
            loss.backward()
        return loss, [x.grad] + [p.grad for p in crf.parameters()]

    loss, got = grads(backend)
    ref_loss, want = grads("reference")
    assert loss.isnan() and ref_loss.isnan()
    for g, r in zip(got, want):
        assert torch.equal(g.isnan(), r.isnan())
        assert g.isnan().any()



# ---- non-tensor arguments: one ValueError naming them, on both paths ------------------------------

CALLS = {"crf_forward": lambda e, L, tr, s, n, tags: ops.crf_forward(e, tags, L, tr, s, n),
         "crf_log_likelihood": lambda e, L, tr, s, n, tags: ops.crf_log_likelihood(e, tags, L, tr, s, n, "sum"),
         "crf_viterbi": lambda e, L, tr, s, n, tags: ops.crf_viterbi(e, L, tr, s, n),
         "crf_kbest": lambda e, L, tr, s, n, tags: ops.crf_kbest(e, L, tr, s, n, 2),
         "crf_marginals": lambda e, L, tr, s, n, tags: ops.crf_marginals(e, L, tr, s, n)}
NAMES = {"e": "emissions", "L": "lengths", "tr": "transitions", "s": "start_transitions",
         "n": "end_transitions", "tags": "tags"}


@BACKENDS
@pytest.mark.parametrize("op", list(CALLS))
@pytest.mark.parametrize("bad", ["list", "None"])
def test_non_tensor_arguments_are_refused_by_name(backend, op, bad):
    # It was, on the fused path: AttributeError ('list' object has no attribute 'device'), the
    # dispatcher's RuntimeError, or for lengths=None "lengths must be [B] = [3], got [0]".
    e, L, tr, s, n = crf_args()
    args = dict(e=e, L=L, tr=tr, s=s, n=n, tags=torch.zeros(3, 5, dtype=torch.long))
    takes_tags = op in ("crf_forward", "crf_log_likelihood")
    for key in args:
        if key == "tags" and (not takes_tags or (op == "crf_forward" and bad == "None")):
            continue  # no tags, or optional ones
        wrong = dict(args, **{key: None if bad == "None" else args[key].tolist()})
        got = "NoneType" if bad == "None" else "list"
        with testing.backend(backend), pytest.raises(ValueError, match=f"^{op}: {NAMES[key]} must be a Tensor, got {got}$"):
            CALLS[op](**wrong)


@BACKENDS
def test_a_non_tensor_mask_is_refused_by_name(backend):
    with testing.backend(backend), pytest.raises(ValueError, match="^crf_lengths: mask must be a Tensor, got list$"):
        ops.crf_lengths([[1, 0]], True)
