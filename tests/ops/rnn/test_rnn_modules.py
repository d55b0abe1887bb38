"""fastner.nn.LSTM / GRU / RNN as drop-ins: errors, state_dict, convert(), dropout, torch.compile."""
from __future__ import annotations

import copy
import io
import time
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastner.nn
from tests.ops.rnn.rnn_cases import (
    FORMS,
    MODES,
    RNNCase,
    assert_close,
    case_generator,
    check_structure,
    draw_case,
    fastner_class,
    flat_result,
    make_inputs,
    make_pair,
    padding_mask,
    run_fastner,
    run_torch,
    torch_class,
)


def _module_kwargs(mode, **extra):
    kwargs = dict(extra)
    if mode.startswith("RNN"):
        kwargs["nonlinearity"] = "tanh" if mode == "RNN_TANH" else "relu"
    return kwargs


def _pair(mode, *args, **kwargs):
    kwargs = _module_kwargs(mode, **kwargs)
    reference = torch_class(mode)(*args, **kwargs)
    fused = fastner_class(mode)(*args, **kwargs)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


# ---------------------------------------------------------------------------------------------
# Bad input: the same exception type torch raises for the same mistake
# ---------------------------------------------------------------------------------------------


def _state(mode, shape, **kwargs):
    h = torch.zeros(shape, **kwargs)
    return (h, torch.zeros(shape, **kwargs)) if mode == "LSTM" else h


# Each mistake: (input [T, B, I] maker, hx maker). The module is (I=4, H=3, 2 layers, uni).
T, B, I, H, L = 5, 2, 4, 3, 2
MISTAKES = {
    "wrong_feature_size": (lambda: torch.randn(T, B, I + 1), lambda mode: None),
    "hx_wrong_batch": (lambda: torch.randn(T, B, I), lambda mode: _state(mode, (L, B + 1, H))),
    "hx_wrong_layers": (lambda: torch.randn(T, B, I), lambda mode: _state(mode, (L + 1, B, H))),
    "hx_wrong_hidden": (lambda: torch.randn(T, B, I), lambda mode: _state(mode, (L, B, H + 2))),
    "hx_2d_for_batched_input": (lambda: torch.randn(T, B, I), lambda mode: _state(mode, (B, H))),
    "input_float64_module_float32": (lambda: torch.randn(T, B, I, dtype=torch.float64), lambda mode: None),
    "input_int64": (lambda: torch.randint(0, 3, (T, B, I)), lambda mode: None),
    "hx_float64_module_float32": (
        lambda: torch.randn(T, B, I),
        lambda mode: _state(mode, (L, B, H), dtype=torch.float64),
    ),
    "input_4d": (lambda: torch.randn(T, B, I, 1), lambda mode: None),
    "input_on_meta": (lambda: torch.randn(T, B, I, device="meta"), lambda mode: None),
    "hx_on_meta": (lambda: torch.randn(T, B, I), lambda mode: _state(mode, (L, B, H), device="meta")),
}


