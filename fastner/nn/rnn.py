"""fastner.nn.LSTM / GRU / RNN: drop-in subclasses of the torch.nn recurrent layers.

Same constructor, parameters, state_dict keys and gate order as torch's classes (they are
subclasses), so weights load both ways. forward(input, hx=None, lengths=None) returns exactly
what torch returns for a Tensor (either layout) or a PackedSequence (sorted or not); `lengths`
(int64 [B]) gives padded input the semantics of packing without its cost. Each layer runs
fastner.ops.rnn_layer (fused kernel, or the reference where the device has none); stacking and
the dropout between layers happen here. Configurations the kernels do not cover (proj_size > 0,
unbatched input, float16/bfloat16, autocast, tensors on different devices) go to torch's own
implementation, silently, which also raises torch's own errors for bad input. One exception:
under CPU autocast on a CPU where oneDNN has no bfloat16/float16 kernels (AVX2-only, such as
AMD Zen 2), torch's LSTM fails inside oneDNN ("could not create a primitive descriptor"), so
the fused float32 kernels run instead: what torch itself runs there with oneDNN off; the same
where oneDNN claims the precision but cannot run it (float16 with grad mode on, on an Intel
Emerald Rapids), found by one probe call.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastner import ops, validation

__all__ = ["LSTM", "GRU", "RNN"]

_FUSED_DTYPES = (torch.float32, torch.float64)


def _tensors_in(hx) -> List[Tensor]:
    if hx is None:
        return []
    return list(hx) if isinstance(hx, (tuple, list)) else [hx]


def _packed_rows(batch_sizes: Tensor, batch: int) -> Tuple[Tensor, Tensor]:
    """For a PackedSequence's batch_sizes [T] (CPU int64): the row t * B + j of the time-major
    padded batch that each packed row holds ([N]), and each sorted sequence's length ([B])."""
    steps = batch_sizes.shape[0]
    time_of_row = torch.repeat_interleave(torch.arange(steps), batch_sizes)
    starts = torch.cumsum(batch_sizes, 0) - batch_sizes
    slot_of_row = torch.arange(time_of_row.shape[0]) - torch.repeat_interleave(starts, batch_sizes)
    lengths = (batch_sizes[None, :] > torch.arange(batch)[:, None]).sum(1)
    return time_of_row * batch + slot_of_row, lengths


def _forward_unbatched(layer, input: Tensor, hx, lengths):
    """layer.forward of unbatched input [T, I] (hx: [D * num_layers, H], for the LSTM a pair)
    as a batch of one sequence, for the layers that do not hand it to torch (int8, bf16): the
    same results as the batched call, torch's rank check on hx first."""
    if lengths is not None:
        raise ValueError("lengths= needs batched input ([B, T, I] or [T, B, I]), got a 2-D tensor")
    states = _tensors_in(hx)
    if any(isinstance(h, Tensor) and h.dim() != 2 for h in states):
        ranks = ", ".join(f"{h.dim()}-D" for h in states)
        named = "hx and cx" if layer._is_lstm else "hx"
        raise RuntimeError(f"For unbatched 2-D input, {named} should also be 2-D but got ({ranks}) tensors")
    batch_dim = 0 if layer.batch_first else 1
    batched_hx = None if hx is None else (
        tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, (tuple, list)) else hx.unsqueeze(1))
    output, state = layer.forward(input.unsqueeze(batch_dim), batched_hx)
    state = tuple(s.squeeze(1) for s in state) if isinstance(state, tuple) else state.squeeze(1)
    return output.squeeze(batch_dim), state


def _cpu_autocast_torch_cannot_run(data: Tensor) -> bool:
    """Whether CPU autocast is on for `data` in a precision oneDNN cannot run on this CPU: torch
    sends a float32 LSTM on the CPU to oneDNN whenever oneDNN is enabled (aten's use_mkldnn), and
    autocast casts that call to the lower precision without checking the CPU's support."""
    if data.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or not torch.backends.mkldnn.enabled:
        return False
    lower = torch.get_autocast_dtype("cpu")
    if lower not in (torch.bfloat16, torch.float16):
        return False
    return not _onednn_lstm_runs(lower, torch.is_grad_enabled())


@functools.lru_cache(maxsize=None)
def _onednn_lstm_runs(lower: torch.dtype, grad_enabled: bool) -> bool:
    """Whether torch's LSTM runs under CPU autocast to `lower` here, with grad mode on or off.
    oneDNN's own flags are not enough: an Intel Xeon (Emerald Rapids, AVX512-FP16) reports float16
    support, and its LSTM runs in float16 under no_grad but fails with grad mode on ("could not
    create a primitive descriptor"), torch's nn.LSTM with it. So: their flag, then one call of a
    1-unit torch LSTM in that mode, once per process."""
    supported = torch.ops.mkldnn._is_mkldnn_bf16_supported if lower == torch.bfloat16 else \
        torch.ops.mkldnn._is_mkldnn_fp16_supported
    if not supported():
        return False
    probe = torch.nn.LSTM(1, 1)
    try:
        with torch.autocast("cpu", dtype=lower), torch.set_grad_enabled(grad_enabled):
            probe(torch.zeros(1, 1, 1))
    except RuntimeError:
        return False
    return True


