"""torch.ops.fastner.char_embed_conv_max (csrc/cpu/char_cnn.cpp: the inference op through the
[W, V, F] table) against fastner.reference.char_embed_conv_max (its definition: char_conv_max of
the embedded characters), against the char_conv_max kernel on the same embedded words, and the
CharCNN module's inference against its training path: values, NaN and infinities, marked and
unmarked words, layouts, opcheck, fuzzing (fused and reference agree or both refuse), bad input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

import fastner.ops as ops
from fastner import reference
from fastner.models.char_cnn import CharCNN
from tests import testing
from tests.ops.fuzzing import assert_same, fuzz, outcome, randn

pytestmark = testing.requires_op("char_embed_conv_max")

op = torch.ops.fastner.char_embed_conv_max.default

# (N words, C characters, V rows, I dims, F filters, W window): the tagger's (90 chars, 30, 30,
# 3), a one-character window, more filters than one vector block (37: 5 float32 chunks, a block
# of 4 and one), a single character, no words, no characters, a wide window.
SHAPES = [(40, 12, 90, 30, 30, 3), (9, 7, 6, 5, 3, 1), (16, 13, 20, 17, 37, 5), (6, 1, 4, 4, 8, 3),
          (0, 5, 3, 3, 2, 3), (4, 0, 3, 3, 2, 3), (5, 6, 7, 3, 70, 9)]
PAD = 0


def inputs(N, C, V, I, F, W, dtype=torch.float32, layout="contiguous"):
    """Words of random lengths (padding after the word, and holes inside some), words[2] marked
    but empty, words[3] unmarked, a padding row of zeros as nn.Embedding(padding_idx) keeps it."""
    chars = torch.randint(1, max(V, 2), (N, C)) % max(V, 1)
    lengths = torch.randint(0, C + 1, (N,))
    chars[torch.arange(C) >= lengths[:, None]] = PAD
    holes = torch.rand(N, C) < 0.1
    chars[holes] = PAD
    if N > 2:
        chars[2] = PAD
    words = torch.ones(N, dtype=torch.bool)
    if N > 3:
        words[3] = False
    embedding = torch.randn(V, I, dtype=dtype)
    embedding[PAD] = 0
    weight = torch.randn(F, I, W, dtype=dtype) * 0.3
    bias = torch.randn(F, dtype=dtype)
    if layout == "transposed":  # same values, column-major storage
        chars, embedding = (t.t().contiguous().t() for t in (chars, embedding))
        weight = weight.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    elif layout == "sliced":
        chars = torch.stack([chars, torch.full_like(chars, -5)], dim=2)[:, :, 0]  # junk between
        embedding = torch.cat([embedding, torch.full_like(embedding, float("nan"))], dim=1)[:, :I]
    return chars, words, embedding, weight, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_matches_reference_and_the_convolution_kernel(shape, layout, dtype):
    testing.reseed(10 * SHAPES.index(shape) + ["contiguous", "transposed", "sliced"].index(layout))
    chars, words, embedding, weight, bias = inputs(*shape, dtype=dtype, layout=layout)
    got = op(chars, words, embedding, weight, bias, PAD)
    want = reference.char_embed_conv_max(chars, words, embedding, weight, bias, PAD)
    tol = testing.tolerances(dtype)
    torch.testing.assert_close(got, want, **tol)
    # the char_conv_max kernel on the embedded words (the module's training path)
    marked = words.nonzero().squeeze(1)
    conv, _ = torch.ops.fastner.char_conv_max(embedding[chars[marked]], chars[marked] != PAD, weight, bias)
    torch.testing.assert_close(got[marked], conv, **tol)
    assert not got[~words].any()  # unmarked words: zeros
    if shape[0] > 2:
        assert not got[2].any()  # a marked word without valid characters: zeros


def test_a_batch_of_sentences_in_its_own_shape():
    # chars [B, T, C] and words [B, T] give [B, T, F] (no reshape in a traced graph): the same
    # values as the flattened call; an index in an error names the word's place in that shape
    testing.reseed(21)
    chars, words, embedding, weight, bias = inputs(24, 6, 9, 5, 7, 3)
    flat = op(chars, words, embedding, weight, bias, PAD)
    batched = op(chars.view(4, 6, 6), words.view(4, 6), embedding, weight, bias, PAD)
    assert batched.shape == (4, 6, 7)
    assert torch.equal(batched.view(24, 7), flat)
    torch.testing.assert_close(
        batched, reference.char_embed_conv_max(chars.view(4, 6, 6), words.view(4, 6), embedding, weight, bias, PAD))
    bad = chars.view(4, 6, 6).clone()
    bad[2, 5, 1] = 9
    words = torch.ones(4, 6, dtype=torch.bool)
    for fn in (op, reference.char_embed_conv_max):
        with pytest.raises(ValueError, match=r"chars\[2, 5, 1\] = 9 is outside \[0, V = 9\)"):
            fn(bad, words, embedding, weight, bias, PAD)


def test_unmarked_words_are_not_read():
    # padding tokens may hold anything: their chars are neither checked nor looked up
    chars = torch.tensor([[1, 2, 0], [99, -7, 3]])
    words = torch.tensor([True, False])
    embedding, weight, bias = torch.randn(4, 2), torch.randn(3, 2, 3), torch.randn(3)
    got = op(chars, words, embedding, weight, bias, 0)
    assert torch.equal(got[1], torch.zeros(3))
    torch.testing.assert_close(got, reference.char_embed_conv_max(chars, words, embedding, weight, bias, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_nan_wins_and_infinities_match_the_convolution_kernel(dtype):
    testing.reseed(5)
    chars, words, embedding, weight, bias = inputs(12, 8, 10, 4, 9, 3, dtype=dtype)
    embedding[5, 1] = float("nan")
    embedding[6, 0] = float("inf")
    chars[0, 3], chars[1, 0], chars[1, 7] = 5, 6, 6  # inside, and at both ends of a word
    got = op(chars, words, embedding, weight, bias, PAD)
    assert torch.isnan(got[0]).all()
    want = reference.char_embed_conv_max(chars, words, embedding, weight, bias, PAD)
    torch.testing.assert_close(got, want, equal_nan=True, **testing.tolerances(dtype))
    # an infinite weight: taps outside the word are skipped, as the char_conv_max kernel does
    weight[0, 0, 0] = float("inf")
    got = op(chars, words, embedding, weight, bias, PAD)
    conv, _ = torch.ops.fastner.char_conv_max(embedding[chars], chars != PAD, weight, bias)
    conv[~words] = 0
    torch.testing.assert_close(got, conv, equal_nan=True, **testing.tolerances(dtype))


@pytest.mark.parametrize("pad_id", [-1, 3, 7])
def test_any_pad_id(pad_id):
    # -1 and 7 (= V) match no character: every position is valid; 3 is a real row
    testing.reseed(pad_id + 10)
    chars = torch.randint(0, 7, (10, 6))
    words = torch.rand(10) < 0.8
    embedding, weight, bias = torch.randn(7, 5), torch.randn(4, 5, 3), torch.randn(4)
    torch.testing.assert_close(op(chars, words, embedding, weight, bias, pad_id),
                               reference.char_embed_conv_max(chars, words, embedding, weight, bias, pad_id))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_opcheck(dtype):
    testing.reseed(3)
    for shape in SHAPES[:5]:
        chars, words, embedding, weight, bias = inputs(*shape, dtype=dtype)
        torch.library.opcheck(op, (chars, words, embedding, weight, bias, PAD))


def test_no_gradient_and_half_precision_takes_the_reference():
    chars, words, embedding, weight, bias = inputs(5, 4, 6, 3, 2, 3)
    with pytest.raises(ValueError, match="no gradient"):
        ops.char_embed_conv_max(chars, words, embedding.requires_grad_(True), weight, bias, PAD)
    with torch.no_grad():
        assert ops.char_embed_conv_max(chars, words, embedding, weight, bias, PAD).grad_fn is None
    half = [t.detach().to(torch.bfloat16) for t in (embedding, weight, bias)]
    got = ops.char_embed_conv_max(chars, words, *half, PAD)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, reference.char_embed_conv_max(chars, words, *half, PAD))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_the_module_in_eval_without_gradients_runs_the_table_with_the_training_paths_values(grad):
    testing.reseed(11)
    cnn = CharCNN(40, char_dim=6, filters=7, window=3).eval()
    chars = torch.randint(1, 40, (5, 9, 8))
    mask = torch.rand(5, 9) < 0.7
    chars[~mask] = torch.randint(0, 60, (int((~mask).sum()), 8))  # padding tokens: anything
    chars[..., 6:] = 0
    with torch.enable_grad():
        want = cnn(chars, mask)  # gradients on: the convolution path
    assert want.grad_fn is not None
    calls = []
    table = ops.char_embed_conv_max

    def counted(*args):
        calls.append(1)
        return table(*args)

    ops.char_embed_conv_max = counted
    try:
        with torch.set_grad_enabled(grad):
            got = cnn(chars, mask)
    finally:
        ops.char_embed_conv_max = table
    assert len(calls) == (0 if grad else 1)
    torch.testing.assert_close(got, want)
    assert not got[~mask].any()  # padding tokens get zeros whatever their chars
    with torch.no_grad():
        # more character rows than positions (5 * 9 * 8 = 360): the convolution stays
        assert not CharCNN(361, char_dim=6, filters=7).eval()._by_table(chars)
        assert CharCNN(360, char_dim=6, filters=7).eval()._by_table(chars)
        assert not cnn.train()._by_table(chars)  # dropout on the embeddings: the training path


def _bad_calls():
    chars, words, embedding, weight, bias = inputs(4, 5, 6, 3, 2, 3)
    outside = chars.clone()
    outside[1, 2] = 6
    negative = chars.clone()
    negative[0, 4] = -1
    return {
        "chars 1-D": (lambda: op(chars[0], words[0], embedding, weight, bias, PAD), "chars"),
        "words not the chars' leading shape": (lambda: op(chars[None], words, embedding, weight, bias, PAD), "words"),
        "chars int32": (lambda: op(chars.int(), words, embedding, weight, bias, PAD), "chars"),
        "chars outside V": (lambda: op(outside, words, embedding, weight, bias, PAD), r"chars\[1, 2\] = 6"),
        "chars negative": (lambda: op(negative, words, embedding, weight, bias, PAD), r"chars\[0, 4\] = -1"),
        "words shape": (lambda: op(chars, words[:3], embedding, weight, bias, PAD), "words"),
        "words dtype": (lambda: op(chars, words.long(), embedding, weight, bias, PAD), "words"),
        "words device": (lambda: op(chars, words.to("meta"), embedding, weight, bias, PAD), "words"),
        "embedding 1-D": (lambda: op(chars, words, embedding[0], weight, bias, PAD), "embedding"),
        "embedding int": (lambda: op(chars, words, embedding.long(), weight, bias, PAD), "embedding"),
        "embedding without dims": (lambda: op(chars, words, embedding[:, :0], weight[:, :0], bias, PAD), "embedding"),
        "weight inputs": (lambda: op(chars, words, embedding, weight[:, :2], bias, PAD), "weight"),
        "weight even window": (lambda: op(chars, words, embedding, weight[:, :, :2], bias, PAD), "weight"),
        "weight dtype": (lambda: op(chars, words, embedding, weight.double(), bias, PAD), "weight"),
        "bias shape": (lambda: op(chars, words, embedding, weight, bias[:1], PAD), "bias"),
        "bias dtype": (lambda: op(chars, words, embedding, weight, bias.double(), PAD), "bias"),
    }


@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_bad_input_is_a_value_error_naming_the_argument(case):
    call, name = _bad_calls()[case]
    with pytest.raises(ValueError, match=name):
        call()


CORRUPTIONS = ["none"] * 6 + ["char_above_v", "char_negative", "words_shape", "words_int", "weight_dtype",
                              "bias_shape", "even_window"]


@fuzz
def test_fused_and_reference_agree_or_both_refuse(data):
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    N, C = data.draw(st.integers(0, 6), label="N"), data.draw(st.integers(0, 7), label="C")
    V, I = data.draw(st.integers(1, 6), label="V"), data.draw(st.integers(1, 5), label="I")
    F, W = data.draw(st.integers(1, 20), label="F"), data.draw(st.sampled_from([1, 3, 5]), label="W")
    ids = data.draw(st.lists(st.integers(0, V - 1), min_size=N * C, max_size=N * C), label="chars")
    chars = torch.tensor(ids, dtype=torch.long).reshape(N, C)
    marks = data.draw(st.lists(st.booleans(), min_size=N, max_size=N), label="words")
    words = torch.tensor(marks, dtype=torch.bool).reshape(N)
    embedding, weight, bias = randn(data, (V, I), dtype), randn(data, (F, I, W), dtype), randn(data, (F,), dtype)
    pad_id = data.draw(st.integers(-1, V), label="pad_id")
    corruption = data.draw(st.sampled_from(CORRUPTIONS), label="corruption")
    if corruption in ("char_above_v", "char_negative") and N and C:
        chars = chars.clone()
        chars[N - 1, C - 1] = V if corruption == "char_above_v" else -1
    elif corruption == "words_shape":
        words = torch.ones(N + 1, dtype=torch.bool)
    elif corruption == "words_int":
        words = words.long()
    elif corruption == "weight_dtype":
        weight = weight.to(torch.float64 if dtype == torch.float32 else torch.float32)
    elif corruption == "bias_shape":
        bias = torch.zeros(F + 1, dtype=dtype)
    elif corruption == "even_window":
        weight = torch.zeros(F, I, 2, dtype=dtype)
    args = (chars, words, embedding, weight, bias, pad_id)
    assert_same(outcome(op, *args), outcome(reference.char_embed_conv_max, *args), dtype,
                f"char_embed_conv_max {corruption}")
