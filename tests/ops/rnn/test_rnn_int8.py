"""int8 recurrent layers: the op (torch.ops.fastner.rnn_layer_int8_forward) against its reference
(fastner.reference.rnn_layer_int8), the quantized modules (fastner.nn.quantize(m, torch.qint8))
against the float32 modules, refusal to train, opcheck and bad input. The packed weights the op
takes (rnn_int8_pack): test_rnn_int8_pack.py.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import fastner.nn
import fastner.ops  # noqa: F401  (registers the fake kernels)
from fastner import reference
from fastner._extension import has_kernel
from fastner.nn.quantize import Int8GRU, Int8LSTM, Int8RNN
from tests.ops.rnn.rnn_cases import (MODES, case_generator, draw_case, flat_result, make_inputs, make_pair,
                                     run_fastner)
from tests.ops.rnn.samples import LayerCase
from tests.testing import torch_threads

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
CASE_MODE = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN_TANH", "rnn_relu": "RNN_RELU"}

needs_kernel = pytest.mark.skipif(not has_kernel("rnn_layer_int8_forward", "cpu"),
                                  reason="no CPU kernel for rnn_layer_int8_forward in this build")


def test_int8_op_has_a_cpu_kernel():
    # A silent fall back to the reference would hide a broken build behind passing tests.
    assert has_kernel("rnn_layer_int8_forward", "cpu"), fastner.backend()


def pack_layer_weights(floats, D):
    """A layer's float weights in torch's order -> the int8 op's: W_ih / W_hh quantized
    (reference.quantize_weight_int8) and packed (fastner.ops.rnn_int8_pack), biases as they are."""
    per_dir = len(floats) // D
    return [fastner.ops.rnn_int8_pack(*reference.quantize_weight_int8(w)) if k % per_dir < 2 else w
            for k, w in enumerate(floats)]


def _draw_op_case(gen, mode):
    """One layer's int8 arguments: the project's layer drawer (tests/ops/rnn/samples.py; torch's
    init, either layout, bias or not, lengths in [0, T]) at the tagger's sizes and beyond, hx /
    cx given or not, its weights quantized (reference.quantize_weight_int8) and packed."""
    with_state = bool(torch.rand((), generator=gen) < 0.5)
    case = LayerCase.draw(gen, CASE_MODE[mode], torch.float32, max_batch=9, max_time=14, max_input=150,
                          max_hidden=210, with_state=with_state)
    x, lengths, floats, hx, cx = case.inputs()
    weights = pack_layer_weights(floats, 2 if case.bidirectional else 1)
    return x, lengths, weights, floats[1].shape[1], hx, cx, mode, case.bidirectional, case.batch_first


# The kernel does the reference's float32 operations in the same order and its integer sums
# exactly; what differs is the gate math (the kernels' exp/tanh, ~1e-7 relative) and the order
# of the bias additions. A state that differs by that much can round one quantized entry of the
# next step's h to the neighbouring level, which moves that step's product by about one
# quantization step; measured over these 120 cases (seed 0): largest difference 6.0e-5, median
# 2.4e-7.
OP_ATOL = 1e-2


@needs_kernel
@pytest.mark.parametrize("mode", sorted(GATES))
def test_int8_op_matches_reference(mode):
    worst = 0.0
    for index in range(30):
        args = _draw_op_case(case_generator(index, salt=4001 + len(mode)), mode)
        got = torch.ops.fastner.rnn_layer_int8_forward(*args)
        want = reference.rnn_layer_int8(*args)
        for name, g, w in zip(("output", "h_n", "c_n"), got, want):
            assert g.shape == w.shape and g.dtype == w.dtype, name
            if g.numel():
                diff = (g - w).abs().max().item()
                worst = max(worst, diff)
                assert diff <= OP_ATOL, f"case {index}: {name} differs by {diff}"
        # Padding is exactly zero in both.
        x, lengths, *_, batch_first = args
        out = got[0] if batch_first else got[0].transpose(0, 1)
        steps = torch.arange(out.shape[1])
        assert (out[steps[None, :] >= lengths[:, None]] == 0).all()
    # Most cases agree to float rounding: a kernel that drifted everywhere would not.
    assert worst <= OP_ATOL


# The int8 cases both product kernels run in test_int8_kernels_give_the_same_bits: the drawn
# layers of every mode, the tagger's shape (32 rows: every tile height), and rows holding
# NaN / inf (the nonfinite rows take the float product after the kernel).
_KERNEL_CASES = """
import sys, torch
import fastner
from tests.ops.rnn.rnn_cases import case_generator
from tests.ops.rnn.test_rnn_int8 import _draw_op_case, pack_layer_weights
torch.manual_seed(int(sys.argv[2]))  # the test's seed: the same cases in both processes
cases = []
for mode in ("gru", "lstm", "rnn_relu", "rnn_tanh"):
    for index in range(12):
        cases.append(_draw_op_case(case_generator(index, salt=7001 + len(mode)), mode))
