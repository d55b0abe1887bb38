"""Shared helpers for the fastner.nn.LSTM / GRU / RNN tests (no tests of its own).

A test draws an `RNNCase` (a random configuration: mode, layers, directions, layout, sizes,
dtype, input form, lengths, hx) from a generator seeded by the conftest seed and the case's
index, builds a torch.nn module and a fastner.nn module holding the same weights, runs both
and compares outputs, final states and gradients.

Input forms:
  padded           a Tensor, every sequence of full length T
  lengths          fastner gets the padded Tensor and `lengths=`; torch gets the
                   PackedSequence of the same data, padded back to T afterwards
  packed_sorted    a PackedSequence built with enforce_sorted=True (lengths descending)
  packed_unsorted  a PackedSequence built with enforce_sorted=False
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastner.nn

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
FORMS = ("padded", "lengths", "packed_sorted", "packed_unsorted")
DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RNNCase:
    mode: str
    num_layers: int
    bidirectional: bool
    batch_first: bool
    input_size: int
    hidden_size: int
    bias: bool
    dtype: torch.dtype
    form: str
    with_hx: bool
    time_len: int
    lengths: Tuple[int, ...]  # one per sequence; all == time_len for the padded form
    noncontiguous_input: bool = False
    dropout: float = 0.0

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def module_kwargs(self) -> Dict:
        kwargs = dict(
            input_size=self.input_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            bias=self.bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
        )
        if self.mode.startswith("RNN"):
            kwargs["nonlinearity"] = "tanh" if self.mode == "RNN_TANH" else "relu"
        return kwargs


def torch_class(mode: str):
    return {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU}.get(mode, torch.nn.RNN)


def fastner_class(mode: str):
    return {"LSTM": fastner.nn.LSTM, "GRU": fastner.nn.GRU}.get(mode, fastner.nn.RNN)


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def _coin(gen: torch.Generator, p: float = 0.5) -> bool:
    return bool(torch.rand((), generator=gen) < p)


def _log_uniform_int(gen: torch.Generator, low: int, high: int) -> int:
    # Small sizes (1, 2, 3 ...) are where indexing bugs hide; draw them as often as large ones.
    u = float(torch.rand((), generator=gen))
    return max(low, min(high, int(round(math.exp(math.log(low) + u * (math.log(high) - math.log(low)))))))


def case_generator(index: int, salt: int = 0) -> torch.Generator:
    """A generator for case `index` of a test: fresh per case, reproducible from the conftest seed."""
    return torch.Generator().manual_seed(torch.initial_seed() * 1_000_003 + 7919 * index + salt)


def draw_case(
    gen: torch.Generator,
    mode: Optional[str] = None,
    form: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    max_hidden: int = 300,
    max_input: int = 160,
    max_layers: int = 3,
    max_time: int = 24,
    max_batch: int = 7,
) -> RNNCase:
    mode = mode or MODES[_randint(gen, 0, len(MODES) - 1)]
    form = form or FORMS[_randint(gen, 0, len(FORMS) - 1)]
    dtype = dtype or DTYPES[_randint(gen, 0, 1)]
    time_len = _randint(gen, 1, max_time)
    batch = _randint(gen, 1, max_batch)
    if form == "padded":
        lengths = [time_len] * batch
    else:
        lengths = torch.randint(1, time_len + 1, (batch,), generator=gen).tolist()
        if _coin(gen, 0.5):
            lengths[_randint(gen, 0, batch - 1)] = 1  # length-1 sequences are a classic corner
        if form == "lengths" and _coin(gen, 0.3):
            pass  # the longest sequence may end before T: output still has T steps
        else:
            lengths[_randint(gen, 0, batch - 1)] = time_len
        if form == "packed_sorted":
            lengths = sorted(lengths, reverse=True)
    return RNNCase(
        mode=mode,
        num_layers=_randint(gen, 1, max_layers),
        bidirectional=_coin(gen),
        batch_first=_coin(gen),
        input_size=_log_uniform_int(gen, 1, max_input),
        hidden_size=_log_uniform_int(gen, 1, max_hidden),
        bias=_coin(gen, 0.75),
        dtype=dtype,
        form=form,
        with_hx=_coin(gen),
        time_len=time_len,
        lengths=tuple(lengths),
        noncontiguous_input=_coin(gen, 0.25),
    )


# ---------------------------------------------------------------------------------------------
# Modules and inputs
# ---------------------------------------------------------------------------------------------


def make_pair(case: RNNCase) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """A torch.nn module and a fastner.nn module with the same weights (loaded across)."""
    reference = torch_class(case.mode)(**case.module_kwargs()).to(case.dtype)
    # Weights a bit larger than the default init, so gates leave their linear region.
    with torch.no_grad():
        for p in reference.parameters():
            p.uniform_(-1.5 / math.sqrt(case.hidden_size), 1.5 / math.sqrt(case.hidden_size))
    fused = fastner_class(case.mode)(**case.module_kwargs()).to(case.dtype)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


@dataclass
class Inputs:
    x: torch.Tensor  # padded input, in the case's layout: [T, B, I] or [B, T, I]
    hx: Optional[Tuple[torch.Tensor, ...]]  # (h0,) or (h0, c0), each [L*D, B, H]
    lengths: torch.Tensor  # int64 [B]

    def leaves(self) -> List[torch.Tensor]:
        return [self.x] + list(self.hx or ())


def make_inputs(case: RNNCase, gen: torch.Generator, requires_grad: bool = True) -> Inputs:
    shape = (case.batch, case.time_len) if case.batch_first else (case.time_len, case.batch)
    if case.noncontiguous_input:
        # Same values, other memory order: the kernel must not assume a contiguous input.
        x = torch.randn(shape[::-1] + (case.input_size,), generator=gen, dtype=case.dtype).transpose(0, 1)
        x = x.detach().requires_grad_(requires_grad)
        assert not x.is_contiguous() or case.time_len == 1 or case.batch == 1
    else:
        x = torch.randn(shape + (case.input_size,), generator=gen, dtype=case.dtype).requires_grad_(requires_grad)
    hx = None
    if case.with_hx:
        state_shape = (case.num_layers * case.num_directions, case.batch, case.hidden_size)
        count = 2 if case.mode == "LSTM" else 1
        if case.noncontiguous_input:
            # [B, L*D, H] storage seen as [L*D, B, H]
            hx = tuple(
                (0.5 * torch.randn(state_shape[1], state_shape[0], state_shape[2], generator=gen, dtype=case.dtype))
                .transpose(0, 1)
                .requires_grad_(requires_grad)
                for _ in range(count)
            )
        else:
            hx = tuple(
                (0.5 * torch.randn(state_shape, generator=gen, dtype=case.dtype)).requires_grad_(requires_grad)
                for _ in range(count)
            )
    return Inputs(x=x, hx=hx, lengths=torch.tensor(case.lengths, dtype=torch.int64))


def _hx_arg(case: RNNCase, inputs: Inputs):
    if inputs.hx is None:
        return None
    return inputs.hx if case.mode == "LSTM" else inputs.hx[0]


def pack(case: RNNCase, x: torch.Tensor, lengths: torch.Tensor) -> PackedSequence:
    return pack_padded_sequence(
        x, lengths, batch_first=case.batch_first, enforce_sorted=(case.form == "packed_sorted")
    )


def run_torch(case: RNNCase, module: torch.nn.Module, inputs: Inputs):
    """torch.nn's answer for the case's input form (the oracle)."""
    hx = _hx_arg(case, inputs)
    if case.form == "padded":
        return module(inputs.x, hx)
    if case.form == "lengths":
        packed = pack_padded_sequence(inputs.x, inputs.lengths, batch_first=case.batch_first, enforce_sorted=False)
        out, state = module(packed, hx)
        out, _ = pad_packed_sequence(out, batch_first=case.batch_first, total_length=case.time_len)
        return out, state
    return module(pack(case, inputs.x, inputs.lengths), hx)


def run_fastner(case: RNNCase, module: torch.nn.Module, inputs: Inputs):
    hx = _hx_arg(case, inputs)
    if case.form == "padded":
        return module(inputs.x, hx)
    if case.form == "lengths":
        return module(inputs.x, hx, lengths=inputs.lengths)
    return module(pack(case, inputs.x, inputs.lengths), hx)


def flat_result(result) -> Dict[str, torch.Tensor]:
    """{'output': ..., 'h_n': ..., 'c_n': ...} from an (output, state) pair of either module."""
    out, state = result
    flat = {"output": out.data if isinstance(out, PackedSequence) else out}
    if isinstance(state, tuple):
        flat["h_n"], flat["c_n"] = state
    else:
        flat["h_n"] = state
    return flat


def padding_mask(case: RNNCase) -> torch.Tensor:
    """bool [T, B] or [B, T] (the case's layout): True past each sequence's length."""
    steps = torch.arange(case.time_len).unsqueeze(1)  # [T, 1]
    mask = steps >= torch.tensor(case.lengths).unsqueeze(0)  # [T, B]
    return mask.t() if case.batch_first else mask


def check_structure(case: RNNCase, got, expected) -> None:
    """Same types, PackedSequence metadata and shapes as torch returns."""
    got_out, got_state = got
    exp_out, exp_state = expected
    assert type(got_out) is type(exp_out), (type(got_out), type(exp_out))
    if isinstance(exp_out, PackedSequence):
        assert torch.equal(got_out.batch_sizes, exp_out.batch_sizes)
        for name in ("sorted_indices", "unsorted_indices"):
            g, e = getattr(got_out, name), getattr(exp_out, name)
            assert (g is None) == (e is None), name
            if e is not None:
                assert torch.equal(g, e), name
    assert type(got_state) is type(exp_state)
    for key, value in flat_result(expected).items():
        g = flat_result(got)[key]
        assert g.shape == value.shape, (key, g.shape, value.shape)
        assert g.dtype == value.dtype, (key, g.dtype, value.dtype)


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


def tolerance(dtype: torch.dtype, expected: torch.Tensor, float32_noise: float = 0.0) -> Dict[str, float]:
    """rtol / atol for comparing with torch: atol scales with the size of the values compared.

    float32_noise: how far torch's own float32 answer lies from its float64 answer for the
    same tensor; two correct float32 implementations may each be that far from the truth.
    """
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10 * scale)
    return dict(rtol=1e-5, atol=max(1e-5 * scale, 4.0 * float32_noise))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, case, noise: float = 0.0) -> None:
    tol = tolerance(expected.dtype, expected, noise)
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what} differs for {case}:\n{m}")


def cotangents(flat: Dict[str, torch.Tensor], gen: torch.Generator) -> Dict[str, torch.Tensor]:
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in flat.items()}


def gradients(flat: Dict[str, torch.Tensor], cots: Dict[str, torch.Tensor], leaves: Dict[str, torch.Tensor]):
    """d(sum of <result, cotangent>)/d(leaf) for every leaf that requires grad."""
    loss = sum((flat[k] * cots[k]).sum() for k in flat)
    names = [n for n, t in leaves.items() if t.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, grads)}


def leaves_of(module: torch.nn.Module, inputs: Inputs) -> Dict[str, torch.Tensor]:
    leaves = {"input": inputs.x}
    for i, h in enumerate(inputs.hx or ()):
        leaves[("h0", "c0")[i]] = h
    leaves.update({f"param:{n}": p for n, p in module.named_parameters()})
    return leaves


def float32_noise(case: RNNCase, reference: torch.nn.Module, inputs: Inputs, cots, with_grad: bool):
    """Per tensor: max |torch float32 - torch float64| for this case (0 for float64 cases)."""
    if case.dtype != torch.float32:
        return {}
    case64 = replace(case, dtype=torch.float64)
    ref64 = torch_class(case.mode)(**case.module_kwargs()).to(torch.float64)
    ref64.load_state_dict({k: v.double() for k, v in reference.state_dict().items()})
    inputs64 = Inputs(
        x=inputs.x.detach().double().requires_grad_(inputs.x.requires_grad),
        hx=None if inputs.hx is None else tuple(h.detach().double().requires_grad_(h.requires_grad) for h in inputs.hx),
        lengths=inputs.lengths,
    )
    flat32 = flat_result(run_torch(case, reference, inputs))
    flat64 = flat_result(run_torch(case64, ref64, inputs64))
    noise = {k: float((flat32[k].detach().double() - flat64[k].detach()).abs().max()) for k in flat64}
    if with_grad:
        cots64 = {k: v.double() for k, v in cots.items()}
        g32 = gradients(flat32, cots, leaves_of(reference, inputs))
        g64 = gradients(flat64, cots64, leaves_of(ref64, inputs64))
        noise.update({f"grad:{k}": float((g32[k].double() - g64[k]).abs().max()) for k in g64})
    return noise


def compare_with_torch(case: RNNCase, with_grad: bool = True, seed_index: int = 0) -> None:
    """Run the case through torch.nn and fastner.nn; outputs, states (and gradients) must agree."""
    gen = case_generator(seed_index, salt=1)
    reference, fused = make_pair(case)
    inputs = make_inputs(case, gen, requires_grad=with_grad)

    expected = run_torch(case, reference, inputs)
    got = run_fastner(case, fused, inputs)
    check_structure(case, got, expected)
    exp_flat, got_flat = flat_result(expected), flat_result(got)
    cots = cotangents(exp_flat, gen)
    noise = float32_noise(case, reference, inputs, cots, with_grad)

    for key in exp_flat:
        assert_close(got_flat[key], exp_flat[key], key, case, noise.get(key, 0.0))
    if case.form == "lengths":
        # Zeros past each length, exactly (what pad_packed_sequence gives).
        out = got_flat["output"]
        assert bool((out[padding_mask(case)] == 0).all()), f"nonzero output past lengths for {case}"

    if not with_grad:
        return
    exp_grads = gradients(exp_flat, cots, leaves_of(reference, inputs))
    got_grads = gradients(got_flat, cots, leaves_of(fused, inputs))
    assert set(got_grads) == set(exp_grads)
    for name in exp_grads:
        assert_close(got_grads[name], exp_grads[name], f"grad of {name}", case, noise.get(f"grad:{name}", 0.0))
    if case.form == "lengths" and "input" in got_grads:
        # Padding never reaches the result, so its gradient is exactly zero.
        assert bool((got_grads["input"][padding_mask(case)] == 0).all()), f"nonzero input grad past lengths for {case}"