def _raised(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 (the type is what is compared)
        return err
    return None


@pytest.mark.parametrize("form", ["padded", "packed", "lengths"])
@pytest.mark.parametrize("mistake", sorted(MISTAKES))
@pytest.mark.parametrize("mode", MODES)
def test_bad_input_raises_like_torch(mode, mistake, form):
    make_x, make_hx = MISTAKES[mistake]
    if form != "padded" and mistake == "input_4d":
        pytest.skip("a PackedSequence cannot carry a 4-D input")
    reference, fused = _pair(mode, I, H, num_layers=L)
    x, hx = make_x(), make_hx(mode)
    lengths = torch.tensor([T, 2])

    def call(module, with_lengths):
        if form == "packed":
            return module(pack_padded_sequence(x, lengths), hx)
        if with_lengths:
            return module(x, hx, lengths=lengths)
        return module(x, hx)

    # torch has no lengths=; its answer for the padded input is the yardstick there.
    expected = _raised(lambda: call(reference, with_lengths=False))
    got = _raised(lambda: call(fused, with_lengths=(form == "lengths")))
    assert expected is not None, "torch accepted this input; the test is wrong"
    assert got is not None, f"fastner accepted {mistake} ({form}); torch raised {expected!r}"
    assert isinstance(got, type(expected)), f"{mistake} ({form}): torch raised {expected!r}, fastner {got!r}"


BAD_LENGTHS = {
    "too_long_vector": torch.tensor([3, 2, 1]),
    "two_dimensional": torch.tensor([[3], [2]]),
    "scalar": torch.tensor(3),
    "greater_than_T": torch.tensor([T + 1, 2]),
    "negative": torch.tensor([3, -1]),
    "float_dtype": torch.tensor([3.0, 2.0]),
    "bool_dtype": torch.tensor([True, True]),
    "list": [3, 2],
}


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bad", sorted(BAD_LENGTHS))
@pytest.mark.parametrize("mode", MODES)
def test_bad_lengths_raise_value_error(mode, bad, batch_first):
    _, fused = _pair(mode, I, H, num_layers=L, bidirectional=True, batch_first=batch_first)
    x = torch.randn((B, T, I) if batch_first else (T, B, I))
    with pytest.raises(ValueError, match="lengths"):
        fused(x, lengths=BAD_LENGTHS[bad])


@pytest.mark.parametrize("bad", sorted(BAD_LENGTHS))
def test_bad_lengths_raise_value_error_on_the_torch_fallback(bad):
    # proj_size > 0 runs torch's LSTM on the packed batch: lengths= must be checked as on the
    # fused path (packing took a short vector, floats and bools, and gave a smaller batch).
    fused = fastner.nn.LSTM(I, H, num_layers=L, proj_size=2)
    with pytest.raises(ValueError, match="lengths"):
        fused(torch.randn(T, B, I), lengths=BAD_LENGTHS[bad])


@pytest.mark.parametrize("mode", MODES)
def test_torch_fallback_takes_lengths_of_zero_like_the_fused_path(mode, monkeypatch):
    # Configurations the kernels do not cover run torch on the packed batch, which refuses
    # length 0; the fused path takes it (zeros out, initial state kept). Same answer, same
    # gradients, whichever path runs.
    gen = case_generator(MODES.index(mode), salt=71)
    cls = fastner_class(mode)
    for batch_first, with_hx, lengths in [(False, True, [0, 4, 2]), (True, False, [3, 0, 0]),
                                          (True, True, [0, 0, 0]), (False, False, [4, 4, 0])]:
        module = cls(3, 4, **_module_kwargs(mode, num_layers=2, bidirectional=True,
                                            batch_first=batch_first)).double()
        x = torch.randn((3, 4, 3) if batch_first else (4, 3, 3), generator=gen, dtype=torch.float64,
                        requires_grad=True)
        states = [torch.randn(4, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
                  for _ in range(2 if mode == "LSTM" else 1)] if with_hx else []
        hx = (tuple(states) if mode == "LSTM" else states[0]) if with_hx else None
        lengths = torch.tensor(lengths)
        leaves = [x, *states, *module.parameters()]
        results = []
        for fusable in (True, False):
            with monkeypatch.context() as patch:
                if not fusable:
                    patch.setattr(cls, "_fusable", lambda self, input, hx: False)
                output, state = module(x, hx, lengths=lengths)
            flat = [output, *(state if mode == "LSTM" else (state,))]
            loss = sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view(t.shape)).sum() for t in flat)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            # No gradient at all (None) where no sequence runs: zeros, as the fused op gives.
            results.append(flat + [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)])
        for i, (got, expected) in enumerate(zip(results[1], results[0])):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=f"{lengths} result {i}")
    # Every sequence of length 0 in a batch of T = 0 steps too.
    module = cls(3, 4, **_module_kwargs(mode, proj_size=2) if mode == "LSTM" else _module_kwargs(mode))
    output, _ = module(torch.randn(0, 2, 3), lengths=torch.zeros(2, dtype=torch.long))
    assert output.shape == (0, 2, 2 if mode == "LSTM" else 4)


