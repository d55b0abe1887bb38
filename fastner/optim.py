"""SGD with momentum for the word table, touching only the rows of each batch's words.

A batch of 10 sentences holds ~130 distinct words of a ~24k-row table; torch.optim.SGD on the
dense gradient zeroes, scatters into, measures, clips, decays and adds the whole table every
step. RowSparseSGD takes the sparse gradient of nn.Embedding(sparse=True) and updates the rows a
step touches, and brings every other row up to date lazily (catch_up() with the batch's word ids
before the forward pass reads them), so that the result equals
torch.optim.SGD(momentum=m, dampening=0, nesterov=False) on the dense gradient (up to float
rounding): a row that no step touched for k steps would, densely, have moved by
lr * buf * (m + m^2 + ... + m^k) and ended with momentum buf * m^k; that is applied in one go
when the row is next touched, or by flush() for every row before the learning rate changes and
before anyone reads the table (evaluation, saving).
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch


class RowSparseSGD:
    """Momentum SGD of one embedding weight [V, D] from its sparse (COO) gradients."""

    def __init__(self, weight: torch.nn.Parameter, lr: float, momentum: float):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.weight, self.lr, self.momentum = weight, float(lr), float(momentum)
        self.buffer = torch.zeros_like(weight, memory_format=torch.contiguous_format)  # [V, D]
        self.last = torch.zeros(weight.shape[0], dtype=torch.long, device=weight.device)  # [V] step each row is at
        self.steps = 0

    def _catch_up(self, rows: torch.Tensor, upto: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(weight rows, momentum rows) [R, D] advanced over their idle steps up to `upto`."""
        idle = (upto - self.last[rows]).to(self.weight.dtype)  # [R]
        decay = torch.pow(self.momentum, idle).unsqueeze(-1)  # m^k, [R, 1]
        moved = self.momentum * (1.0 - decay) / (1.0 - self.momentum)  # m + ... + m^k
        buffer = self.buffer[rows]
        weight = self.weight.data[rows] - self.lr * moved * buffer
        return weight, buffer * decay

    @torch.no_grad()
    def catch_up(self, ids: torch.Tensor) -> None:
        """Bring the rows a forward pass is about to read up to date: ids, any shape, may repeat
        (ids past the table, such as a model's frozen pretrained rows, are ignored)."""
        rows = torch.unique(ids)
        rows = rows[(rows >= 0) & (rows < self.weight.shape[0])]
        rows = rows[self.last[rows] != self.steps]
        if rows.numel():
            weight, buffer = self._catch_up(rows, self.steps)
            self.weight.data[rows] = weight
            self.buffer[rows] = buffer
            self.last[rows] = self.steps

    @torch.no_grad()
    def step(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """rows: [R] distinct row ids, values: [R, D] their (clipped) gradient rows; the rows
        must have been brought up to date (catch_up) before the forward pass read them."""
        weight, buffer = self._catch_up(rows, self.steps)
        buffer = buffer * self.momentum + values  # buf_t = m buf_(t-1) + g_t, as torch.optim.SGD
        weight -= self.lr * buffer
        self.steps += 1
        self.weight.data[rows] = weight
        self.buffer[rows] = buffer
        self.last[rows] = self.steps

    @torch.no_grad()
    def flush(self) -> None:
        """Bring every row to the current step (call before changing lr or reading the table)."""
        self.catch_up(torch.arange(self.weight.shape[0], device=self.weight.device))

    def state_dict(self) -> dict:
        """The momentum of every row, flushed (what torch.optim.SGD keeps as momentum_buffer)."""
        self.flush()
        return {"momentum_buffer": self.buffer.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        buffer = state["momentum_buffer"]
        if tuple(buffer.shape) != tuple(self.buffer.shape):
            raise ValueError(f"momentum_buffer must be {list(self.buffer.shape)}, got {list(buffer.shape)}")
        self.buffer.copy_(buffer)
        self.last.fill_(self.steps)


def sparse_rows(grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows [R], values [R, D]) of a sparse COO embedding gradient, each row once (summed)."""
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


def clip_grad_norm(dense: Iterable[torch.Tensor], sparse_values: Optional[torch.Tensor], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ over dense gradients plus one coalesced sparse gradient's
    rows (the same total 2-norm and the same scale max_norm / (norm + 1e-6), capped at 1).

    One multi-tensor norm and one multi-tensor scale (torch's foreach kernels) rather than two
    ops per gradient: the default tagger has 17 of them, and per-tensor calls were ~3% of a step."""
    grads = [g for g in dense if g is not None]
    if sparse_values is not None:
        grads.append(sparse_values)
    if not grads:
        return
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, scale)
