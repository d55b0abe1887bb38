"""The RNN layer ops' inputs, drawn in one place for every RNN op suite: parity, gradcheck and
opcheck (test_rnn_ops.py), CUDA (test_rnn_cuda.py) and the CUDA emulation
(test_rnn_cuda_emulated.py). The module-level suites (test_rnn_parity.py, test_rnn_modules.py)
draw whole multi-layer configurations from rnn_cases.py.

- `LayerCase`: one one-layer problem, a torch.nn module (its weights are the op's) and the op's
  inputs as CPU tensors, so a CPU kernel, torch.nn / cuDNN and a CUDA kernel see identical values;
  `LayerCase.draw(gen, mode, dtype, ...)` draws its configuration and sizes at random.
- `sample_inputs(op, device, dtype, ...)`: fresh argument tuples for rnn_layer_forward or
  rnn_layer_backward over every mode, both directions, both layouts, with and without an initial
  state, and lengths holding a full, a short and an empty sequence.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Optional, Sequence

import torch

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
OP_MODE = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}
OPS = ("rnn_layer_forward", "rnn_layer_backward")


def torch_layer(mode, input_size, hidden, bidirectional, bias, dtype, device="cpu"):
    """The torch.nn layer of `mode` (one layer): the weights and the oracle of the op."""
    kwargs = {"nonlinearity": "relu" if mode == "RNN_RELU" else "tanh"} if mode.startswith("RNN") else {}
    cls = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU}.get(mode, torch.nn.RNN)
    return cls(input_size, hidden, bidirectional=bidirectional, bias=bias, dtype=dtype, device=device, **kwargs)


class LayerCase:
    """One one-layer problem: `module` (torch.nn, on the CPU), x [B, T, I] or [T, B, I], lengths
    [B] int64, hx and cx [D, B, H] (cx for LSTM only; both None without an initial state), all
    CPU tensors in `dtype`, from `gen`."""

    def __init__(self, gen: torch.Generator, mode: str, dtype: torch.dtype, *, batch: int, time_len: int,
                 input_size: int, hidden: int, bidirectional: bool, batch_first: bool, bias: bool,
                 lengths: Sequence[int], with_state: bool = True):
        self.mode, self.dtype = mode, dtype
        self.bidirectional, self.batch_first, self.bias = bidirectional, batch_first, bias
        self.batch, self.time_len, self.input_size, self.hidden = batch, time_len, input_size, hidden
        # the module's init draws from torch's global RNG: seed it from gen, so the case is gen's alone
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        self.module = torch_layer(mode, input_size, hidden, bidirectional, bias, dtype)
        self.lengths = torch.as_tensor(lengths, dtype=torch.int64)
        D = 2 if bidirectional else 1
        shape = (batch, time_len, input_size) if batch_first else (time_len, batch, input_size)
        self.x = torch.randn(shape, generator=gen, dtype=dtype)
        self.hx = torch.randn(D, batch, hidden, generator=gen, dtype=dtype) if with_state else None
        self.cx = torch.randn(D, batch, hidden, generator=gen, dtype=dtype) if with_state and mode == "LSTM" else None

    @classmethod
    def draw(cls, gen: torch.Generator, mode: str, dtype: torch.dtype = torch.float64, *, max_batch: int = 6,
             max_time: int = 12, max_input: int = 40, max_hidden: int = 70, min_length: int = 0, min_batch: int = 1,
             full_length: bool = True, with_state: bool = True) -> "LayerCase":
        """Directions, layout and bias (80%) at random; T, B, I, H uniform in [1 or min_batch,
        max_*]; lengths in [min_length, T], one of them T when full_length."""
        ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
        bidirectional, batch_first, bias = (bool(torch.rand((), generator=gen) < p) for p in (0.5, 0.5, 0.8))
        time_len, batch = ri(1, max_time), ri(min_batch, max_batch)
        input_size, hidden = ri(1, max_input), ri(1, max_hidden)
        lengths = torch.randint(min_length, time_len + 1, (batch,), generator=gen)
        if full_length:
            lengths[ri(0, batch - 1)] = time_len
        return cls(gen, mode, dtype, batch=batch, time_len=time_len, input_size=input_size, hidden=hidden,
                   bidirectional=bidirectional, batch_first=batch_first, bias=bias, lengths=lengths,
                   with_state=with_state)

    def weights(self, device="cpu", dtype: Optional[torch.dtype] = None, requires_grad: bool = False):
        """The module's flat weights [W_ih, W_hh(, b_ih, b_hh)] per direction, copied to `device`."""
        dtype = dtype or self.dtype
        return [w.detach().to(device=device, dtype=dtype).clone().requires_grad_(requires_grad)
                for w in self.module._flat_weights]

    def inputs(self, device="cpu", dtype: Optional[torch.dtype] = None, requires_grad: bool = False):
        """x, lengths, weights, hx, cx on `device` (leaves when requires_grad)."""
        dtype = dtype or self.dtype
        mk = lambda t: None if t is None else t.to(device=device, dtype=dtype).clone().requires_grad_(requires_grad)  # noqa: E731
        return mk(self.x), self.lengths.to(device), self.weights(device, dtype, requires_grad), mk(self.hx), mk(self.cx)

    def forward_args(self, device="cpu", dtype: Optional[torch.dtype] = None, requires_grad: bool = False,
                     training: bool = True) -> tuple:
        """rnn_layer_forward's arguments."""
        return (*self.inputs(device, dtype, requires_grad), OP_MODE[self.mode], self.bidirectional,
                self.batch_first, training)


def sample_inputs(op: str, device="cpu", dtype: torch.dtype = torch.float32, *, modes: Sequence[str] = MODES,
                  bidirectional: Sequence[bool] = (True, False), batch_first: Sequence[bool] = (True, False),
                  with_state: Sequence[bool] = (True, False), requires_grad: bool = False, training: bool = True,
                  seed: int = 0) -> Iterator[tuple]:
    """Fresh argument tuples for torch.ops.fastner.<op> (rnn_layer_forward or rnn_layer_backward)
    on `device`: every mode x direction x layout x with or without hx/cx named (all by default),
    B = 4, T = 6, I = 5, H = 3 with lengths [6, 2, 0, 5]. rnn_layer_backward's incoming gradients
    and workspace come from a training forward on the same device."""
    gen = torch.Generator().manual_seed(seed)
    for mode, bidirectional, batch_first, with_state in itertools.product(modes, bidirectional, batch_first,
                                                                            with_state):
        case = LayerCase(gen, mode, dtype, batch=4, time_len=6, input_size=5, hidden=3, bidirectional=bidirectional,
                         batch_first=batch_first, bias=True, lengths=[6, 2, 0, 5], with_state=with_state)
        if op == "rnn_layer_forward":
            yield case.forward_args(device, requires_grad=requires_grad, training=training)
        elif op == "rnn_layer_backward":
            x, lengths, weights, hx, cx, mode_name, bidi, bf, _ = case.forward_args(device)
            out, h_n, c_n, workspace = torch.ops.fastner.rnn_layer_forward(x, lengths, weights, hx, cx, mode_name,
                                                                           bidi, bf, True)
            grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(device)
            grad_h = torch.randn(h_n.shape, generator=gen, dtype=h_n.dtype).to(device)
            grad_c = (torch.randn(h_n.shape, generator=gen, dtype=h_n.dtype).to(device) if mode == "LSTM"
                      else torch.zeros_like(h_n))
            yield grad_out, grad_h, grad_c, x, lengths, weights, hx, cx, workspace, mode_name, bidi, bf
        else:
            raise ValueError(f"no samples for {op!r}")