@pytest.mark.parametrize("mode", MODES)
def test_lengths_with_packed_input_raises_value_error(mode):
    # A PackedSequence carries its own lengths; a second set is a mistake, not something to pick from.
    _, fused = _pair(mode, I, H)
    packed = pack_padded_sequence(torch.randn(T, B, I), torch.tensor([T, 2]))
    with pytest.raises(ValueError, match="lengths"):
        fused(packed, lengths=torch.tensor([T, 2]))


# ---------------------------------------------------------------------------------------------
# Drop-in: class, parameters, state_dict
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_is_a_torch_module_with_the_same_parameters(mode):
    reference, fused = _pair(mode, 7, 5, num_layers=3, bidirectional=True, bias=False)
    assert isinstance(fused, torch_class(mode))
    assert fused.mode == reference.mode
    if mode.startswith("RNN"):
        assert fused.nonlinearity == reference.nonlinearity
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in reference.named_parameters()]
    for (n, p), (_, q) in zip(fused.named_parameters(), reference.named_parameters()):
        assert p.shape == q.shape and p.dtype == q.dtype, n
    assert list(fused.state_dict()) == list(reference.state_dict())
    assert fused._flat_weights_names == reference._flat_weights_names
    assert repr(fused).split("(", 1)[1] == repr(reference).split("(", 1)[1]


@pytest.mark.parametrize("mode", MODES)
def test_a_weight_swapped_in_the_parameter_dict_is_the_one_that_runs(mode):
    # what torch's _weights_have_changed exists for (a tensor put straight into _parameters, as
    # torch.nn.utils.stateless may): the fused layer's own _update_flat_weights sees it too
    reference, fused = _pair(mode, 4, 3, bidirectional=True)
    x, lengths = torch.randn(5, 2, 4), torch.tensor([5, 3])  # [T, B, I]
    with torch.no_grad():
        fused(x, lengths=lengths)  # the flat weights list as it was
        new = torch.nn.Parameter(torch.randn_like(fused.weight_hh_l0_reverse))
        fused._parameters["weight_hh_l0_reverse"] = new
        reference._parameters["weight_hh_l0_reverse"] = new
        got, _ = fused(x, lengths=lengths)
        packed = pack_padded_sequence(x, lengths, batch_first=False, enforce_sorted=False)
        want, _ = torch.nn.utils.rnn.pad_packed_sequence(reference(packed)[0], total_length=x.shape[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trips_both_ways(mode):
    gen = case_generator(MODES.index(mode), salt=41)
    case = draw_case(gen, mode=mode, form="packed_unsorted", dtype=torch.float64, max_hidden=40, max_time=8)
    reference, fused = make_pair(case)  # torch -> fastner (load_state_dict) happens here
    inputs = make_inputs(case, gen, requires_grad=False)
    expected = flat_result(run_torch(case, reference, inputs))

    # fastner -> torch, through bytes as a checkpoint would go
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    back = torch_class(mode)(**case.module_kwargs()).to(case.dtype)
    back.load_state_dict(torch.load(buffer), strict=True)
    for key, value in flat_result(run_torch(case, back, inputs)).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)

    # fastner -> fastner, and a deep copy (best-model snapshots)
    again = fastner_class(mode)(**case.module_kwargs()).to(case.dtype)
    again.load_state_dict(fused.state_dict(), strict=True)
    for module in (again, copy.deepcopy(fused)):
        got = flat_result(run_fastner(case, module, inputs))
        for key, value in got.items():
            assert_close(value, expected[key], key, case)


# ---------------------------------------------------------------------------------------------
# convert()
# ---------------------------------------------------------------------------------------------


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = torch.nn.GRU(12, 6, batch_first=True, bidirectional=True)
        self.stack = torch.nn.ModuleList(
            [torch.nn.RNN(12, 5, nonlinearity="relu", batch_first=True), torch.nn.RNN(5, 4, batch_first=True)]
        )

    def forward(self, x):
        x, _ = self.gru(x)
        for rnn in self.stack:
            x, _ = rnn(x)
        return x


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh())
        self.lstm = torch.nn.LSTM(8, 6, num_layers=2, bidirectional=True)
        self.blocks = torch.nn.ModuleDict({"inner": _Inner()})
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):  # x: [T, B, 3]
        x, _ = self.lstm(self.encoder(x))
        return self.head(self.blocks["inner"](x.transpose(0, 1)))


