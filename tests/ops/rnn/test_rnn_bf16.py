"""bf16 recurrent layers (fastner.nn.rnn_bf16.to_bf16) and the float32 GEMM kernels behind them.

The bf16 layers' reference arithmetic: the float32 computation with w_ih / w_hh rounded to
bfloat16 (fastner.reference.rnn_layer widens the bf16 weights exactly); the kernel differs
from it by float reassociation only. Against the float32 layer (unrounded weights), the
relative error per layer is what bf16 weights cost: bounded below.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastner.nn
import fastner.ops  # noqa: F401  (registers fake kernels)
from fastner import reference
from fastner._extension import has_kernel
from fastner.nn.rnn_bf16 import to_bf16
from tests.ops.rnn.rnn_cases import MODES, case_generator, fastner_class
from tests.ops.rnn.samples import OP_MODE

needs_kernels = pytest.mark.skipif(not has_kernel("rnn_layer_forward", "cpu"),
                                   reason="the RNN ops have no CPU kernel in this build")


def _module(mode, input_size, hidden, num_layers=1, bidirectional=True, batch_first=True, bias=True):
    kwargs = {"nonlinearity": "relu" if mode == "RNN_RELU" else "tanh"} if mode.startswith("RNN") else {}
    return fastner_class(mode)(input_size, hidden, num_layers=num_layers, bidirectional=bidirectional,
                               batch_first=batch_first, bias=bias, **kwargs)


def _rounded_fp32(module):
    """The float32 module with w_ih / w_hh rounded to bf16: the bf16 layer's reference."""
    out = copy.deepcopy(module)
    with torch.no_grad():
        for name in out._flat_weights_names:
            if name.startswith("weight_"):
                getattr(out, name).copy_(getattr(out, name).to(torch.bfloat16).float())
    return out.eval()


def _lengths(gen, batch, steps):
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
    lengths[0] = steps
    return lengths


def _forms(module, x, lengths, hx):
    """The module's outputs on x as padded, lengths= and packed input (padded results)."""
    total = x.shape[1] if module.batch_first else x.shape[0]
    padded = module(x, hx)
    with_lengths = module(x, hx, lengths=lengths)
    packed_in = pack_padded_sequence(x, lengths, batch_first=module.batch_first, enforce_sorted=False)
    packed_out, packed_state = module(packed_in, hx)
    packed = pad_packed_sequence(packed_out, batch_first=module.batch_first, total_length=total)[0]
    return {"padded": padded, "lengths": with_lengths, "packed": (packed, packed_state)}


