"""The packed int8 weights (torch.ops.fastner.rnn_int8_pack, the layout in csrc/cpu/rnn_int8.h)
that rnn_layer_int8_forward takes: the kernel's bytes against fastner.reference.rnn_int8_pack's
and the documented layout, the exact round trip through reference.rnn_int8_unpack, opcheck, and
the forward's refusal of anything that is not the packed form of the weight it expects (wrong
size, dtype, rank, header; random tensors), including at odd offsets and strides.
"""
from __future__ import annotations

import pytest
import torch

import fastner.ops
from fastner import reference
from fastner._extension import has_kernel
from tests.ops.rnn.test_rnn_int8 import pack_layer_weights

needs_kernel = pytest.mark.skipif(not has_kernel("rnn_int8_pack", "cpu"),
                                  reason="no CPU kernel for rnn_int8_pack in this build")

# (N, K): empty, below / at / past a panel (16 channels) and a pair of groups (8 k), the
# tagger's W_ih / W_hh (I = 130, H = 200), and odd sizes.
SHAPES = [(0, 0), (0, 5), (3, 0), (1, 1), (7, 3), (8, 8), (15, 9), (16, 16), (17, 31), (33, 71), (48, 40),
          (800, 130), (800, 200), (600, 57), (4, 300)]


def _weight(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-63, 64, (n, k), dtype=torch.int8, generator=gen)
    scale = torch.rand(n, generator=gen) * 0.1
    return w, scale


