"""bf16 recurrent layers (fastner.nn.rnn_bf16.to_bf16) and the float32 GEMM kernels behind them.

The bf16 layers' arithmetic (fastner.reference.rnn_layer with bf16 weights defines it): every
product multiplies bf16 by bf16 in float32: the weights as stored, the left operand (x or h)
rounded to bf16 just for the product (reference.round_to_bf16); sums, gates and states are
float32. Three kernels compute it: AMX tiles (tdpbf16ps, csrc/cpu/rnn_gemm_amx_bf16.h) where the
CPU has AMX-BF16, else vdpbf16ps (csrc/cpu/rnn_gemm_avx512_bf16.h) where it has AVX512_BF16, else
the AVX2 kernel on rounded rows; FASTNER_CPU_ISA=avx512 / =avx2 caps the choice for the
comparisons here.

How close a kernel comes to the reference: a single step (T = 1, given hx) differs by float32
reassociation only, and is checked at float32 tolerances. Over many steps a reassociation
difference in h may move it across a bf16 rounding boundary, so that the next product's operand
differs by one bf16 ulp (2^-8 relative) and the recurrence carries a ~1e-4 difference on: the
multi-step checks allow that (_assert_matches_reference). Against the float32 layer (unrounded
weights and activations) the relative error per layer is what bf16 costs: bounded below.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastner.nn
import fastner.ops  # noqa: F401  (registers fake kernels)
from fastner import reference
from fastner._extension import has_kernel
from fastner.nn.rnn_bf16 import to_bf16
from tests import testing
from tests.ops.rnn.rnn_cases import MODES, case_generator, fastner_class
from tests.ops.rnn.samples import OP_MODE

needs_kernels = pytest.mark.skipif(not has_kernel("rnn_layer_forward", "cpu"),
                                   reason="the RNN ops have no CPU kernel in this build")

# Layer shapes (B, I, H) of the single-step checks: I = k of the W_ih product and H = k of the
# W_hh one, odd and even (an odd k pads its last pair with a zero); G*H = n, mostly not a
# multiple of 16 (a partial last panel) and from one panel to several column blocks; B (with
# some lengths 0) = m, from 1 to more than a micro-tile (8 rows) and one projection chunk (256).
# For the AMX kernel's 16 x 16 tiles in 2 x 2 blocks: k of exactly one and of just over one tile
# of 32 (16 pairs), n of one and three panels, and m around 16 and 32 rows.
STEP_SHAPES = [(1, 1, 1), (2, 2, 5), (7, 13, 37), (9, 130, 200), (17, 7, 21), (33, 131, 33), (300, 12, 40),
               (20, 32, 8), (40, 33, 12), (64, 64, 48)]


def _module(mode, input_size, hidden, num_layers=1, bidirectional=True, batch_first=True, bias=True):
    kwargs = {"nonlinearity": "relu" if mode == "RNN_RELU" else "tanh"} if mode.startswith("RNN") else {}
    return fastner_class(mode)(input_size, hidden, num_layers=num_layers, bidirectional=bidirectional,
                               batch_first=batch_first, bias=bias, **kwargs)


def _bf16_weights(mode, input_size, hidden, gen, bias=True):
    """A bidirectional layer's flat weights: bf16 w_ih / w_hh, float32 biases (torch's init range)."""
    gates = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    bound = hidden ** -0.5

    def uniform(*shape):
        return (torch.rand(*shape, generator=gen) * 2 - 1) * bound

    weights = []
    for _ in range(2):
        weights += [uniform(gates * hidden, input_size).bfloat16(), uniform(gates * hidden, hidden).bfloat16()]
        if bias:
            weights += [uniform(gates * hidden), uniform(gates * hidden)]
    return weights


def _step_case(mode, shape, gen):
    """One step (T = 1) of a bidirectional layer with a given hx (and cx): op arguments."""
    B, I, H = shape
    lengths = (torch.rand(B, generator=gen) < 0.8).long()
    lengths[0] = 1
    x = torch.randn(B, 1, I, generator=gen)
    hx = torch.randn(2, B, H, generator=gen)
    cx = torch.randn(2, B, H, generator=gen) if mode == "LSTM" else None
    return x, lengths, _bf16_weights(mode, I, H, gen, bias=B % 2 == 1), hx, cx


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


def _assert_matches_reference(got, want, what):
    """Many steps: NaN where the reference has it, every value within 2e-3 (a bf16 rounding of
    h moved by reassociation, carried on by the recurrence: ~1e-4 measured at these shapes), and
    three quarters of the values within float32 noise (measured: >= 93% over 160 seeds), which a
    systematic error such as another rounding of the operands would not leave."""
    assert torch.equal(got.isnan(), want.isnan()), what
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3, equal_nan=True, msg=lambda m: f"{what}: {m}")
    finite = want.isfinite()
    close = ((got - want).abs() <= 2e-6 + 1e-5 * want.abs())[finite].float().mean() if finite.any() else 1.0
    assert close >= 0.75, f"{what}: only {float(close):.0%} of the values within float32 noise of the reference"


def _bf16_kernels_run():
    """{"k=.. n=..": kernel} for every bf16 product shape run so far in this process."""
    from fastner import _C

    lines = [line for line in _C.rnn_gemm_choices() if line.startswith("bf16 ")]
    return dict(line[len("bf16 "):].split(": ") for line in lines)


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
def test_bf16_step_matches_reference(mode):
    # One step: both products' operands are the given x and hx rounded once, so the kernel
    # differs from the reference by float32 reassociation only.
    gen = case_generator(MODES.index(mode), salt=401)
    for shape in STEP_SHAPES:
        x, lengths, weights, hx, cx = _step_case(mode, shape, gen)
        got = fastner.ops.rnn_layer(x, lengths, weights, hx, cx, OP_MODE[mode], True, True)
        want = reference.rnn_layer(x, lengths, weights, hx, cx, OP_MODE[mode], True, True)
        for name, g, w in zip(("output", "h_n", "c_n"), got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-6, msg=lambda m: f"{mode} {shape} {name}: {m}")


@needs_kernels
def test_bf16_dot_product_kernel_runs_where_the_cpu_has_it():
    # Fails if the AMX or the AVX512_BF16 kernel is silently not taken on a CPU that has it (or
    # taken where FASTNER_CPU_ISA forbids it: the subprocess test below).
    expected = testing.expected_bf16_kernel()
    if expected is None:
        pytest.skip("no /proc/cpuinfo: cannot tell which kernel this CPU should run")
    gen = case_generator(0, salt=403)
    x, lengths, weights, hx, cx = _step_case("GRU", (5, 13, 37), gen)
    fastner.ops.rnn_layer(x, lengths, weights, hx, cx, "gru", True, True)
    run = _bf16_kernels_run()
    assert run.get("k=13 n=111") == expected and run.get("k=37 n=111") == expected, run
    assert set(run.values()) == {expected}, run


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["batch_first", "time_major"])
def test_bf16_layer_matches_reference(mode, layout, monkeypatch):
    # The module (two layers, both directions, padded / lengths= / packed input) against the
    # same module on the reference path (FASTNER_BACKEND=reference: reference.rnn_layer).
    gen = case_generator(MODES.index(mode) * 2 + (layout == "time_major"), salt=409)
    batch_first = layout == "batch_first"
    # Hidden 21: the last 16-column panel is partial; batch 9: more than one 8-row micro-tile.
    bf16 = to_bf16(_module(mode, 11, 21, num_layers=2, bidirectional=True, batch_first=batch_first))
    B, T = 9, 9
    x = torch.randn((B, T, 11) if batch_first else (T, B, 11), generator=gen)
    lengths = _lengths(gen, B, T)
    h0 = torch.randn(4, B, 21, generator=gen)
    hx = (h0, torch.randn(4, B, 21, generator=gen)) if mode == "LSTM" else h0
    with torch.no_grad():
        got = _forms(bf16, x, lengths, hx)
        monkeypatch.setenv("FASTNER_BACKEND", "reference")
        want = _forms(bf16, x, lengths, hx)
    for form in got:
        for g, w in zip(_flatten(got[form]), _flatten(want[form])):
            assert g.dtype == torch.float32
            _assert_matches_reference(g, w, f"{mode} {form}")


_CAPPED_SCRIPT = r"""
import json, sys, torch, fastner.ops
from fastner import reference
from tests.ops.rnn.test_rnn_bf16 import STEP_SHAPES, _bf16_kernels_run, _step_case, _bf16_weights
from tests.ops.rnn.samples import OP_MODE
results, worst = {}, 0.0
for index, mode in enumerate(OP_MODE):
    gen = torch.Generator().manual_seed(index)
    for shape in STEP_SHAPES:
        args = _step_case(mode, shape, gen)
        got = fastner.ops.rnn_layer(*args, OP_MODE[mode], True, True)
        want = reference.rnn_layer(*args, OP_MODE[mode], True, True)
        worst = max(worst, max(float((g - w).abs().max()) for g, w in zip(got, want) if g.numel()))
        results[f"{mode} {shape}"] = [args, got]
    x = torch.randn(9, 12, 130, generator=gen)
    lengths = torch.tensor([12, 3, 7, 12, 1, 9, 12, 5, 2])
    weights = _bf16_weights(mode, 130, 200, gen)
    results[f"{mode} steps"] = [(x, lengths, weights, None, None),
                                fastner.ops.rnn_layer(x, lengths, weights, None, None, OP_MODE[mode], True, True)]