class _FusedRNNMixin:
    """forward() for the three classes; the subclass says its cell mode and state form."""

    _is_lstm = False

    def _cell_mode(self) -> str:
        raise NotImplementedError

    def _fusable(self, input, hx) -> bool:
        data = input.data if isinstance(input, PackedSequence) else input
        if not isinstance(data, Tensor) or getattr(self, "proj_size", 0) > 0:
            return False
        if not isinstance(input, PackedSequence) and data.dim() != 3:
            return False  # unbatched input (or a bad rank: torch raises its own error)
        if data.dtype not in _FUSED_DTYPES:
            return False
        if torch._C._is_any_autocast_enabled() and not _cpu_autocast_torch_cannot_run(data):
            return False
        weights = self._flat_weights
        if any(w is None or w.dtype != data.dtype or w.device != data.device for w in weights):
            return False  # torch either handles it or raises its own error
        if self._is_lstm and hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            return False
        # A hidden state of the wrong rank, dtype or device: torch raises its own error.
        return all(
            isinstance(h, Tensor) and h.dim() == 3 and h.device == data.device and h.dtype == data.dtype
            for h in _tensors_in(hx)
        )

    def _torch_forward(self, input, hx, lengths):
        if lengths is None or not isinstance(input, Tensor) or input.dim() != 3:
            if lengths is not None and isinstance(input, Tensor) and input.dim() == 2:
                raise ValueError("lengths= needs batched input ([B, T, I] or [T, B, I]), got a 2-D tensor")
            return super().forward(input, hx)
        # `lengths` means here what it means on the fused path: the same checks (packing would
        # take a float, bool or short vector silently), and sequences of length 0 allowed.
        lengths = self._lengths_arg(input, lengths).cpu()
        batch_dim, time_dim = (0, 1) if self.batch_first else (1, 0)
        time_len = input.shape[time_dim]
        validation.lengthsarg(type(self).__name__, lengths, lengths.shape[0], time_len, lengths.device)
        # Bad input must raise what torch raises for the padded tensor, not what packing raises:
        # let torch check the first step (zeros where there is none); its result gives the
        # shapes and dtypes of what sequences of length 0 return.
        first = input.narrow(time_dim, 0, 1) if time_len else input.new_zeros(
            input.shape[:time_dim] + (1,) + input.shape[time_dim + 1:])
        with torch.no_grad():
            first_output, first_state = super().forward(first, hx)
        running = (lengths > 0).nonzero().squeeze(1)
        if running.shape[0] == lengths.shape[0]:
            packed = pack_padded_sequence(input, lengths, batch_first=self.batch_first, enforce_sorted=False)
            output, state = super().forward(packed, hx)
            output, _ = pad_packed_sequence(output, batch_first=self.batch_first, total_length=time_len)
            return output, state
        # Packing refuses length 0: run the other sequences alone; those of length 0 output
        # zeros and keep their initial state, as on the fused path.
        first_states = _tensors_in(first_state)
        states = _tensors_in(hx) or [s.new_zeros(s.shape) for s in first_states]
        out_shape = list(first_output.shape)
        out_shape[time_dim] = time_len
        output = first_output.new_zeros(out_shape)
        if running.shape[0]:
            sub_hx = None if hx is None else [h.index_select(1, running.to(h.device)) for h in states]
            packed = pack_padded_sequence(input.index_select(batch_dim, running.to(input.device)),
                                          lengths[running], batch_first=self.batch_first, enforce_sorted=False)
            sub_output, sub_state = super().forward(packed, None if sub_hx is None else (
                tuple(sub_hx) if self._is_lstm else sub_hx[0]))
            sub_output, _ = pad_packed_sequence(sub_output, batch_first=self.batch_first, total_length=time_len)
            output = output.index_copy(batch_dim, running.to(output.device), sub_output)
            states = [s.index_copy(1, running.to(s.device), sub) for s, sub in zip(states, _tensors_in(sub_state))]
        return output, (tuple(states) if self._is_lstm else states[0])

    def _lengths_arg(self, input: Tensor, lengths) -> Tensor:
        """`lengths=` of padded input, checked to be an integer tensor [B]; returned as int64."""
        B = input.shape[0 if self.batch_first else 1]
        if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.shape[0] != B:
            shape = list(lengths.shape) if isinstance(lengths, Tensor) else type(lengths).__name__
            raise ValueError(f"lengths must be a 1-D integer tensor of shape [B] = [{B}], got {shape}")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must hold integers, got {lengths.dtype}")
        return lengths.to(dtype=torch.long)

    def _update_flat_weights(self) -> None:
        """torch's, from the parameter dict: the list of weights the layer runs is built anew
        when one of them is no longer the tensor it holds (torch.func.functional_call swaps
        them in that dict; assignments go through __setattr__, which updates the list itself).
        torch's reads every weight through Module.__getattr__: 11 us a call at 8 weights, 7% of
        a one-sentence int8 BiLSTM call (AMD EPYC Zen 4)."""
        parameters = self._parameters
        for ref, name in zip(self._flat_weight_refs, self._flat_weights_names):
            weight = parameters.get(name)
            if weight is not None and ref is not None and ref() is not weight:
                self._init_flat_weights()
                return

    def forward(self, input, hx=None, lengths: Optional[Tensor] = None):
        if isinstance(input, PackedSequence) and lengths is not None:
            raise ValueError("lengths= is for padded Tensor input; a PackedSequence carries its own lengths")
        if not self._fusable(input, hx):
            return self._torch_forward(input, hx, lengths)
        self._update_flat_weights()
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        return self._forward_padded(input, hx, lengths)

    def _forward_padded(self, input: Tensor, hx, lengths: Optional[Tensor]):
        # input: [B, T, I] if batch_first else [T, B, I]
        if hx is not None:
            self.check_forward_args(input, hx, None)
        else:
            self.check_input(input, None)
        B, T = (input.shape[0], input.shape[1]) if self.batch_first else (input.shape[1], input.shape[0])
        if lengths is None and T == 0:
            # torch refuses a batch of no steps, after the checks above, with this error; with
            # lengths= (all 0) it is a batch of empty sequences, which the fused path takes.
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long)
        else:
            lengths = self._lengths_arg(input, lengths)
        lengths = lengths.to(device=input.device)
        output, h_n, c_n = self._run_layers(input, hx, lengths, self.batch_first)
        return output, ((h_n, c_n) if self._is_lstm else h_n)

    def _forward_packed(self, input: PackedSequence, hx):
        data, batch_sizes, sorted_indices, unsorted_indices = input
        validation.packed_batch_sizes(type(self).__name__, batch_sizes, data.shape[0])
        if hx is not None:
            hx = self.permute_hidden(hx, sorted_indices)  # into the packed (sorted) batch order
            self.check_forward_args(data, hx, batch_sizes)
        else:
            self.check_input(data, batch_sizes)
        # The packed rows are the time-major padded batch [T, B, I] (sorted) minus its padding:
        # one index_copy in and one index_select out (torch's pad/pack helpers loop over time
        # and cost more than the layer's own overhead). Padding is zeros: the reference multiplies
        # it by zero gradients, which garbage could turn into NaN.
        steps, batch = batch_sizes.shape[0], int(batch_sizes[0])
        rows, lengths = _packed_rows(batch_sizes, batch)
        rows = rows.to(data.device)
        padded = data.new_zeros(steps * batch, data.shape[1]).index_copy(0, rows, data).view(steps, batch, -1)
        output, h_n, c_n = self._run_layers(padded, hx, lengths.to(data.device), False)
        out_data = output.reshape(steps * batch, -1).index_select(0, rows)
        output = PackedSequence(out_data, batch_sizes, sorted_indices, unsorted_indices)
        return output, self.permute_hidden((h_n, c_n) if self._is_lstm else h_n, unsorted_indices)

    def _run_layers(self, x: Tensor, hx, lengths: Tensor, batch_first: bool) -> Tuple[Tensor, Tensor, Tensor]:
        D = 2 if self.bidirectional else 1
        per_layer = len(self._flat_weights) // self.num_layers
        h0, c0 = (hx if self._is_lstm else (hx, None)) if hx is not None else (None, None)
        mode = self._cell_mode()
        h_last, c_last = [], []
        for layer in range(self.num_layers):
            weights = self._flat_weights[layer * per_layer : (layer + 1) * per_layer]
            layer_h0 = h0[layer * D : (layer + 1) * D] if h0 is not None else None
            layer_c0 = c0[layer * D : (layer + 1) * D] if c0 is not None else None
            x, h_n, c_n = ops.rnn_layer(x, lengths, weights, layer_h0, layer_c0, mode, self.bidirectional, batch_first)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, p=self.dropout, training=True)
            h_last.append(h_n)
            c_last.append(c_n)
        h_n = torch.cat(h_last, 0) if len(h_last) > 1 else h_last[0]
        c_n = (torch.cat(c_last, 0) if len(c_last) > 1 else c_last[0]) if self._is_lstm else None
        return x, h_n, c_n


class LSTM(_FusedRNNMixin, torch.nn.LSTM):
    """torch.nn.LSTM with fused CPU kernels and a `lengths=` keyword."""

    _is_lstm = True

    def _cell_mode(self) -> str:
        return "lstm"


class GRU(_FusedRNNMixin, torch.nn.GRU):
    """torch.nn.GRU with fused CPU kernels and a `lengths=` keyword."""

    def _cell_mode(self) -> str:
        return "gru"


class RNN(_FusedRNNMixin, torch.nn.RNN):
    """torch.nn.RNN (tanh or relu) with fused CPU kernels and a `lengths=` keyword."""

    def _cell_mode(self) -> str:
        return "rnn_relu" if self.mode == "RNN_RELU" else "rnn_tanh"