def _flatten(result):
    out, state = result
    states = list(state) if isinstance(state, tuple) else [state]
    return [out, *states]


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["batch_first", "time_major"])
def test_bf16_matches_rounded_fp32_reference(mode, layout):
    gen = case_generator(MODES.index(mode) * 2 + (layout == "time_major"), salt=401)
    batch_first = layout == "batch_first"
    # Hidden 21: the last 16-column panel is partial; batch 7: a partial 6-row micro-tile.
    module = _module(mode, 11, 21, num_layers=2, bidirectional=True, batch_first=batch_first)
    bf16 = to_bf16(module)
    want_module = _rounded_fp32(module)
    B, T = 7, 9
    x = torch.randn((B, T, 11) if batch_first else (T, B, 11), generator=gen)
    lengths = _lengths(gen, B, T)
    h0 = torch.randn(4, B, 21, generator=gen)
    hx = (h0, torch.randn(4, B, 21, generator=gen)) if mode == "LSTM" else h0
    with torch.no_grad():
        got = _forms(bf16, x, lengths, hx)
        want = _forms(want_module, x, lengths, hx)
    for form in got:
        for g, w in zip(_flatten(got[form]), _flatten(want[form])):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-6, msg=lambda m: f"{mode} {form}: {m}")


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
def test_bf16_op_matches_reference(mode):
    # The op itself with bf16 weights against fastner.reference.rnn_layer on the same weights.
    gen = case_generator(MODES.index(mode), salt=409)
    module = _module(mode, 13, 37, bidirectional=True)
    weights = [w.detach().to(torch.bfloat16) if i % 4 < 2 else w.detach() for i, w in enumerate(module._flat_weights)]
    x = torch.randn(6, 8, 13, generator=gen)
    lengths = torch.tensor([8, 3, 1, 8, 5, 0])
    got = fastner.ops.rnn_layer(x, lengths, weights, None, None, OP_MODE[mode], True, True)
    want = reference.rnn_layer(x, lengths, weights, None, None, OP_MODE[mode], True, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-6)


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
def test_bf16_relative_error_per_layer_is_bounded(mode):
    # One layer at the tagger's width on N(0, 1) inputs with torch's default init: the relative
    # Frobenius error of the bf16 layer's output against the float32 layer. bf16 keeps 8 bits of
    # mantissa (relative rounding <= 2^-9 = 0.2% per weight); summed over H + I random-signed
    # products the output error is ~0.2% (measured 0.0018-0.0019 for all four cells on an AMD
    # EPYC Zen 2, seed 0). Bound: 0.5%.
    gen = case_generator(MODES.index(mode), salt=419)
    module = _module(mode, 130, 200, bidirectional=True).eval()
    x = torch.randn(16, 30, 130, generator=gen)
    lengths = _lengths(gen, 16, 30)
    with torch.no_grad():
        want = module(x, lengths=lengths)[0]
        got = to_bf16(module)(x, lengths=lengths)[0]
    relative = float((got - want).norm() / want.norm())
    assert relative < 5e-3, f"{mode}: relative error {relative:.2e}"
    assert relative > 0, "the bf16 layer returned the float32 result: were the weights rounded?"


@needs_kernels
def test_bf16_refuses_training_and_gradients():
    bf16 = to_bf16(_module("LSTM", 5, 4))
    assert not bf16.training
    assert all(p.dtype == torch.bfloat16 for n, p in bf16.named_parameters() if n.startswith("weight_"))
    assert all(p.dtype == torch.float32 for n, p in bf16.named_parameters() if n.startswith("bias_"))
    assert not any(p.requires_grad for p in bf16.parameters())
    x = torch.randn(2, 3, 5)
    bf16.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        bf16(x)
    bf16.eval()
    with pytest.raises(RuntimeError, match="inference-only"):
        bf16(x.requires_grad_())
    with pytest.raises(TypeError, match="float32"):
        bf16(torch.randn(2, 3, 5, dtype=torch.float64))
    # The op refuses a training call with bf16 weights (no silent gradients), fake kernel too.
    weights = [w.detach() for w in bf16._flat_weights]
    with pytest.raises(ValueError, match="inference only"):
        torch.ops.fastner.rnn_layer_forward.default(torch.randn(2, 3, 5), torch.tensor([3, 2]), weights, None, None,
                                                    "lstm", False, True, True)
    with pytest.raises(ValueError, match="float32"):
        torch.ops.fastner.rnn_layer_forward.default(torch.randn(2, 3, 5, dtype=torch.float64), torch.tensor([3, 2]),
                                                    weights, None, None, "lstm", False, True, False)


def test_to_bf16_leaves_the_original_and_accepts_torch_modules():
    torch_lstm = torch.nn.LSTM(5, 4, batch_first=True)
    before = {k: v.clone() for k, v in torch_lstm.state_dict().items()}
    bf16 = to_bf16(torch_lstm)
    assert isinstance(bf16, fastner.nn.LSTM) and "bfloat16" in repr(bf16)
    for k, v in torch_lstm.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k])
    with pytest.raises(TypeError, match="LSTM, GRU or RNN"):
        to_bf16(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="proj_size"):
        to_bf16(torch.nn.LSTM(5, 4, proj_size=2))