def test_convert_swaps_nested_modules_in_place_and_keeps_outputs():
    model = _Model().double()
    model.blocks["inner"].gru.requires_grad_(False)
    model.eval()
    x = torch.randn(7, 3, 3, dtype=torch.float64)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    returned = fastner.nn.convert(model)
    assert returned is model
    assert type(model.lstm) is fastner.nn.LSTM
    assert type(model.blocks["inner"].gru) is fastner.nn.GRU
    assert all(type(m) is fastner.nn.RNN for m in model.blocks["inner"].stack)
    assert model.blocks["inner"].stack[0].nonlinearity == "relu"
    assert model.blocks["inner"].stack[1].nonlinearity == "tanh"
    assert type(model.head) is torch.nn.Linear  # nothing else touched
    assert not model.training and not model.lstm.training  # mode kept
    assert not any(p.requires_grad for p in model.blocks["inner"].gru.parameters())  # flags kept
    assert all(p.requires_grad for p in model.lstm.parameters())
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)

    # converting twice changes nothing
    assert fastner.nn.convert(model) is model
    assert type(model.lstm) is fastner.nn.LSTM


def test_convert_names_the_subclasses_it_leaves_alone():
    class Custom(torch.nn.GRU):  # may override forward: left as it is, and named
        pass

    model = torch.nn.Sequential(torch.nn.LSTM(3, 4), Custom(4, 2))
    with pytest.warns(UserWarning, match=r"fastner.nn.convert: '1' \(Custom, a subclass of torch.nn.GRU\) is "
                                         r"left as it is, not converted"):
        fastner.nn.convert(model)
    assert type(model[0]) is fastner.nn.LSTM and type(model[1]) is Custom
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastner.nn.convert(torch.nn.Sequential(torch.nn.LSTM(3, 4)))


def test_convert_swaps_torchcrf():
    if not hasattr(fastner.nn, "CRF"):
        pytest.skip("fastner.nn.CRF is not in this branch")
    torchcrf = pytest.importorskip("torchcrf")

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(4, 5, batch_first=True)
            self.crf = torchcrf.CRF(5, batch_first=True)

    model = Tagger()
    emissions = torch.randn(2, 6, 5)
    tags = torch.randint(0, 5, (2, 6))
    before = (model.crf(emissions, tags), model.crf.decode(emissions))
    fastner.nn.convert(model)
    assert isinstance(model.crf, fastner.nn.CRF)
    torch.testing.assert_close(model.crf(emissions, tags), before[0], rtol=1e-5, atol=1e-5)
    assert model.crf.decode(emissions) == before[1]


def test_convert_keeps_torchcrf_module_its_parameters_and_sharing():
    # convert() rebinds torchcrf.CRF's class in place (as it does for the recurrent layers): an
    # optimizer built before it still trains the CRF, frozen parameters stay frozen, hooks stay,
    # and a CRF shared by two parents stays one module.
    torchcrf = pytest.importorskip("torchcrf")
    crf, frozen = torchcrf.CRF(4, batch_first=True), torchcrf.CRF(4).double().requires_grad_(False)
    model = torch.nn.ModuleDict({"crf": crf, "heads": torch.nn.ModuleList([crf, frozen])})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    crf.register_forward_hook(lambda *args: calls.append(1))
    expected = torchcrf.CRF(4, batch_first=True)
    expected.load_state_dict(crf.state_dict())

    assert fastner.nn.convert(model) is model
    assert model["crf"] is crf and model["heads"][0] is crf and model["heads"][1] is frozen
    assert type(crf) is fastner.nn.CRF and type(frozen) is fastner.nn.CRF
    assert not any(p.requires_grad for p in frozen.parameters())
    assert frozen.transitions.dtype == torch.float64
    assert list(crf.state_dict()) == list(expected.state_dict())
    emissions, tags = torch.randn(2, 3, 4), torch.randint(0, 4, (2, 3))
    torch.testing.assert_close(crf(emissions, tags), expected(emissions, tags))
    assert crf.decode(emissions) == expected.decode(emissions)
    assert calls == [1]  # (decode is a method, not a forward: no hook)
    before = crf.transitions.detach().clone()
    (-crf(emissions, tags)).backward()
    optimizer.step()
    assert not torch.equal(crf.transitions, before)  # the optimizer's parameters are the CRF's


