"""Pure-PyTorch implementations of every fastner op: the test oracle and the fallback.

Each function here computes what the matching torch.ops.fastner.* kernel computes, with plain,
vectorised torch operations (autograd gives the backward). They run wherever the extension does
not: FASTNER_BACKEND=reference, an unsupported device, or a failed build.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

# =============================================================================================
# Linear-chain CRF
# =============================================================================================


# =============================================================================================
# Helpers shared by the sections (keep this block between them)
# =============================================================================================


# =============================================================================================
# Recurrent layers (LSTM / GRU / RNN)
# =============================================================================================

_RNN_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _rnn_cell(mode: str, x_proj: Tensor, h: Tensor, c: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor]):
    """One step of one direction: x_proj = W_ih x + b_ih [B, G*H], h / c [B, H] -> (h', c')."""
    h_proj = h @ w_hh.t()
    if b_hh is not None:
        h_proj = h_proj + b_hh
    if mode == "lstm":
        i, f, g, o = (x_proj + h_proj).chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new
    if mode == "gru":
        x_r, x_z, x_n = x_proj.chunk(3, dim=1)
        h_r, h_z, h_n = h_proj.chunk(3, dim=1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, None
    pre = x_proj + h_proj
    return (torch.relu(pre) if mode == "rnn_relu" else torch.tanh(pre)), None


def rnn_layer(
    input: Tensor,
    lengths: Tensor,
    weights: list,
    hx: Optional[Tensor],
    cx: Optional[Tensor],
    mode: str,
    bidirectional: bool,
    batch_first: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One recurrent layer, both directions, with per-sequence lengths (see fastner::rnn_layer_forward).

    input: [B, T, I] if batch_first else [T, B, I]; lengths: int64 [B]; weights: torch's flat
    weights of the layer (w_ih [G*H, I], w_hh [G*H, H], (b_ih, b_hh) [G*H] per direction);
    hx / cx: [D, B, H] or None. Returns output (input's layout, D*H features, zeros past each
    length), h_n [D, B, H] and c_n ([D, B, H] for lstm, else an empty tensor).
    """
    if mode not in _RNN_GATES:
        raise ValueError(f"rnn_layer: mode must be one of {sorted(_RNN_GATES)}, got {mode!r}")
    x = input if batch_first else input.transpose(0, 1)  # [B, T, I]
    B, T = x.shape[0], x.shape[1]
    D = 2 if bidirectional else 1
    per_dir = len(weights) // D
    H = weights[1].shape[1]
    lengths = lengths.to(device=x.device, dtype=torch.long)
    if lengths.shape != (B,):
        raise ValueError(f"rnn_layer: lengths must have shape [B] = [{B}], got {list(lengths.shape)}")
    if bool(((lengths < 0) | (lengths > T)).any()):
        raise ValueError(f"rnn_layer: lengths must lie in [0, T] = [0, {T}]")
    steps = torch.arange(T, device=x.device)
    valid = (steps[None, :] < lengths[:, None]).unsqueeze(-1)  # [B, T, 1]
    outputs, h_last, c_last = [], [], []
    for d in range(D):
        w_ih, w_hh = weights[d * per_dir], weights[d * per_dir + 1]
        b_ih, b_hh = (weights[d * per_dir + 2], weights[d * per_dir + 3]) if per_dir == 4 else (None, None)
        x_proj = x @ w_ih.t()
        if b_ih is not None:
            x_proj = x_proj + b_ih
        h = hx[d] if hx is not None else x.new_zeros(B, H)
        c = None
        if mode == "lstm":
            c = cx[d] if cx is not None else x.new_zeros(B, H)
        out = [None] * T
        # The reverse direction walks time backwards; a sequence's state stays at its initial
        # value until its own last step, so it starts there.
        for t in (range(T) if d == 0 else range(T - 1, -1, -1)):
            m = valid[:, t]
            h_new, c_new = _rnn_cell(mode, x_proj[:, t], h, c, w_hh, b_hh)
            h = torch.where(m, h_new, h)
            if c is not None:
                c = torch.where(m, c_new, c)
            out[t] = torch.where(m, h_new, torch.zeros_like(h_new))
        outputs.append(torch.stack(out, dim=1))
        h_last.append(h)
        if c is not None:
            c_last.append(c)
    output = torch.cat(outputs, dim=2)
    if not batch_first:
        output = output.transpose(0, 1)
    h_n = torch.stack(h_last)
    c_n = torch.stack(c_last) if c_last else x.new_empty(0)
    return output, h_n, c_n