@needs_kernels
def test_bf16_unbatched_input_matches_batched():
    bf16 = to_bf16(_module("GRU", 5, 4, bidirectional=False, batch_first=False))
    x = torch.randn(6, 5)
    with torch.no_grad():
        out, h = bf16(x)
        out_b, h_b = bf16(x.unsqueeze(1))
    torch.testing.assert_close(out, out_b.squeeze(1))
    torch.testing.assert_close(h, h_b.squeeze(1))


@needs_kernels
@pytest.mark.parametrize("with_hx", [False, True])
def test_opcheck_rnn_layer_forward_bf16(with_hx):
    gen = case_generator(int(with_hx), salt=431)
    module = _module("LSTM", 5, 3, bidirectional=True)
    weights = [w.detach().to(torch.bfloat16) if i % 4 < 2 else w.detach() for i, w in enumerate(module._flat_weights)]
    x = torch.randn(4, 6, 5, generator=gen)
    hx = torch.randn(2, 4, 3, generator=gen) if with_hx else None
    cx = torch.randn(2, 4, 3, generator=gen) if with_hx else None
    torch.library.opcheck(torch.ops.fastner.rnn_layer_forward.default,
                          (x, torch.tensor([6, 2, 1, 5]), weights, hx, cx, "lstm", True, True, False))


# --- the float32 kernels: every GEMM choice gives the same answer (up to reassociation) ---

@needs_kernels
@pytest.mark.parametrize("kernel", ["mkl", "avx2"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_fp32_forced_gemm_kernel_matches_torch(kernel, mode, monkeypatch):
    # FASTNER_RNN_GEMM forces the kernel behind the packed products (csrc/cpu/rnn_gemm.h):
    # forward (W_ih in chunks, W_hh per step) and backward (W_hh per step) both go through it.
    monkeypatch.setenv("FASTNER_RNN_GEMM", kernel)
    gen = case_generator(["mkl", "avx2"].index(kernel) * 2 + (mode == "GRU"), salt=439)
    module = _module(mode, 19, 23, bidirectional=True)
    torch_module = (torch.nn.LSTM if mode == "LSTM" else torch.nn.GRU)(19, 23, batch_first=True, bidirectional=True)
    torch_module.load_state_dict(module.state_dict())
    # 40 x 9 = 360 rows: more than one 256-row projection chunk.
    x = torch.randn(40, 9, 19, generator=gen, requires_grad=True)
    lengths = _lengths(gen, 40, 9)
    got = module(x, lengths=lengths)[0]
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    want = pad_packed_sequence(torch_module(packed)[0], batch_first=True, total_length=9)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cot = torch.randn(got.shape, generator=gen)
    g_got = torch.autograd.grad(got, [x, *module.parameters()], cot)
    g_want = torch.autograd.grad(want, [x, *torch_module.parameters()], cot)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_unknown_forced_gemm_kernel_is_refused(monkeypatch):
    monkeypatch.setenv("FASTNER_RNN_GEMM", "blas")
    with pytest.raises(ValueError, match="FASTNER_RNN_GEMM must be 'mkl' or 'avx2'"):
        with torch.no_grad():
            _module("LSTM", 3, 2)(torch.randn(1, 2, 3))


@needs_kernels
def test_gemm_choices_are_reported():
    from fastner import _C

    module = _module("LSTM", 7, 16).eval()
    with torch.no_grad():
        module(torch.randn(3, 4, 7))
    lines = _C.rnn_gemm_choices()
    assert all(isinstance(line, str) for line in lines)
    # Measured (not forced) shapes name both kernels' rates and the choice.
    for line in lines:
        assert "mkl_packed" in line and "avx2" in line and "->" in line, line


def test_bf16_no_steps_without_lengths_is_refused_like_torch():
    # T = 0 without lengths=: torch's error for its layers (not a dtype error from running
    # torch's layer on bf16 weights); with lengths= a batch of empty sequences.
    layer = to_bf16(torch.nn.GRU(3, 4))
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0"):
        layer(torch.randn(0, 2, 3))
    assert layer(torch.randn(0, 2, 3), lengths=torch.zeros(2, dtype=torch.long))[0].shape == (0, 2, 4)