# ---------------------------------------------------------------------------------------------
# Dropout between layers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(8))
def test_dropout_training_shapes_and_eval_matches_torch(index):
    gen = case_generator(index, salt=53)
    mode, form = MODES[index % 4], FORMS[(index // 4 + index) % 4]
    case = draw_case(gen, mode=mode, form=form, max_hidden=48, max_time=10)
    case = RNNCase(**{**case.__dict__, "num_layers": max(2, case.num_layers), "dropout": 0.4})
    reference, fused = make_pair(case)
    inputs = make_inputs(case, gen)

    got = run_fastner(case, fused, inputs)  # training: random
    expected_train = run_torch(case, reference, inputs)
    check_structure(case, got, expected_train)
    if case.form == "lengths":
        assert bool((flat_result(got)["output"][padding_mask(case)] == 0).all())
    loss = sum(v.sum() for v in flat_result(got).values())
    loss.backward()  # the training path's backward runs
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fused.parameters())

    reference.eval()
    fused.eval()
    first = flat_result(run_fastner(case, fused, inputs))
    second = flat_result(run_fastner(case, fused, inputs))
    expected = flat_result(run_torch(case, reference, inputs))
    for key in expected:
        assert torch.equal(first[key], second[key]), f"eval is not deterministic ({key})"
        assert_close(first[key], expected[key], key, case, 1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_dropout_one_drops_every_input_to_upper_layers(mode):
    # With p=1 torch zeroes the whole input of layers 2.. in training: deterministic, comparable.
    gen = case_generator(MODES.index(mode), salt=59)
    case = draw_case(gen, mode=mode, dtype=torch.float64, max_hidden=32, max_time=8)
    case = RNNCase(**{**case.__dict__, "num_layers": 3, "dropout": 1.0})
    reference, fused = make_pair(case)
    inputs = make_inputs(case, gen)
    expected, got = flat_result(run_torch(case, reference, inputs)), flat_result(run_fastner(case, fused, inputs))
    for key in expected:
        assert_close(got[key], expected[key], key, case)


def _mask_readout_model(cls, hidden, p, batch_first=False):
    """A 2-layer relu RNN whose output is the dropout mask of the first layer's output, scaled.

    Layer 0 outputs 1 everywhere (zero weights, input bias 1); layer 1 is the identity
    (W_ih = I, no recurrence, zero bias), so output = relu(dropout(1)) = mask / (1 - p).
    """
    model = cls(3, hidden, num_layers=2, nonlinearity="relu", dropout=p, batch_first=batch_first)
    with torch.no_grad():
        for p_ in model.parameters():
            p_.zero_()
        model.bias_ih_l0.fill_(1.0)
        model.weight_ih_l1.copy_(torch.eye(hidden))
    return model


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_dropout_mask_statistics(backend, monkeypatch):
    if backend == "reference":
        monkeypatch.setenv("FASTNER_BACKEND", "reference")
    p, hidden, time_len, batch = 0.3, 64, 20, 16
    model = _mask_readout_model(fastner.nn.RNN, hidden, p)
    x = torch.randn(time_len, batch, 3)
    out, _ = model(x)  # [T, B, H]
    scale = 1.0 / (1.0 - p)
    kept = out != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], scale), rtol=1e-6, atol=1e-6)
    n = out.numel()
    dropped = 1.0 - kept.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped - p) < 6 * sigma, f"dropped fraction {dropped:.4f}, expected {p} +- {6 * sigma:.4f}"
    # torch draws an independent mask per element, time step and sequence (not a per-sequence mask)
    same_over_time = (kept[1:] == kept[:-1]).float().mean().item()
    same_over_batch = (kept[:, 1:] == kept[:, :-1]).float().mean().item()
    agree = p * p + (1 - p) * (1 - p)
    for what, value in (("time", same_over_time), ("batch", same_over_batch)):
        assert abs(value - agree) < 0.05, f"mask agreement across {what} {value:.3f}, expected ~{agree:.3f}"
    # two calls draw two masks
    out2, _ = model(x)
    assert not torch.equal(out, out2)