gen = torch.Generator().manual_seed(5)
floats = [torch.randn(800, 130, generator=gen) / 10, torch.randn(800, 200, generator=gen) / 10,
          torch.randn(800, generator=gen), torch.randn(800, generator=gen)] * 2
weights = pack_layer_weights(floats, 2)
# Few, narrow panels (hidden 5 and 3, input 3 and 70): the AMX kernel's B tiles run past the
# packed tensor's end and go through its zero-padded copy.
for hidden, width in ((5, 3), (3, 70)):
    small = [torch.randn(4 * hidden, width, generator=gen) / 3, torch.randn(4 * hidden, hidden, generator=gen) / 3,
             torch.randn(4 * hidden, generator=gen), torch.randn(4 * hidden, generator=gen)] * 2
    cases.append((torch.randn(37, 6, width, generator=gen), torch.randint(1, 7, (37,), generator=gen),
                  pack_layer_weights(small, 2), hidden, None, None, "lstm", True, True))
x = torch.randn(32, 40, 130, generator=gen) * 2
lengths = torch.randint(1, 41, (32,), generator=gen)
cases.append((x, lengths, weights, 200, None, None, "lstm", True, True))
x = x.clone()
x[3, 2, 7] = float("nan")
x[5, 0, 1] = float("inf")
cases.append((x, lengths, weights, 200, None, None, "lstm", True, True))
outputs = [torch.ops.fastner.rnn_layer_int8_forward(*case) for case in cases]
torch.save({"kernel": fastner.backend()["cpu_int8"], "outputs": outputs}, sys.argv[1])
"""


@needs_kernel
def test_int8_kernels_give_the_same_bits(tmp_path):
    # The AMX kernel (csrc/cpu/rnn_int8_amx.h), the VNNI one (rnn_int8_vnni.h) and the AVX2 one
    # compute the same exact integer sums and the same float store, and the AVX-512 and AVX2
    # cell passes the same gate math (csrc/cpu/rnn_math.h), so a model gives the same outputs on
    # any x86-64 CPU. FASTNER_CPU_ISA=avx512 leaves AMX out (the VNNI kernel serves),
    # FASTNER_RNN_INT8=avx2 makes a process use the AVX2 kernel for the int8 products alone, and
    # FASTNER_CPU_ISA=avx2 runs everything on AVX2, as an AVX2-only CPU does: the outputs must be
    # equal bit for bit.
    import os
    import subprocess
    import sys

    from tests import testing

    if testing.expected_int8_kernel("", "") in (None, "avx2"):
        pytest.skip("this CPU has no AVX512-VNNI: only the AVX2 kernel can run here")
    root = str(testing.REPO_ROOT)
    results = {}
    for isa, int8 in (("", ""), ("avx512", ""), ("", "avx2"), ("avx2", "")):
        env = dict(os.environ, FASTNER_CPU_ISA=isa, FASTNER_RNN_INT8=int8, PYTHONPATH=os.pathsep.join(
            filter(None, [root, os.environ.get("PYTHONPATH")])))
        path = tmp_path / f"int8-{isa}-{int8}.pt"
        done = subprocess.run([sys.executable, "-c", _KERNEL_CASES, str(path), str(torch.initial_seed())], env=env, cwd=root,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        result = torch.load(path)
        # Each process ran the kernel its CPU and switches call for (not silently another).
        assert result["kernel"] == testing.expected_int8_kernel(isa, int8), (isa, int8, result["kernel"])
        results[f"FASTNER_CPU_ISA={isa} FASTNER_RNN_INT8={int8} ({result['kernel']})"] = result["outputs"]
    everything_avx2 = results.pop("FASTNER_CPU_ISA=avx2 FASTNER_RNN_INT8= (avx2)")
    for run, outputs in results.items():
        for index, (fast, want) in enumerate(zip(outputs, everything_avx2)):
            for name, a, b in zip(("output", "h_n", "c_n"), fast, want):
                assert torch.equal(a.isnan(), b.isnan()), f"{run} case {index}: {name} NaN positions differ"
                assert torch.equal(a.nan_to_num(), b.nan_to_num()), \
                    f"{run} case {index}: {name} differs by {(a - b).abs().nan_to_num().max().item()}"


def test_int8_kernel_switch_rejects_unknown_values():
    import os
    import subprocess
    import sys

    from tests import testing

    root = str(testing.REPO_ROOT)
    env = dict(os.environ, FASTNER_RNN_INT8="vnni512", PYTHONPATH=os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")])))
    code = ("import fastner\n"
            "try:\n"
            "    fastner.backend()\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ValueError: FASTNER_RNN_INT8 must be 'avx2'" in done.stdout, done.stdout


def test_int8_quantization_arithmetic():
    # Weights: symmetric per row; rows: asymmetric 7-bit with 0 exactly representable.
    w = torch.tensor([[0.25, -1.0, 0.5 + 1 / 63], [0.0, 0.0, 0.0]])
    w_q, scale = reference.quantize_weight_int8(w)
    assert w_q.tolist() == [[16, -63, 32], [0, 0, 0]] and scale[1] == 1.0
    x = torch.tensor([[-1.0, 0.0, 1.0], [2.0, 3.0, 5.0]])
    q, s, z = reference.quantize_rows_int8(x)
    assert q.min() >= 0 and q.max() <= 127
    assert torch.allclose((q - z) * s, x, atol=s.max().item() / 2 + 1e-7)
    assert z[1].item() == 0  # range widened to [0, 5]
    prod = reference.int8_product(x, w_q, scale)
    assert torch.allclose(prod, x @ w.t(), atol=0.05)


@needs_kernel
@pytest.mark.parametrize("mode", sorted(GATES))
def test_opcheck_rnn_layer_int8_forward(mode):
    for index in range(3):
        args = _draw_op_case(case_generator(index, salt=4100 + len(mode)), mode)
        torch.library.opcheck(torch.ops.fastner.rnn_layer_int8_forward.default, args,
                              test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

# Relative error (Frobenius) of the int8 module's output against the float32 module on the
# 24 cases below (seed 0): median 1.3%, largest 2.7% (7-bit activations and weights; the error
# grows with depth and time).
MODULE_RTOL = 0.06


@pytest.mark.parametrize("index", range(24))
def test_int8_module_close_to_float(index):
    gen = case_generator(index, salt=4201)
    case = draw_case(gen, dtype=torch.float32, max_hidden=120, max_input=80, max_time=16)
    _, fused = make_pair(case)
    inputs = make_inputs(case, gen, requires_grad=False)
    with torch.no_grad():
        want = flat_result(run_fastner(case, fused, inputs))
    quantized = fastner.nn.quantize(fused, torch.qint8)
    assert isinstance(quantized, (Int8LSTM, Int8GRU, Int8RNN))
    with torch.no_grad():
        result = run_fastner(case, quantized, inputs)
    got = flat_result(result)
    if case.form.startswith("packed"):
        assert isinstance(result[0], PackedSequence)
    for name in want:
        assert got[name].shape == want[name].shape, name
        err = ((got[name] - want[name]).norm() / want[name].norm().clamp(min=1e-6)).item()
        assert err <= MODULE_RTOL, f"{case}: {name} relative error {err:.4f}"


@pytest.mark.parametrize("mode", MODES)
def test_int8_module_forms_agree(mode):
    # Tensor + lengths=, PackedSequence and the op called layer by layer give the same numbers.
    gen = case_generator(7, salt=4301 + len(mode))
    case = draw_case(gen, mode=mode, form="lengths", dtype=torch.float32, max_hidden=64, max_input=40)
    _, fused = make_pair(case)
    quantized = fastner.nn.quantize(fused, torch.qint8)
    inputs = make_inputs(case, gen, requires_grad=False)
    with torch.no_grad():
        out, _ = run_fastner(case, quantized, inputs)
        packed = torch.nn.utils.rnn.pack_padded_sequence(inputs.x, inputs.lengths, batch_first=case.batch_first,
                                                         enforce_sorted=False)
        out_p, _ = quantized(packed, None if inputs.hx is None else (inputs.hx if mode == "LSTM" else inputs.hx[0]))
        out_p, _ = torch.nn.utils.rnn.pad_packed_sequence(out_p, batch_first=case.batch_first,
                                                          total_length=case.time_len)
    torch.testing.assert_close(out, out_p, atol=1e-6, rtol=1e-6)


def test_quantize_swaps_torch_and_fastner_layers_in_place():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LSTM(6, 5, bidirectional=True),
                                torch.nn.ModuleList([torch.nn.GRU(6, 3), fastner.nn.RNN(6, 2, num_layers=2)]))
    keys = list(model.state_dict())
    params = [p.clone() for p in model.parameters()]
    out = fastner.nn.quantize(model, torch.qint8)
    assert out is model
    assert type(model[1]) is Int8LSTM and type(model[2][0]) is Int8GRU and type(model[2][1]) is Int8RNN
    assert type(model[0]) is torch.nn.Linear
    assert list(model.state_dict()) == keys  # the int8 copies are not saved
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert fastner.nn.quantize(model, torch.qint8) is model  # idempotent
    single = fastner.nn.quantize(torch.nn.GRU(3, 4), torch.qint8)
    assert type(single) is Int8GRU and not single.training


def test_quantize_names_the_subclasses_it_leaves_in_float():
    # A subclass may override forward (this one scales its input), which rebinding its class
    # would drop: it stays float, and the caller is told which layer (torch's quantize_dynamic
    # says nothing, and a model meant to be int8 then runs fp32).
    class Custom(torch.nn.LSTM):
        def forward(self, input, hx=None):
            return super().forward(input * 2, hx)

    class FastCustom(fastner.nn.GRU):
        pass

    for dtype in (torch.qint8, torch.bfloat16):
        model = torch.nn.Sequential(Custom(4, 5), torch.nn.LSTM(5, 3),
                                    torch.nn.ModuleDict({"inner": FastCustom(3, 2)}))
        with pytest.warns(UserWarning, match="left as it is") as record:
            fastner.nn.quantize(model, dtype)
        messages = [str(w.message) for w in record if "left as it is" in str(w.message)]
        assert len(messages) == 2
        assert messages[0].startswith("fastner.nn.quantize: '0' (Custom, a subclass of torch.nn.LSTM)")
        assert messages[1].startswith("fastner.nn.quantize: '2.inner' (FastCustom, a subclass of fastner.nn.GRU)")
        assert all(f"quantized to {dtype}" in m for m in messages)
        assert type(model[0]) is Custom and type(model[2]["inner"]) is FastCustom
        assert type(model[1]) is not torch.nn.LSTM  # the plain layer beside them is swapped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left in float: no warning
        fastner.nn.quantize(torch.nn.Sequential(torch.nn.LSTM(2, 3), fastner.nn.GRU(3, 2)), torch.qint8)


def test_load_state_dict_requantizes():
    float_model = torch.nn.LSTM(5, 7)
    quantized = fastner.nn.quantize(torch.nn.LSTM(5, 7), torch.qint8)
    quantized.load_state_dict(float_model.state_dict())
    w_q, scale = reference.quantize_weight_int8(float_model.weight_hh_l0)
    assert torch.equal(quantized.int8_weight_hh_l0, w_q)
    assert torch.equal(quantized.int8_packed_weight_hh_l0, reference.rnn_int8_pack(w_q, scale))


@pytest.mark.parametrize("change", ["in_place", "data", "parameter"])
def test_float_weights_changed_after_quantize_are_requantized(change):
    # The float weights stay the layer's parameters: a change to them (in place under no_grad,
    # `.data =`, a new Parameter) must reach the next forward, not leave a stale int8 copy.
    gen = torch.Generator().manual_seed(3)
    float_model = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True)
    quantized = fastner.nn.quantize(torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True), torch.qint8)
    quantized.load_state_dict(float_model.state_dict())
    x = torch.randn(4, 3, 5, generator=gen)
    quantized(x)  # quantized once, used once
    new = torch.randn(28, 7, generator=gen)
    with torch.no_grad():
        float_model.weight_hh_l1_reverse.copy_(new)
        if change == "in_place":
            quantized.weight_hh_l1_reverse.copy_(new)
        elif change == "data":
            quantized.weight_hh_l1_reverse.data = new.clone()
        else:
            quantized.weight_hh_l1_reverse = torch.nn.Parameter(new.clone(), requires_grad=False)
    w_q, scale = reference.quantize_weight_int8(new)
    expected, _ = float_model(x)
    got, _ = quantized(x)
    assert torch.equal(quantized.int8_weight_hh_l1_reverse, w_q)
    # the packed form the op reads, packed again with them
    assert torch.equal(quantized.int8_packed_weight_hh_l1_reverse, reference.rnn_int8_pack(w_q, scale))
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)


@pytest.mark.parametrize("hidden", [6, 64, 256])
def test_float_weights_assigned_twice_between_forwards_are_requantized(hidden):
    # The second `.data =` used to get the freed storage of the one quantized last (glibc hands
    # it back; seen at hidden=256): same address, version 0, taken for current -> stale int8.
    quantized = fastner.nn.quantize(torch.nn.LSTM(4, hidden), torch.qint8)
    x = torch.randn(3, 2, 4)
    for _ in range(3):
        quantized.weight_ih_l0.data = torch.randn(4 * hidden, 4)
        quantized(x)
        quantized.weight_ih_l0.data = torch.randn(4 * hidden, 4)
        quantized.weight_ih_l0.data = torch.randn(4 * hidden, 4)
        quantized(x)
        w_q, scale = reference.quantize_weight_int8(quantized.weight_ih_l0)
        assert torch.equal(quantized.int8_weight_ih_l0, w_q)
        assert torch.equal(quantized.int8_packed_weight_ih_l0, reference.rnn_int8_pack(w_q, scale))


def test_packed_weights_are_buffers_not_saved_and_survive_copies():
    # The op reads int8_packed_<name> (packed once, when quantized): a buffer beside int8_<name>
    # and int8_scale_<name>, the packed form of exactly those, outside state_dict, and carried
    # by deepcopy, pickle and .to() like the others.
    import copy
    import io
    import pickle

    float_model = torch.nn.GRU(6, 5, num_layers=2, bidirectional=True)
    keys = list(float_model.state_dict())
    quantized = fastner.nn.quantize(copy.deepcopy(float_model), torch.qint8)
    assert list(quantized.state_dict()) == keys
    names = [n for n, _ in quantized.named_buffers()]
    for wname in ("weight_ih_l0", "weight_hh_l1_reverse"):
        assert f"int8_packed_{wname}" in names
        w_q, scale = getattr(quantized, f"int8_{wname}"), getattr(quantized, f"int8_scale_{wname}")
        assert torch.equal(getattr(quantized, f"int8_packed_{wname}"), reference.rnn_int8_pack(w_q, scale))
    x = torch.randn(4, 3, 6)
    want = quantized(x)[0]
    buffer = io.BytesIO()
    torch.save(quantized, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(quantized), pickle.loads(pickle.dumps(quantized)),
              torch.load(buffer, weights_only=False), copy.deepcopy(quantized).to("cpu").to(torch.float32)]
    for other in copies:
        assert type(other) is Int8GRU
        assert torch.equal(other(x)[0], want)
        for (name, a), (_, b) in zip(quantized.named_buffers(), other.named_buffers()):
            assert torch.equal(a, b), name
            assert a.data_ptr() != b.data_ptr(), name  # copies, not shared
    # A change to a copy's float weights requantizes and repacks that copy alone.
    copy_ = copies[0]
    with torch.no_grad():
        copy_.weight_hh_l0.mul_(-1)
    changed = copy_(x)[0]
    assert not torch.equal(changed, want) and torch.equal(quantized(x)[0], want)
    w_q, scale = reference.quantize_weight_int8(copy_.weight_hh_l0)
    assert torch.equal(copy_.int8_packed_weight_hh_l0, reference.rnn_int8_pack(w_q, scale))


def test_quantize_again_requantizes_a_change_through_data():
    # `p.data.add_()` bumps no version (torch's .data has its own counter): the forward cannot
    # see it; quantize() again is the documented way to requantize.
    quantized = fastner.nn.quantize(torch.nn.GRU(4, 6), torch.qint8)
    quantized(torch.randn(3, 2, 4))
    quantized.weight_hh_l0.data.add_(torch.randn(18, 6))
    assert fastner.nn.quantize(quantized, torch.qint8) is quantized
    w_q, scale = reference.quantize_weight_int8(quantized.weight_hh_l0)
    assert torch.equal(quantized.int8_weight_hh_l0, w_q) and torch.equal(quantized.int8_scale_weight_hh_l0, scale)
    assert torch.equal(quantized.int8_packed_weight_hh_l0, reference.rnn_int8_pack(w_q, scale))


def test_forwards_while_another_thread_requantizes():
    # A forward after a change to the float weights requantizes; another thread's forward at
    # that moment read the int8 buffers while they were deleted and not yet registered again:
    # AttributeError (seen: two threads' first forwards after `.data =`, 1 try in 300 with
    # sys.setswitchinterval(1e-6)). register_buffer made slow widens that window; the other
    # thread requantizes as such a forward does.
    import threading
    import time

    quantized = fastner.nn.quantize(torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True), torch.qint8)
    x = torch.randn(5, 3, 8)
    want = quantized(x)[0]
    slow_register = quantized.register_buffer

    def register_buffer(*args, **kwargs):
        time.sleep(0.001)
        return slow_register(*args, **kwargs)

    quantized.register_buffer = register_buffer
    done = threading.Event()

    def requantize():
        while not done.is_set():
            quantized._quantize_weights()

    requantizer = threading.Thread(target=requantize)
    requantizer.start()
    try:
        for _ in range(40):
            assert torch.equal(quantized(x)[0], want)  # the same weights: the same int8 copies
    finally:
        done.set()
        requantizer.join()


@pytest.mark.parametrize("bf", [False, True])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_int8_unbatched_input_runs_the_int8_weights(mode, bf):
    # Unbatched [T, I] went to torch's float layer (fastner's float layers hand it to torch):
    # float32 weights, not int8. It must give what the batch of one gives.
    quantized = fastner.nn.quantize(getattr(torch.nn, mode)(5, 4, num_layers=2, bidirectional=True,
                                                            batch_first=bf), torch.qint8)
    x = torch.randn(6, 5)
    hx = torch.randn(4, 4)
    hx = (hx, torch.randn(4, 4)) if mode == "LSTM" else hx
    batch_dim = 0 if bf else 1
    for state in (None, hx):
        out, h = quantized(x, state)
        batched_state = None if state is None else (
            tuple(s.unsqueeze(1) for s in state) if mode == "LSTM" else state.unsqueeze(1))
        out_b, h_b = quantized(x.unsqueeze(batch_dim), batched_state)
        assert torch.equal(out, out_b.squeeze(batch_dim))
        for a, b in zip(h if mode == "LSTM" else [h], h_b if mode == "LSTM" else [h_b]):
            assert a.shape == b.squeeze(1).shape and torch.equal(a, b.squeeze(1))
    with pytest.raises(RuntimeError, match="unbatched 2-D input"):
        quantized(x, tuple(s.unsqueeze(1) for s in hx) if mode == "LSTM" else hx.unsqueeze(1))
    with pytest.raises(ValueError, match="lengths= needs batched input"):
        quantized(x, lengths=torch.tensor([6]))


def test_quantize_refuses_a_model_quantized_to_the_other_dtype():
    # It used to leave such layers as they were, silently: quantize(m, bfloat16) of an int8
    # model answered in int8.
    int8 = fastner.nn.quantize(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LSTM(2, 3)), torch.qint8)
    with pytest.raises(ValueError, match=r"1 is already a quantized Int8LSTM"):
        fastner.nn.quantize(int8, torch.bfloat16)
    model = torch.nn.Sequential(torch.nn.GRU(2, 3), fastner.nn.quantize(torch.nn.LSTM(3, 3), torch.bfloat16))
    with pytest.raises(ValueError, match=r"1 is already a quantized BF16LSTM"):
        fastner.nn.quantize(model, torch.qint8)
    assert type(model[0]) is torch.nn.GRU  # refused before anything was swapped
    assert fastner.nn.quantize(model[1], torch.bfloat16) is model[1]  # the same dtype: as it is


def test_int8_module_refuses_training():
    lstm = fastner.nn.quantize(torch.nn.LSTM(4, 3), torch.qint8)
    x = torch.randn(2, 5, 4)
    lstm.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        lstm(x)
    lstm.eval()
    with pytest.raises(RuntimeError, match="inference-only"):
        lstm(x.requires_grad_())
    with pytest.raises(RuntimeError, match="inference-only"):
        lstm(torch.randn(2, 5, 4), (torch.zeros(1, 5, 3, requires_grad=True), torch.zeros(1, 5, 3)))
    out, _ = lstm(torch.randn(2, 5, 4))  # eval, nothing requires grad: fine, and no graph
    assert out.grad_fn is None
    with torch.no_grad():
        lstm.train()
        lstm(torch.randn(2, 5, 4))  # no grad mode: inference whatever the flag
    assert not any(p.requires_grad for p in lstm.parameters())


def test_int8_op_refuses_gradients():
    args = list(_draw_op_case(case_generator(0, salt=4401), "gru"))
    args[0] = args[0].requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        fastner.ops.rnn_layer_int8(*args)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_quantize_bad_arguments():
    with pytest.raises(ValueError, match="dtype must be torch.qint8 or torch.bfloat16"):
        fastner.nn.quantize(torch.nn.LSTM(2, 2), torch.float16)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        fastner.nn.quantize("lstm", torch.qint8)
    with pytest.raises(ValueError, match="proj_size"):
        fastner.nn.quantize(torch.nn.LSTM(2, 4, proj_size=2), torch.qint8)


def test_quantize_bf16_swaps_in_place():
    model = torch.nn.Sequential(torch.nn.LSTM(2, 3))
    x = torch.randn(4, 1, 2)
    want = model(x)[0]
    assert fastner.nn.quantize(model, torch.bfloat16) is model
    assert type(model[0]) is not torch.nn.LSTM
    assert model[0].weight_ih_l0.dtype == torch.bfloat16
    got = model(x)[0]
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # bf16 weights: ~0.2% per layer


def test_quantize_bf16_replaces_a_layer_held_under_two_names():
    # bf16 replaces layers by copies; named_children() yields a child held under two names once,
    # so the second name kept the float layer.
    shared = torch.nn.LSTM(2, 3)
    model = torch.nn.ModuleList([shared, torch.nn.Linear(3, 3), shared])
    fastner.nn.quantize(model, torch.bfloat16)
    assert model[0] is model[2] and model[0].weight_ih_l0.dtype == torch.bfloat16


@needs_kernel
def test_int8_op_bad_input():
    x, lengths, weights, H, hx, cx, mode, bi, bf = _draw_op_case(case_generator(1, salt=4501), "lstm")
    op = torch.ops.fastner.rnn_layer_int8_forward
    per_dir = len(weights) // (2 if bi else 1)
    # The unpacked int8 weight (what the op took before it took packed ones): a clear refusal.
    w_q, scale = reference.quantize_weight_int8(torch.randn(4 * H, x.shape[2]))
    for fn in (op, reference.rnn_layer_int8):
        with pytest.raises(ValueError, match=r"w_ih of direction 0 must be a packed weight \(1-D int8, from "
                                             r"fastner.ops.rnn_int8_pack\)"):
            fn(x, lengths, [w_q] + weights[1:], H, hx, cx, mode, bi, bf)
        with pytest.raises(ValueError, match="hidden_size must be"):
            fn(x, lengths, weights, 0, hx, cx, mode, bi, bf)
        # Another hidden size than the packed weights were made for: their size says so.
        with pytest.raises(ValueError, match=r"w_ih of direction 0 must be a weight \[\d+, \d+\] packed by "
                                             r"fastner::rnn_int8_pack \(\d+ bytes\), got \d+ bytes"):
            fn(x, lengths, weights, H + 16, None, None, mode, bi, bf)
        with pytest.raises(ValueError, match="weights must hold"):
            fn(x, lengths, weights[:1], H, hx, cx, mode, bi, bf)
        with pytest.raises(ValueError, match="float32"):
            fn(x.double(), lengths, weights, H, hx, cx, mode, bi, bf)
        with pytest.raises(ValueError, match="lengths"):
            fn(x, lengths + 100, weights, H, hx, cx, mode, bi, bf)
        with pytest.raises(ValueError, match="mode"):
            fn(x, lengths, weights, H, hx, cx, "lstmx", bi, bf)
        if per_dir == 4:
            with pytest.raises(ValueError, match=r"b_ih of direction 0"):
                fn(x, lengths, weights[:2] + [weights[2][:-1]] + weights[3:], H, hx, cx, mode, bi, bf)
            with pytest.raises(ValueError, match=r"b_hh of direction 0 must be float32"):
                fn(x, lengths, weights[:3] + [weights[3].double()] + weights[4:], H, hx, cx, mode, bi, bf)
        # W_ih and W_hh swapped (different K): refused, not read as the other.
        if x.shape[2] != H:
            with pytest.raises(ValueError, match="w_ih of direction 0"):
                fn(x, lengths, [weights[1], weights[0]] + weights[2:], H, hx, cx, mode, bi, bf)


@pytest.mark.parametrize("fused", [True, False])
def test_int8_weights_out_of_range_are_refused_when_packed(fused):
    # 8-bit weights could overflow the AVX2 kernel's int16 sums: refused where they are packed
    # (once, not per call), by the op and the reference, naming the argument and the first bad row
    # (the kernel checks the packed panels at once and looks for the row only when that fails).
    if fused and not has_kernel("rnn_int8_pack", "cpu"):
        pytest.skip("no CPU kernel for rnn_int8_pack in this build")
    pack = torch.ops.fastner.rnn_int8_pack if fused else reference.rnn_int8_pack
    generator = torch.Generator().manual_seed(4502)
    w = torch.randint(-63, 64, (96, 24), dtype=torch.int8, generator=generator)
    scale = torch.full((96,), 0.01)
    for value, row, col in ((64, 9, 3), (-64, 5, 23), (-128, 0, 0), (127, 95, 11)):
        bad = w.clone()
        bad[row, col] = value
        with pytest.raises(ValueError, match=rf"rnn_int8_pack: weight must be in \[-63, 63\] .*got {value} in row {row}\b"):
            pack(bad, scale)
    both = w.clone()
    both[7, 1], both[7, 2], both[30, 0] = 100, -100, 90  # the row's minimum first, as the kernel says
    with pytest.raises(ValueError, match=r"got -100 in row 7\b"):
        pack(both, scale)
    pack(w, scale)  # in range: fine