torch.save(results, sys.argv[1])
print(json.dumps({"kernels": sorted(set(_bf16_kernels_run().values())), "worst_step": worst}))
"""


@needs_kernels
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_bf16_capped_kernels_give_the_same_arithmetic(isa, tmp_path):
    # FASTNER_CPU_ISA=avx2 makes the AVX2 kernel serve (rows rounded to bf16, weights widened),
    # =avx512 the AVX512_BF16 one where the CPU has it (no AMX): against the reference, and
    # against this process's kernel (AMX where the CPU has it) on the same inputs: one
    # arithmetic whatever the CPU.
    expected = testing.expected_bf16_kernel(isa)
    if expected is None:
        pytest.skip("no /proc/cpuinfo: cannot tell which kernel the capped process should run")
    env = dict(os.environ, FASTNER_CPU_ISA=isa)
    root = str(testing.REPO_ROOT)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    saved = tmp_path / f"{isa}.pt"
    out = subprocess.run([sys.executable, "-c", _CAPPED_SCRIPT, str(saved)], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["kernels"] == [expected], report
    assert report["worst_step"] <= 1e-5, report  # float32 reassociation only (checked at 2e-6 + 1e-5 rel above)
    for case, (args, capped) in torch.load(saved).items():
        mode = case.split()[0]
        here = fastner.ops.rnn_layer(*args, OP_MODE[mode], True, True)
        for g, w in zip(here, capped):
            if case.endswith("steps"):
                _assert_matches_reference(g, w, f"{case}: this CPU's kernel vs {expected}")
            else:
                torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-6, msg=lambda m: f"{case}: {m}")


@needs_kernels
def test_bf16_denormals_and_nonfinite_operands_are_read_as_the_reference_reads_them():
    # Denormal inputs (x and weights) are products' zeros in both kernels and the reference;
    # +-inf and NaN in x reach the output as in float32.
    gen = case_generator(0, salt=421)
    tiny = torch.finfo(torch.float32).tiny
    weights = _bf16_weights("RNN_TANH", 6, 5, gen)
    weights[0][0, :3] = torch.tensor([tiny / 4, -tiny / 2, 1e-39]).bfloat16()  # bf16 denormals
    x = torch.randn(4, 1, 6, generator=gen)
    x[0, 0, :2] = torch.tensor([tiny / 8, -tiny * 0.999])  # float32 denormals
    x[1, 0, 0] = float("inf")
    x[2, 0, 1] = float("nan")
    hx = torch.randn(2, 4, 5, generator=gen)
    lengths = torch.ones(4, dtype=torch.long)
    got = fastner.ops.rnn_layer(x, lengths, weights, hx, None, "rnn_tanh", True, True)
    want = reference.rnn_layer(x, lengths, weights, hx, None, "rnn_tanh", True, True)
    for g, w in zip(got[:2], want[:2]):
        assert torch.equal(g.isnan(), w.isnan())
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-6, equal_nan=True)
    assert got[0][2].isnan().any() and not got[0][3].isnan().any()
    rounded = reference.round_to_bf16(torch.tensor([tiny / 8, -tiny / 2, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8,
                                                    float("inf"), float("nan")]))
    # denormals to zeros of their sign; 1 + 2^-8 and 1 + 3 * 2^-8 are halfway (bf16's ulp at 1 is
    # 2^-7): ties to the even neighbour
    assert rounded[:4].tolist() == [0.0, 0.0, 1.0, 1.0 + 2 ** -6]
    assert str(rounded[1].item()) == "-0.0" and rounded[4] == float("inf") and rounded[5].isnan()


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
def test_bf16_relative_error_per_layer_is_bounded(mode):
    # One layer at the tagger's width on N(0, 1) inputs with torch's default init: the relative
    # Frobenius error of the bf16 layer's output against the float32 layer. bf16 keeps 8 bits of
    # mantissa (relative rounding <= 2^-9 = 0.2% per weight and per operand of x and h); summed
    # over H + I random-signed products the output error is ~0.25% (measured 0.0025-0.0027 for
    # the four cells on an AMD EPYC Zen 4, seeds 0-2; 0.0018-0.0019 when only the weights were
    # rounded, before the products took bf16 operands). Bound: 0.5%.
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
    # hx of the batched rank with unbatched input: torch's error, not a shape mismatch of a 4-D hx.
    with pytest.raises(RuntimeError, match="unbatched 2-D input, hx should also be 2-D"):
        bf16(x, torch.zeros(1, 1, 4))


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
    # Measured (not forced) float32 shapes name both kernels' rates and the choice; bf16 weight
    # shapes name their kernel ("bf16 k=.. n=..: amx_bf16", "...: avx512_bf16" or "...: avx2").
    for line in lines:
        if line.startswith("bf16 "):
            assert line.split(": ")[1] in ("amx_bf16", "avx512_bf16", "avx2"), line
        else:
            assert "mkl_packed" in line and "avx2" in line and "->" in line, line


def test_bf16_no_steps_without_lengths_is_refused_like_torch():
    # T = 0 without lengths=: torch's error for its layers (not a dtype error from running
    # torch's layer on bf16 weights); with lengths= a batch of empty sequences.
    layer = to_bf16(torch.nn.GRU(3, 4))
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0"):
        layer(torch.randn(0, 2, 3))
    assert layer(torch.randn(0, 2, 3), lengths=torch.zeros(2, dtype=torch.long))[0].shape == (0, 2, 4)
