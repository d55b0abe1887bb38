"""Property-based fuzzing of the CRF ops and fastner.nn.CRF (hypothesis; the harness is
tests/ops/fuzzing.py): shapes, strides (transposed, sliced, expanded), dtypes, devices (cpu, meta),
lengths and masks, valid and broken. Fused and reference agree, or both refuse."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

import fastner.nn
from fastner import ops, reference
from tests import testing
from tests.ops.fuzzing import assert_same, fuzz, layout, lengths_for, outcome, randn

pytestmark = testing.requires_op("crf_forward")

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
        return reference.crf_forward(*args)

    fused = outcome(torch.ops.fastner.crf_forward, e, tags, L, tr, s, n)
    assert_same(fused, outcome(ref, e, tags, L, tr, s, n), e.dtype, "crf_forward")


@fuzz
def test_crf_forward_backward_and_backward(data):
    e, L, tr, s, n, tags = crf_call(data, with_tags=True)
    fused = outcome(torch.ops.fastner.crf_forward_backward, e, tags, L, tr, s, n)

    def ref(*args):
        log_z, gold = reference.crf_forward(*args)
        B = log_z.shape[0]
        grads = reference.crf_backward(-torch.ones(B, dtype=log_z.dtype), torch.ones(B, dtype=log_z.dtype),
                                       *args)
        return ((gold - log_z).sum(),) + tuple(grads)

    assert_same(fused, outcome(ref, e, tags, L, tr, s, n), e.dtype, "crf_forward_backward")

    def fused_backward(*args):
        log_z, _ = torch.ops.fastner.crf_forward(*args)  # the gradients' dtype; refuses what backward must
        B = log_z.shape[0]
        return torch.ops.fastner.crf_backward(-torch.ones(B, dtype=log_z.dtype), torch.ones(B, dtype=log_z.dtype),
                                              *args)

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