def test_dropout_backward_uses_the_forward_mask():
    # In the mask read-out model d(sum output)/d(bias_ih_l0[j]) = sum over (t, b) of output[..., j].
    model = _mask_readout_model(fastner.nn.RNN, 16, 0.5, batch_first=True)
    out, _ = model(torch.randn(6, 9, 3))
    out.sum().backward()
    torch.testing.assert_close(model.bias_ih_l0.grad, out.detach().sum(dim=(0, 1)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_dropout_follows_torch_seed(mode):
    _, fused = _pair(mode, 5, 7, num_layers=3, dropout=0.5, bidirectional=True)
    x = torch.randn(6, 4, 5)
    torch.manual_seed(1234)
    first = flat_result(fused(x))
    torch.manual_seed(1234)
    second = flat_result(fused(x))
    third = flat_result(fused(x))
    assert torch.equal(first["output"], second["output"])
    assert not torch.equal(second["output"], third["output"])


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


class _Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = fastner.nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x, lengths):  # x: [B, T, 6], lengths: [B]
        out, _ = self.lstm(x, lengths=lengths)
        return self.head(out)


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    model = _Tagger()
    compiled = torch.compile(model)
    x = torch.randn(4, 7, 6)
    lengths = torch.tensor([7, 3, 1, 5])
    eager_out = model(x, lengths)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    started = time.perf_counter()
    compiled_out = compiled(x, lengths)
    compiled_grads = torch.autograd.grad(compiled_out.square().sum(), list(model.parameters()))
    elapsed = time.perf_counter() - started
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    print(f"torch.compile first call + backward: {elapsed:.1f} s")


@pytest.mark.parametrize("mode", MODES)
def test_lengths_with_unbatched_input_raises_value_error(mode):
    _, fused = _pair(mode, I, H)
    with pytest.raises(ValueError, match="lengths"):
        fused(torch.randn(T, I), lengths=torch.tensor([T]))


def test_convert_keeps_unsupported_configs_working():
    # proj_size > 0 has no fused path: after convert() it must still give torch's answer.
    model = torch.nn.Sequential(torch.nn.LSTM(4, 6, proj_size=2, num_layers=2, bidirectional=True)).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    before = model(x)[0]
    fastner.nn.convert(model)
    assert isinstance(model[0], torch.nn.LSTM)
    torch.testing.assert_close(model(x)[0], before, rtol=1e-12, atol=1e-12)


def test_torch_compile_fullgraph_traces_the_fused_layer():
    # By default Dynamo runs nn.RNNBase subclasses eagerly; with allow_rnn it traces them, and
    # then the whole fastner layer (backend choice, stacking, fused ops) must fit in one graph.
    torch._dynamo.reset()
    model = _Tagger()
    x = torch.randn(4, 7, 6)
    lengths = torch.tensor([7, 3, 1, 5])
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(model, fullgraph=True)
        compiled_out = compiled(x, lengths)
    eager_out = model(x, lengths)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    compiled_grads = torch.autograd.grad(compiled_out.square().sum(), list(model.parameters()))
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    for g, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