@needs_kernel
@pytest.mark.parametrize("n, k", SHAPES)
def test_pack_matches_the_reference_and_the_documented_layout(n, k):
    w, scale = _weight(n, k, seed=n * 1000 + k)
    if n and k:
        w[0, 0], w[-1, -1] = -63, 63  # the extremes
    got = torch.ops.fastner.rnn_int8_pack(w, scale)
    want = reference.rnn_int8_pack(w, scale)
    assert got.dtype == torch.int8 and got.shape == (reference.int8_packed_bytes(n, k),)
    assert torch.equal(got, want)
    # The layout as rnn_int8.h documents it, read independently of the reference's permute.
    groups, panels, colsum_at, scale_at, total = reference.int8_pack_layout(n, k)
    assert groups == (k + 7) // 8 * 2 and panels == (n + 15) // 16 and total == got.numel()
    header = got[:64].view(torch.int64).tolist()
    assert header == [0x31304B5038494E46, n, k, groups, panels, total, 0, 0]
    assert bytes(got[:6].view(torch.uint8).tolist()) == b"FNI8PK"
    j = torch.arange(panels * 16)[:, None]
    i = torch.arange(groups * 4)[None, :]
    index = 64 + (j // 16) * groups * 64 + (i // 4) * 64 + (j % 16) // 8 * 32 + (j % 8) * 4 + i % 4
    laid_out = got[index]  # [panels * 16, groups * 4]
    assert torch.equal(laid_out[:n, :k], w)
    assert not laid_out[n:].any() and not laid_out[:, k:].any()  # zeros past N and K
    colsum = got[colsum_at:scale_at].view(torch.int32)
    assert torch.equal(colsum[:n], w.sum(1, dtype=torch.int32)) and not colsum[n:].any()
    scales = got[scale_at:].view(torch.float32)
    assert torch.equal(scales[:n], scale) and not scales[n:].any()


@pytest.mark.parametrize("n, k", SHAPES)
def test_unpack_is_exact(n, k):
    w, scale = _weight(n, k, seed=7 + n + k)
    if n:
        # every float32 bit pattern of a scale survives (the bytes are copied, never computed)
        special = torch.tensor([-0.0, 1e-45, 3.4e38, float("inf"), float("nan")])[:n]
        scale[:special.numel()] = special
    packed = fastner.ops.rnn_int8_pack(w, scale)
    w2, scale2 = reference.rnn_int8_unpack(packed, n, k)
    assert w2.dtype == torch.int8 and torch.equal(w2, w)
    assert torch.equal(scale2.view(torch.int32), scale.view(torch.int32))
    # and at an offset that is not a multiple of 4
    shifted = torch.empty(packed.numel() + 1, dtype=torch.int8)[1:]
    shifted.copy_(packed)
    w3, scale3 = reference.rnn_int8_unpack(shifted, n, k)
    assert torch.equal(w3, w) and torch.equal(scale3.view(torch.int32), scale.view(torch.int32))


@needs_kernel
@pytest.mark.parametrize("n, k", [(3, 5), (800, 130)])
def test_opcheck_rnn_int8_pack(n, k):
    w, scale = _weight(n, k, seed=11)
    torch.library.opcheck(torch.ops.fastner.rnn_int8_pack.default, (w, scale),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("fused", [True, False])
def test_pack_bad_arguments(fused):
    if fused and not has_kernel("rnn_int8_pack", "cpu"):
        pytest.skip("no CPU kernel for rnn_int8_pack in this build")
    pack = torch.ops.fastner.rnn_int8_pack if fused else reference.rnn_int8_pack
    w, scale = _weight(20, 10, seed=3)
    with pytest.raises(ValueError, match=r"rnn_int8_pack: weight must be 2-D int8 \[N, K\]"):
        pack(w.float(), scale)
    with pytest.raises(ValueError, match=r"rnn_int8_pack: weight must be 2-D int8 \[N, K\]|weight must be 2-D"):
        pack(w[0], scale)
    with pytest.raises(ValueError, match=r"rnn_int8_pack: scale must"):
        pack(w, scale[:-1])
    with pytest.raises(ValueError, match=r"rnn_int8_pack: scale must"):
        pack(w, scale.double())


# ---------------------------------------------------------------------------------------------
# The forward's checks of its packed weights
# ---------------------------------------------------------------------------------------------


def _layer(I=9, H=16, mode="gru", bidirectional=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}[mode]
    D = 2 if bidirectional else 1
    floats = []
    for _ in range(D):
        floats += [torch.randn(G * H, I, generator=gen) / 3, torch.randn(G * H, H, generator=gen) / 3,
                   torch.randn(G * H, generator=gen) / 10, torch.randn(G * H, generator=gen) / 10]
    x = torch.randn(3, 5, I, generator=gen)
    lengths = torch.tensor([5, 2, 4])
    return x, lengths, pack_layer_weights(floats, D), H, None, None, mode, bidirectional, True


def _callers():
    yield "reference", reference.rnn_layer_int8
    if has_kernel("rnn_layer_int8_forward", "cpu"):
        yield "fused", torch.ops.fastner.rnn_layer_int8_forward


@pytest.mark.parametrize("caller", [name for name, _ in _callers()])
def test_forward_refuses_packed_weights_not_made_for_the_layer(caller):
    fn = dict(_callers())[caller]
    x, lengths, weights, H, hx, cx, mode, bi, bf = _layer(I=9, H=16)
    GH = 3 * H

    def call(k, w):
        ws = list(weights)
        ws[k] = w
        return fn(x, lengths, ws, H, hx, cx, mode, bi, bf)

    w_hh = weights[5]  # direction 1's packed w_hh
    name = "w_hh of direction 1"
    for bad, message in [
        (w_hh[:-1], rf"{name} must be a weight \[{GH}, {H}\] packed by fastner::rnn_int8_pack \(\d+ bytes\), got"),
        (torch.cat([w_hh, w_hh[:4]]), rf"{name} must be a weight \[{GH}, {H}\] packed"),
        (w_hh.view(torch.uint8), rf"{name} must be a packed weight \(1-D int8"),
        (w_hh.float(), rf"{name} must be a packed weight \(1-D int8"),
        (w_hh.reshape(-1, 4), rf"{name} must be a packed weight \(1-D int8"),
        (torch.zeros_like(w_hh), rf"{name} is not a packed weight \(no rnn_int8_pack header"),
    ]:
        with pytest.raises(ValueError, match=message):
            call(5, bad)
    # The same size, packed for another shape: K = 9 and K = 16 both take 4 groups, N = 48 and
    # N = 40 both 3 panels (the header tells them apart).
    other_k = fastner.ops.rnn_int8_pack(*reference.quantize_weight_int8(torch.randn(GH, 9)))
    assert other_k.numel() == w_hh.numel()
    with pytest.raises(ValueError, match=rf"{name} was packed for a weight \[{GH}, 9\], this layer needs \[{GH}, {H}\]"):
        call(5, other_k)
    other_n = fastner.ops.rnn_int8_pack(*reference.quantize_weight_int8(torch.randn(40, H)))
    assert other_n.numel() == w_hh.numel()
    with pytest.raises(ValueError, match=rf"{name} was packed for a weight \[40, {H}\]"):
        call(5, other_n)
    tampered = w_hh.clone()
    tampered[24:32].view(torch.int64)[0] += 2  # header field 3: groups
    with pytest.raises(ValueError, match=rf"{name}'s header does not match the layout rnn_int8_pack writes"):
        call(5, tampered)
    # W_ih of direction 0 given direction 1's W_hh (the same size here): refused by its header.
    with pytest.raises(ValueError, match=rf"w_ih of direction 0 was packed for a weight \[{GH}, {H}\], this layer "
                                         rf"needs \[{GH}, 9\]"):
        call(0, w_hh)


@pytest.mark.parametrize("caller", [name for name, _ in _callers()])
def test_forward_refuses_hidden_sizes_the_packed_weights_were_not_made_for(caller):
    # Sizes in C++ are int64: an absurd hidden size or input width must give a ValueError, not
    # a size that wraps around to the packed tensor's.
    fn = dict(_callers())[caller]
    x, lengths, weights, H, hx, cx, mode, bi, bf = _layer(I=9, H=16, mode="lstm", seed=7)
    for hidden in (1, 15, 17, 32, 2**31 - 1, 2**31, 2**40, 0, -16):
        with pytest.raises(ValueError, match=r"rnn_layer_int8: (w_ih of direction 0|hidden_size must be)"):
            fn(x, lengths, weights, hidden, hx, cx, mode, bi, bf)
    wide = torch.empty(0, 5, 2**40)  # no elements, an input width of 2^40
    with pytest.raises(ValueError, match=r"rnn_layer_int8: w_ih of direction 0"):
        fn(wide, torch.zeros(0, dtype=torch.long), weights, 2**31 - 1, hx, cx, mode, bi, bf)
    with pytest.raises(ValueError, match=r"rnn_layer_int8: w_ih of direction 0"):
        fn(wide, torch.zeros(0, dtype=torch.long), weights, H, hx, cx, mode, bi, bf)


@pytest.mark.parametrize("caller", [name for name, _ in _callers()])
def test_forward_reads_packed_weights_at_any_offset_and_stride(caller):
    # A packed tensor that is a slice at an odd offset, or a strided view: copied where the
    # kernels need it, the same results.
    fn = dict(_callers())[caller]
    args = list(_layer(I=9, H=16, mode="lstm", seed=4))
    want = fn(*args)
    weights = args[2]
    shifted, strided = list(weights), list(weights)
    for k in (0, 1, 4, 5):
        buffer = torch.zeros(weights[k].numel() + 3, dtype=torch.int8)
        shifted[k] = buffer[3:]
        shifted[k].copy_(weights[k])
        wide = torch.zeros(2 * weights[k].numel(), dtype=torch.int8)
        strided[k] = wide[::2]
        strided[k].copy_(weights[k])
        assert not strided[k].is_contiguous()
    for variant in (shifted, strided):
        got = fn(*args[:2], variant, *args[3:])
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@needs_kernel
def test_forward_reads_the_packed_tensor_of_each_call():
    # No packed weights kept between calls: a changed packed tensor changes the next output.
    args = list(_layer(I=9, H=16, mode="rnn_tanh", seed=5))
    op = torch.ops.fastner.rnn_layer_int8_forward
    first = op(*args)[0]
    weights = list(args[2])
    w_q, scale = reference.rnn_int8_unpack(weights[1], 16, 16)
    weights[1] = fastner.ops.rnn_int8_pack(-w_q, scale)
    second = op(*args[:2], weights, *args[3:])[0]
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, reference.rnn_layer_int8(*args[:2], weights, *args[3:])[0], atol=1e-2, rtol=0)


@pytest.mark.parametrize("caller", [name for name, _ in _callers()])
def test_forward_fuzz_random_packed_tensors(caller):
    # Random tensors in place of a packed weight: random sizes near the right one, random dtypes
    # and ranks, random bytes, and the right size with a corrupted header. Each is refused with a
    # ValueError or (only a valid header of the right size) runs; none crashes or reads past the
    # tensor (the kernel's bounds come from the checked N and K, never from the bytes).
    fn = dict(_callers())[caller]
    gen = torch.Generator().manual_seed(99)
    x, lengths, weights, H, hx, cx, mode, bi, bf = _layer(I=9, H=16, mode="lstm", seed=6)
    right = weights[1]
    size = right.numel()
    ran = 0
    for trial in range(150):
        kind = trial % 5
        if kind == 0:  # random bytes, a random size around the right one
            n = max(0, size + int(torch.randint(-200, 200, (1,), generator=gen)))
            bad = torch.randint(-128, 128, (n,), dtype=torch.int8, generator=gen)
        elif kind == 1:  # random bytes, the right size
            bad = torch.randint(-128, 128, (size,), dtype=torch.int8, generator=gen)
        elif kind == 2:  # the right tensor with one header byte changed
            bad = right.clone()
            position = int(torch.randint(0, 64, (1,), generator=gen))
            bad[position] = int(bad[position]) ^ int(torch.randint(1, 128, (1,), generator=gen))
        elif kind == 3:  # another dtype or rank
            dtype = [torch.uint8, torch.int16, torch.int32, torch.float32, torch.bool][trial % 5]
            bad = torch.zeros(size // 2 + trial, dtype=dtype)
            if trial % 2:
                bad = bad.reshape(1, -1)
        else:  # the right header and size, random payload (trusted: runs, any finite-or-not values)
            bad = right.clone()
            bad[64:] = torch.randint(-128, 128, (size - 64,), dtype=torch.int8, generator=gen)
        ws = list(weights)
        ws[1] = bad
        try:
            out = fn(x, lengths, ws, H, hx, cx, mode, bi, bf)
        except ValueError as error:
            assert "rnn_layer_int8" in str(error) and "w_hh of direction 0" in str(error), str(error)
        else:
            assert kind == 4, kind  # a changed header or size never runs
            assert out[0].shape == (3, 5, 2 * H)
            ran += 1
    assert ran == 30  # every payload-only case ran


@needs_kernel
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_fused_and_reference_agree_on_packed_weights_from_either_packer(mode):
    # The module packs with whichever packer serves its device; both give the same bytes, so
    # the forward cannot tell.
    args = list(_layer(I=20, H=24, mode=mode, seed=8))
    by_reference = [reference.rnn_int8_pack(*reference.rnn_int8_unpack(w, 3 * 24 if mode == "gru" else 4 * 24,
                                                                       (20, 24)[k % 4]))
                    if k % 4 < 2 else w for k, w in enumerate(args[2])]
    assert all(torch.equal(a, b) for a, b in zip(args[2], by_reference))
    got = torch.ops.fastner.rnn_layer_int8_forward(*args[:2], by_reference, *args[3:])
    want = reference.rnn_layer_int8(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=0)
