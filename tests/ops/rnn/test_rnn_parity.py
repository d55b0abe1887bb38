"""fastner.nn.LSTM / GRU / RNN against torch.nn: outputs, final states and gradients.

Every case is a configuration drawn at random (layers, directions, layout, sizes, bias, hx,
lengths), fresh per case and reproducible from FASTNER_TEST_SEED; the mode x input form x
dtype grid is enumerated so that each combination is always covered.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastner.nn
from tests import testing

from tests.ops.rnn.rnn_cases import (
    DTYPES,
    FORMS,
    MODES,
    RNNCase,
    case_generator,
    compare_with_torch,
    draw_case,
    flat_result,
    make_inputs,
    make_pair,
    run_fastner,
    run_torch,
    assert_close,
    check_structure,
)

GRID = list(itertools.product(MODES, FORMS, DTYPES))


def _grid_id(params):
    mode, form, dtype = params
    return f"{mode}-{form}-{str(dtype).replace('torch.', '')}"


@pytest.mark.parametrize("mode,form,dtype", GRID, ids=[_grid_id(p) for p in GRID])
def test_matches_torch_fused(mode, form, dtype):
    index = GRID.index((mode, form, dtype))
    case = draw_case(case_generator(index), mode=mode, form=form, dtype=dtype)
    compare_with_torch(case, seed_index=index)


@pytest.mark.parametrize("mode,form,dtype", GRID, ids=[_grid_id(p) for p in GRID])
def test_matches_torch_reference_backend(mode, form, dtype, monkeypatch):
    # The pure-PyTorch reference is the oracle for the fused ops: it must agree with torch too.
    monkeypatch.setenv("FASTNER_BACKEND", "reference")
    index = GRID.index((mode, form, dtype))
    case = draw_case(case_generator(index, salt=5), mode=mode, form=form, dtype=dtype, max_hidden=64, max_time=12)
    compare_with_torch(case, seed_index=index)


@pytest.mark.parametrize("index", range(8))
def test_inference_matches_torch(index):
    # Under no_grad / inference_mode the fused path may store no activations: another code path.
    gen = case_generator(index, salt=11)
    case = draw_case(gen)
    reference, fused = make_pair(case)
    reference.eval()
    fused.eval()
    inputs = make_inputs(case, gen, requires_grad=False)
    expected = run_torch(case, reference, inputs)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            got = run_fastner(case, fused, inputs)
        check_structure(case, got, expected)
        exp_flat, got_flat = flat_result(expected), flat_result(got)
        for key in exp_flat:
            # float32 tolerance without the float64 noise estimate: these are forward values only.
            assert_close(got_flat[key], exp_flat[key], f"{key} under {context.__name__}", case, 1e-5)


@pytest.mark.parametrize("which", ["input_only", "params_only", "hx_only"])
@pytest.mark.parametrize("mode", MODES)
def test_partial_requires_grad(which, mode):
    # Backward with only some leaves requiring grad: the kernel must skip (not crash on) the rest.
    index = MODES.index(mode) * 3 + ["input_only", "params_only", "hx_only"].index(which)
    gen = case_generator(index, salt=17)
    case = draw_case(gen, mode=mode, dtype=torch.float64, max_hidden=40, max_time=10)
    case = RNNCase(**{**case.__dict__, "with_hx": True})
    reference, fused = make_pair(case)
    inputs = make_inputs(case, gen, requires_grad=False)
    if which == "input_only":
        inputs.x.requires_grad_(True)
    elif which == "hx_only":
        for h in inputs.hx:
            h.requires_grad_(True)
    if which != "params_only":
        for m in (reference, fused):
            m.requires_grad_(False)
    exp_flat = flat_result(run_torch(case, reference, inputs))
    got_flat = flat_result(run_fastner(case, fused, inputs))
    leaves = [t for t in inputs.leaves() if t.requires_grad] + [p for p in reference.parameters() if p.requires_grad]
    fused_leaves = [t for t in inputs.leaves() if t.requires_grad] + [p for p in fused.parameters() if p.requires_grad]
    cots = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in exp_flat.items()}
    exp = torch.autograd.grad(sum((exp_flat[k] * cots[k]).sum() for k in cots), leaves)
    got = torch.autograd.grad(sum((got_flat[k] * cots[k]).sum() for k in cots), fused_leaves)
    for i, (g, e) in enumerate(zip(got, exp)):
        assert_close(g, e, f"grad {i} ({which})", case)


def test_output_is_exactly_torchs_types_and_shapes_at_extremes():
    # hidden 1, input 1, T 1, B 1: all degenerate sizes at once, every mode, both layouts.
    for index, (mode, batch_first, bidirectional) in enumerate(
        itertools.product(MODES, (False, True), (False, True))
    ):
        case = RNNCase(
            mode=mode, num_layers=2, bidirectional=bidirectional, batch_first=batch_first,
            input_size=1, hidden_size=1, bias=True, dtype=torch.float64, form="padded",
            with_hx=False, time_len=1, lengths=(1,),
        )
        compare_with_torch(case, seed_index=index)


def test_unbatched_input_matches_torch():
    # torch.nn accepts unbatched input [T, I] with hx [L*D, H]; a drop-in must too.
    gen = case_generator(0, salt=23)
    for mode in MODES:
        case = RNNCase(
            mode=mode, num_layers=2, bidirectional=True, batch_first=False, input_size=5,
            hidden_size=4, bias=True, dtype=torch.float64, form="padded", with_hx=False,
            time_len=6, lengths=(6,),
        )
        reference, fused = make_pair(case)
        x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
        h0 = torch.randn(4, 4, generator=gen, dtype=torch.float64)
        hx = (h0, torch.randn_like(h0)) if mode == "LSTM" else h0
        for args in ((x,), (x, hx)):
            expected = flat_result(reference(*args))
            got = flat_result(fused(*args))
            for key in expected:
                assert got[key].shape == expected[key].shape
                assert_close(got[key], expected[key], key, case)


def test_weights_changed_after_first_call_are_used():
    # A kernel that caches packed/transposed weights must notice in-place updates
    # (optimizer steps, load_state_dict) and dtype conversion.
    gen = case_generator(0, salt=29)
    for mode in MODES:
        case = draw_case(gen, mode=mode, form="padded", dtype=torch.float64, max_hidden=32, max_time=6)
        reference, fused = make_pair(case)
        inputs = make_inputs(case, gen, requires_grad=False)
        run_fastner(case, fused, inputs)  # warm any cache
        with torch.no_grad():
            for p in reference.parameters():
                p.mul_(0.5).add_(0.01)
        fused.load_state_dict(reference.state_dict())
        exp, got = flat_result(run_torch(case, reference, inputs)), flat_result(run_fastner(case, fused, inputs))
        for key in exp:
            assert_close(got[key], exp[key], f"{key} after load_state_dict", case)
        with torch.no_grad():
            for p_ref, p_fused in zip(reference.parameters(), fused.parameters()):
                p_ref.add_(0.03)
                p_fused.add_(0.03)
        exp, got = flat_result(run_torch(case, reference, inputs)), flat_result(run_fastner(case, fused, inputs))
        for key in exp:
            assert_close(got[key], exp[key], f"{key} after in-place update", case)
        # float64 -> float32 after construction
        reference.float()
        fused.float()
        inputs32 = make_inputs(RNNCase(**{**case.__dict__, "dtype": torch.float32}), gen, requires_grad=False)
        case32 = RNNCase(**{**case.__dict__, "dtype": torch.float32})
        exp, got = flat_result(run_torch(case32, reference, inputs32)), flat_result(run_fastner(case32, fused, inputs32))
        for key in exp:
            assert_close(got[key], exp[key], f"{key} after .float()", case32, 1e-5)


def test_proj_size_falls_back_to_torch():
    gen = case_generator(0, salt=31)
    reference = torch.nn.LSTM(6, 8, num_layers=2, bidirectional=True, proj_size=3, dtype=torch.float64)
    fused = fastner.nn.LSTM(6, 8, num_layers=2, bidirectional=True, proj_size=3, dtype=torch.float64)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(5, 4, 6, generator=gen, dtype=torch.float64)
    exp, got = flat_result(reference(x)), flat_result(fused(x))
    for key in exp:
        torch.testing.assert_close(got[key], exp[key], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(200))
def test_matches_torch_sweep(index):
    case = draw_case(case_generator(index, salt=97), max_time=40, max_batch=16)
    compare_with_torch(case, seed_index=index)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(60))
def test_matches_torch_reference_backend_sweep(index, monkeypatch):
    monkeypatch.setenv("FASTNER_BACKEND", "reference")
    case = draw_case(case_generator(index, salt=101), max_hidden=128, max_time=20)
    compare_with_torch(case, seed_index=index)


@pytest.mark.parametrize("mode", MODES)
def test_zero_lengths_output_zeros_and_keep_the_initial_state(mode):
    # torch cannot pack an empty sequence; with lengths= fastner gives it zeros and hx (the op's
    # documented meaning). The other sequences must be unaffected by their empty neighbours.
    gen = case_generator(MODES.index(mode), salt=43)
    case = draw_case(gen, mode=mode, form="lengths", dtype=torch.float64, max_hidden=24, max_time=8, max_batch=5)
    lengths = list(case.lengths) + [0, 0]
    case = RNNCase(**{**case.__dict__, "lengths": tuple(lengths), "with_hx": True})
    reference, fused = make_pair(case)
    inputs = make_inputs(case, gen)
    out, state = run_fastner(case, fused, inputs)
    states = state if isinstance(state, tuple) else (state,)
    batch_dim = 0 if case.batch_first else 1
    keep = torch.tensor([i for i, n in enumerate(lengths) if n > 0])
    empty = torch.tensor([i for i, n in enumerate(lengths) if n == 0])
    assert bool((out.index_select(batch_dim, empty) == 0).all())
    for got, initial in zip(states, inputs.hx):
        assert torch.equal(got[:, empty], initial[:, empty])
    # the non-empty sequences match torch on the batch without the empty ones
    sub_case = RNNCase(**{**case.__dict__, "lengths": tuple(n for n in lengths if n > 0)})
    sub_inputs = type(inputs)(
        x=inputs.x.index_select(batch_dim, keep),
        hx=tuple(h[:, keep] for h in inputs.hx),
        lengths=inputs.lengths[keep],
    )
    expected = flat_result(run_torch(sub_case, reference, sub_inputs))
    got = {"output": out.index_select(batch_dim, keep)}
    got.update(dict(zip(("h_n", "c_n"), (s[:, keep] for s in states))))
    for key in expected:
        assert_close(got[key], expected[key], key, case)
    # and gradients flow: d(sum h_n)/d(h0) is the identity for an empty sequence
    grad = torch.autograd.grad(states[0].sum(), inputs.hx[0])[0]
    assert torch.equal(grad[:, empty], torch.ones_like(grad[:, empty]))


def test_proj_size_with_lengths_falls_back_with_packing_semantics():
    gen = case_generator(0, salt=37)
    reference = torch.nn.LSTM(6, 8, bidirectional=True, proj_size=3, batch_first=True, dtype=torch.float64)
    fused = fastner.nn.LSTM(6, 8, bidirectional=True, proj_size=3, batch_first=True, dtype=torch.float64)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(4, 7, 6, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([3, 7, 1, 5])
    out, (h, c) = reference(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=7)
    got_out, (got_h, got_c) = fused(x, lengths=lengths)
    for g, e in ((got_out, out), (got_h, h), (got_c, c)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_low_precision_falls_back_silently(mode, recwarn):
    # No fused kernel for bfloat16: torch's implementation, same answer as torch. (Autocast:
    # test_cpu_autocast_runs_on_every_cpu.)
    gen = case_generator(MODES.index(mode), salt=47)
    case = draw_case(gen, mode=mode, form="packed_unsorted", dtype=torch.float32, max_hidden=16, max_time=6)
    reference, fused = make_pair(case)
    inputs = make_inputs(case, gen, requires_grad=False)
    with torch.no_grad():
        for module in (reference, fused):
            module.bfloat16()
        case16 = RNNCase(**{**case.__dict__, "dtype": torch.bfloat16})
        inputs16 = type(inputs)(
            x=inputs.x.bfloat16(),
            hx=None if inputs.hx is None else tuple(h.bfloat16() for h in inputs.hx),
            lengths=inputs.lengths,
        )
        expected, got = flat_result(run_torch(case16, reference, inputs16)), flat_result(run_fastner(case16, fused, inputs16))
        for key in expected:
            assert got[key].dtype == torch.bfloat16
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    assert not [w for w in recwarn.list if "fastner" in str(w.message)], [str(w.message) for w in recwarn.list]


@pytest.mark.parametrize("lower", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_cpu_autocast_runs_on_every_cpu(mode, form, lower):
    # torch sends a CPU LSTM to oneDNN and autocast casts it to `lower` without checking the
    # CPU: on one without oneDNN bf16/fp16 kernels (AVX2-only, e.g. AMD Zen 2) nn.LSTM fails
    # there ("could not create a primitive descriptor"), and fastner's LSTM failed with it
    # (Tagger.predict under autocast included); so did float16 with grad mode on, on an Intel
    # Emerald Rapids whose oneDNN claims float16. There fastner runs its float32 kernels, as
    # torch does with oneDNN off; where oneDNN can, torch's own answer, as before.
    gen = case_generator(MODES.index(mode) * len(FORMS) + FORMS.index(form), salt=61)
    case = draw_case(gen, mode=mode, form=form, dtype=torch.float32, max_hidden=16, max_time=6)
    reference, fused = make_pair(case)
    inputs = make_inputs(case, gen, requires_grad=True)
    with torch.autocast("cpu", dtype=lower):
        got = flat_result(run_fastner(case, fused, inputs))
    leaves = [inputs.x] + list(fused.parameters())
    grads = torch.autograd.grad(sum(v.float().sum() for v in got.values()), leaves, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    if fastner.nn.rnn._onednn_lstm_runs(lower, True):
        with torch.autocast("cpu", dtype=lower):
            expected = flat_result(run_torch(case, reference, inputs))
        for key in expected:
            assert got[key].dtype == expected[key].dtype
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    else:
        if mode == "LSTM" and form == "padded":  # the probe's verdict is torch's (packed input skips oneDNN)
            with pytest.raises(RuntimeError, match="primitive descriptor"), torch.autocast("cpu", dtype=lower):
                run_torch(case, reference, inputs)
        expected = flat_result(run_fastner(case, fused, inputs))
        for key in expected:
            assert got[key].dtype == torch.float32
            assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("mode", MODES)
def test_run_to_run_deterministic(mode):
    # Same inputs, same thread count: bitwise the same outputs and gradients (as torch's own CPU RNNs).
    gen = case_generator(MODES.index(mode), salt=53)
    case = draw_case(gen, mode=mode, dtype=torch.float32, max_time=16, max_batch=12)
    _, fused = make_pair(case)
    inputs = make_inputs(case, gen)
    results = []
    for _ in range(2):
        flat = flat_result(run_fastner(case, fused, inputs))
        leaves = [inputs.x] + list(fused.parameters())
        grads = torch.autograd.grad(sum(v.sum() for v in flat.values()), leaves)
        results.append([v.detach() for v in flat.values()] + list(grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_nothing_requires_grad_with_grad_enabled():
    # Frozen layer on frozen input, grad mode on: the inference path, and no autograd graph.
    gen = case_generator(0, salt=59)
    for mode in MODES:
        case = draw_case(gen, mode=mode, dtype=torch.float64, max_hidden=32, max_time=8)
        reference, fused = make_pair(case)
        fused.requires_grad_(False)
        inputs = make_inputs(case, gen, requires_grad=False)
        expected, got = flat_result(run_torch(case, reference, inputs)), flat_result(run_fastner(case, fused, inputs))
        for key in expected:
            assert not got[key].requires_grad
            assert_close(got[key], expected[key], key, case)


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_and_all_empty_sequences(mode):
    gen = case_generator(MODES.index(mode), salt=61)
    for batch_first in (False, True):
        case = RNNCase(
            mode=mode, num_layers=2, bidirectional=True, batch_first=batch_first, input_size=3,
            hidden_size=4, bias=True, dtype=torch.float64, form="padded", with_hx=False,
            time_len=5, lengths=(5, 5, 5),
        )
        reference, fused = make_pair(case)
        # B = 0: torch returns empty outputs and states; so must fastner (and backward must run)
        x = torch.randn((0, 5, 3) if batch_first else (5, 0, 3), dtype=torch.float64, requires_grad=True)
        expected, got = flat_result(reference(x)), flat_result(fused(x))
        for key in expected:
            assert got[key].shape == expected[key].shape, key
        sum(v.sum() for v in got.values()).backward()
        # every sequence of length 0 through lengths=: zeros out, initial state kept
        x = torch.randn((3, 5, 3) if batch_first else (5, 3, 3), generator=gen, dtype=torch.float64)
        h0 = torch.randn(4, 3, 4, generator=gen, dtype=torch.float64)
        hx = (h0, torch.randn(4, 3, 4, generator=gen, dtype=torch.float64)) if mode == "LSTM" else h0
        out, state = fused(x, hx, lengths=torch.zeros(3, dtype=torch.long))
        assert bool((out == 0).all())
        for s, initial in zip(state if mode == "LSTM" else (state,), hx if mode == "LSTM" else (hx,)):
            assert torch.equal(s, initial)


@pytest.mark.parametrize("mode", MODES)
def test_no_steps_without_lengths_is_refused_like_torch(mode):
    # torch refuses T = 0 ("Expected sequence length to be larger than 0"); the fused path
    # answered zeros. With lengths= (all 0) T = 0 is a batch of empty sequences: taken.
    for batch_first, batch in itertools.product((False, True), (0, 2)):
        case = RNNCase(
            mode=mode, num_layers=2, bidirectional=True, batch_first=batch_first, input_size=3,
            hidden_size=4, bias=True, dtype=torch.float64, form="padded", with_hx=False,
            time_len=1, lengths=(1,),
        )
        reference, fused = make_pair(case)
        x = torch.randn((batch, 0, 3) if batch_first else (0, batch, 3), dtype=torch.float64)
        with pytest.raises(RuntimeError) as expected:
            reference(x)
        with pytest.raises(RuntimeError) as got:
            fused(x)
        assert str(got.value) == str(expected.value)
        output, _ = fused(x, lengths=torch.zeros(batch, dtype=torch.long))
        assert output.shape == x.shape[:2] + (8,)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_and_expanded_output_gradients(mode):
    # The backward reads grad_output with its strides (out.sum() hands an expanded, stride-0
    # tensor; a permuted one has no unit stride anywhere it is read): same gradients as torch.
    gen = case_generator(MODES.index(mode), salt=67)
    for batch_first in (False, True):
        case = RNNCase(
            mode=mode, num_layers=1, bidirectional=True, batch_first=batch_first, input_size=7,
            hidden_size=5, bias=True, dtype=torch.float64, form="padded", with_hx=False,
            time_len=6, lengths=(6, 6, 6, 6),
        )
        reference, fused = make_pair(case)
        x = torch.randn((4, 6, 7) if batch_first else (6, 4, 7), generator=gen, dtype=torch.float64, requires_grad=True)
        lengths = torch.tensor([6, 2, 5, 1])
        permuted = torch.randn(10, 8, 6, dtype=torch.float64, generator=gen)[:, :4].permute(2, 1, 0)  # [6, 4, 10]
        if batch_first:
            permuted = torch.randn(10, 6, 8, dtype=torch.float64, generator=gen)[:, :, :4].permute(2, 1, 0)  # [4, 6, 10]
        for grad_kind in ("expanded", "permuted"):
            for with_lengths in (False, True):
                results = []
                for module in (reference, fused):
                    if with_lengths and module is reference:
                        packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
                        out, _ = module(packed)
                        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=6)
                    else:
                        out, _ = module(x, lengths=lengths) if with_lengths else module(x)
                    grad = torch.ones(()).expand(out.shape) if grad_kind == "expanded" else permuted
                    assert grad.shape == out.shape and not grad.is_contiguous()
                    results.append(torch.autograd.grad(out, [x] + list(module.parameters()), grad.to(out.dtype)))
                for got, expected in zip(results[1], results[0]):
                    torch.testing.assert_close(got, expected)


def test_avx2_cell_passes_where_the_cpu_has_avx512():
    # On an AVX-512 CPU the kernels use the 16-float cell passes; FASTNER_CPU_ISA=avx2 makes
    # them use the AVX2 ones, which must agree with torch too (every wheel user without
    # AVX-512 runs them). A subprocess, since the choice is made once per process.
    import os
    import subprocess
    import sys

    code = (
        "import torch, fastner.nn\n"
        "torch.manual_seed(0)\n"
        "for name in ('LSTM', 'GRU', 'RNN'):\n"
        "    ref = getattr(torch.nn, name)(37, 45, bidirectional=True)\n"
        "    fused = getattr(fastner.nn, name)(37, 45, bidirectional=True)\n"
        "    fused.load_state_dict(ref.state_dict())\n"
        "    x = torch.randn(9, 5, 37, requires_grad=True)\n"
        "    a, b = ref(x)[0], fused(x)[0]\n"
        "    torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-5)\n"
        "    g = torch.randn_like(a)\n"
        "    for u, v in zip(torch.autograd.grad(a, [x] + list(ref.parameters()), g),\n"
        "                    torch.autograd.grad(b, [x] + list(fused.parameters()), g)):\n"
        "        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-4)\n"
    )
    env = dict(os.environ, FASTNER_CPU_ISA="avx2")
    root = str(testing.REPO_ROOT)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
