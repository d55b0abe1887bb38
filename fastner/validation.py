"""Argument checks of the Python side of every fastner op: one place for the rules that
csrc/checks.h enforces in C++ (rank, sizes, dtype, device, value ranges), so that the reference
path, the fake kernels (torch.compile / meta tensors) and the Python helpers refuse the same
inputs as the fused kernels, with a ValueError naming the op, the argument and what was expected.

`values=False` checks metadata only: what a fake kernel can see (no data), and what
torch.compile traces (a data-dependent check would be a graph break).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

_CRF_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_RNN_DTYPES = (torch.float32, torch.float64)
RNN_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def _reads_values(t: Tensor) -> bool:
    # Meta and fake tensors have no data; a traced graph must not branch on it.
    return t.device.type != "meta" and not torch.compiler.is_compiling() and not _is_fake(t)


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def tensors(op: str, names: Sequence[str], values: Sequence) -> None:
    """Each of `values` (the arguments called `names`) is a Tensor: the type check every other
    check here starts with, and all that the ops' wrappers check before their fused kernels, which
    check the rest in C++ (a list there gave an AttributeError or the dispatcher's RuntimeError,
    and lengths=None "lengths must be [B] = [3], got [0]")."""
    for t in values:  # no zip here: 0.3 us a call instead of 0.7 (this runs on every call)
        if not isinstance(t, Tensor):
            name = next(n for n, v in zip(names, values) if v is t)
            _fail(op, f"{name} must be a Tensor, got {type(t).__name__}")


def tensor_arg(op: str, name: str, t, *, dim: Optional[int] = None, shape: Optional[Sequence[int]] = None,
           dtypes: Optional[Sequence[torch.dtype]] = None, device: Optional[torch.device] = None,
           owner: str = "the emissions'") -> None:
    """`t` is a Tensor of rank `dim` / shape `shape`, one of `dtypes`, on `device`."""
    tensors(op, (name,), (t,))
    if dim is not None and t.dim() != dim:
        _fail(op, f"{name} must be {dim}-D, got shape {list(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        _fail(op, f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        _fail(op, f"{name} must be {names}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        _fail(op, f"{name} must be on {device} ({owner} device), got {t.device}")


def lengthsarg(op: str, lengths: Tensor, batch: int, steps: int, device: torch.device, *,
            values: bool = True, allow_cpu: bool = False, owner: str = "the emissions'") -> None:
    """lengths: int64 [B] on `device` (or the CPU where `allow_cpu`), each in [0, T]."""
    tensor_arg(op, "lengths", lengths, shape=(batch,), dtypes=(torch.long,))
    if lengths.device != device and not (allow_cpu and lengths.device.type == "cpu"
                                         and device.type != "meta"):
        _fail(op, f"lengths must be on {device} ({owner} device), got {lengths.device}")
    if values and batch and _reads_values(lengths):
        low, high = int(lengths.min()), int(lengths.max())
        if low < 0 or high > steps:
            bad = low if low < 0 else high
            index = int((lengths == bad).nonzero()[0, 0])
            _fail(op, f"lengths[{index}] = {bad} is outside [0, T = {steps}]")


def crf_args(op: str, emissions: Tensor, lengths: Tensor, transitions: Tensor, start: Tensor,
        end: Tensor, tags: Optional[Tensor] = None, *, values: bool = True) -> None:
    """The CRF ops' arguments (csrc/fastner.cpp): emissions [B, T, K] (K > 0), lengths int64 [B]
    in [0, T], transitions [K, K] and start / end [K] in the accumulate dtype, tags int64 [B, T]
    in [0, K) inside each length; everything on the emissions' device."""
    tensor_arg(op, "emissions", emissions, dim=3, dtypes=_CRF_DTYPES)
    B, T, K = emissions.shape
    if K == 0:
        _fail(op, "emissions must have at least one tag (K > 0)")
    acc = torch.float64 if emissions.dtype == torch.float64 else torch.float32
    device = emissions.device
    tensor_arg(op, "transitions", transitions, shape=(K, K), dtypes=(acc,), device=device)
    tensor_arg(op, "start_transitions", start, shape=(K,), dtypes=(acc,), device=device)
    tensor_arg(op, "end_transitions", end, shape=(K,), dtypes=(acc,), device=device)
    lengthsarg(op, lengths, B, T, device, values=values)
    if tags is not None:
        tensor_arg(op, "tags", tags, shape=(B, T), dtypes=(torch.long,), device=device)
        if values and _reads_values(tags) and B and T:
            inside = torch.arange(T, device=device) < lengths.unsqueeze(1)
            bad = ((tags < 0) | (tags >= K)) & inside
            if bool(bad.any()):
                b, t = (int(i) for i in bad.nonzero()[0])
                _fail(op, f"tags[{b}, {t}] = {int(tags[b, t])} is outside [0, K = {K})")


def crf_window_args(op: str, emissions: Tensor, lengths: Tensor, transitions: Tensor, start: Tensor,
                    end: Tensor, rows: Tensor, starts: Tensor, allowed: Tensor, *, values: bool = True) -> None:
    """crf_window_probabilities' arguments (csrc/fastner.cpp): the CRF's (crf_args), rows int64 [N]
    in [0, B), starts int64 [N] with 0 <= starts[n] < lengths[rows[n]], allowed bool [N, W >= 1, K],
    all on the emissions' device. values=False: metadata only (fake kernels)."""
    crf_args(op, emissions, lengths, transitions, start, end, values=values)
    B, _, K = emissions.shape
    device = emissions.device
    tensor_arg(op, "rows", rows, dim=1, dtypes=(torch.long,), device=device)
    N = rows.shape[0]
    tensor_arg(op, "starts", starts, shape=(N,), dtypes=(torch.long,), device=device)
    tensor_arg(op, "allowed", allowed, dim=3, dtypes=(torch.bool,), device=device)
    if allowed.shape[0] != N or allowed.shape[1] < 1 or allowed.shape[2] != K:
        _fail(op, f"allowed must be [N, W, K] = [{N}, W >= 1, {K}], got {list(allowed.shape)}")
    if values and N and _reads_values(rows) and _reads_values(starts) and _reads_values(lengths):
        bad_row = (rows < 0) | (rows >= B)
        if bool(bad_row.any()):
            n = int(bad_row.nonzero()[0, 0])
            _fail(op, f"rows[{n}] = {int(rows[n])} is outside [0, B = {B})")
        limit = lengths[rows]
        bad_start = (starts < 0) | (starts >= limit)
        if bool(bad_start.any()):
            n = int(bad_start.nonzero()[0, 0])
            _fail(op, f"starts[{n}] = {int(starts[n])} is outside [0, lengths[{int(rows[n])}] = {int(limit[n])})")


def crf_k(op: str, k) -> None:
    """crf_kbest's k: a positive Python int (bool refused)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        _fail(op, f"k must be a positive int, got {k!r}")


def crf_mask(op: str, mask: Tensor) -> None:
    """A CRF mask: bool or uint8, 2-D."""
    tensor_arg(op, "mask", mask, dim=2, dtypes=(torch.bool, torch.uint8))


def char_conv_args(op: str, input: Tensor, valid: Tensor, weight: Tensor, bias: Tensor) -> None:
    """char_conv_max's arguments (csrc/fastner.cpp): input [N, C, I > 0] float, valid bool [N, C],
    weight [F, I, W] with F > 0 and W odd, bias [F]; weight and bias in the input's dtype, all on
    the input's device."""
    owner = "the input's"
    tensor_arg(op, "input", input, dim=3, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    N, C, I = input.shape
    if I == 0:
        _fail(op, f"input must have I > 0 embedding dims, got shape {list(input.shape)}")
    tensor_arg(op, "valid", valid, shape=(N, C), dtypes=(torch.bool,), device=input.device, owner=owner)
    _conv_filters(op, weight, bias, I, input.dtype, input.device, owner)


def _conv_filters(op: str, weight: Tensor, bias: Tensor, I: int, dtype: torch.dtype, device: torch.device,
                  owner: str) -> None:
    """The char CNN ops' weight [F, I, W] (F > 0, W odd) and bias [F], in `dtype` on `device`
    (those of the float tensor `owner` names)."""
    tensor_arg(op, "weight", weight, dim=3, dtypes=(dtype,), device=device, owner=owner)
    F, weight_inputs, W = weight.shape
    if weight_inputs != I or F == 0 or W % 2 == 0:
        _fail(op, f"weight must be [F, I, W] with I = {I}, F > 0 filters and an odd window W, "
                  f"got {list(weight.shape)}")
    tensor_arg(op, "bias", bias, shape=(F,), dtypes=(dtype,), device=device, owner=owner)


def char_embed_args(op: str, chars: Tensor, words: Tensor, embedding: Tensor, weight: Tensor, bias: Tensor,
                    pad_id, *, values: bool = True) -> None:
    """char_embed_conv_max's arguments (csrc/fastner.cpp): chars int64 [..., C], words bool [...],
    embedding [V, I > 0] float, weight [F, I, W] with F > 0 and W odd, bias [F] in the
    embedding's dtype, all on the chars' device, pad_id an int; with `values`, every character
    of a marked word in [0, V)."""
    owner = "the chars'"
    tensor_arg(op, "chars", chars, dtypes=(torch.long,), owner=owner)
    if chars.dim() < 2:
        _fail(op, f"chars must be [..., C] (words x characters), got shape {list(chars.shape)}")
    tensor_arg(op, "words", words, shape=chars.shape[:-1], dtypes=(torch.bool,), device=chars.device, owner=owner)
    tensor_arg(op, "embedding", embedding, dim=2, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
               device=chars.device, owner=owner)
    V, I = embedding.shape
    if I == 0:
        _fail(op, f"embedding must have I > 0 dims, got shape {list(embedding.shape)}")
    _conv_filters(op, weight, bias, I, embedding.dtype, chars.device, "the embedding's")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        _fail(op, f"pad_id must be an int, got {type(pad_id).__name__}")
    if values and chars.numel() and _reads_values(chars):
        outside = ((chars < 0) | (chars >= V)) & words.unsqueeze(-1)  # in the marked words
        if bool(outside.any()):
            where = [int(i) for i in outside.nonzero()[0]]
            _fail(op, f"chars[{', '.join(map(str, where))}] = {int(chars[tuple(where)])} is outside [0, V = {V}) "
                      f"(the embedding's rows)")


def masked_linear_args(op: str, input: Tensor, mask: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """masked_linear's arguments (csrc/fastner.cpp): input [B, T, I] float, mask bool [B, T],
    weight [K, I] and bias [K] (or None) in the input's dtype, all on the input's device."""
    owner = "the input's"
    tensor_arg(op, "input", input, dim=3, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    B, T, I = input.shape
    tensor_arg(op, "mask", mask, shape=(B, T), dtypes=(torch.bool,), device=input.device, owner=owner)
    tensor_arg(op, "weight", weight, dim=2, dtypes=(input.dtype,), device=input.device, owner=owner)
    if weight.shape[1] != I:
        _fail(op, f"weight must be [K, I] with I = {I}, got shape {list(weight.shape)}")
    if bias is not None:
        tensor_arg(op, "bias", bias, shape=(weight.shape[0],), dtypes=(input.dtype,), device=input.device,
                   owner=owner)


def rnn_args(op: str, input: Tensor, lengths: Tensor, weights: Sequence[Tensor], hx: Optional[Tensor],
        cx: Optional[Tensor], mode: str, bidirectional: bool, batch_first: bool, *,
        values: bool = True, input_dtypes: Sequence[torch.dtype] = _RNN_DTYPES,
        matrix_dtype: Optional[torch.dtype] = None) -> None:
    """rnn_layer_forward's arguments (csrc/fastner.cpp): input [B, T, I] or [T, B, I] float32 /
    float64; lengths int64 [B] in [0, T] on the input's device (or the CPU for a CUDA input);
    2*D or 4*D weights of torch's shapes, hx / cx [D, B, H], all in the input's dtype and device
    (w_ih / w_hh may be bfloat16 for float32 input)."""
    if mode not in RNN_GATES:
        _fail(op, f"mode must be one of {sorted(RNN_GATES)}, got {mode!r}")
    owner = "the input's"
    tensor_arg(op, "input", input, dim=3, dtypes=input_dtypes)
    B, T = (input.shape[0], input.shape[1]) if batch_first else (input.shape[1], input.shape[0])
    I = input.shape[2]
    device, dtype = input.device, input.dtype
    lengthsarg(op, lengths, B, T, device, values=values, allow_cpu=device.type == "cuda",
                         owner=owner)
    D = 2 if bidirectional else 1
    weights = list(weights)
    if len(weights) not in (2 * D, 4 * D):
        _fail(op, f"weights must hold 2*D (no bias) or 4*D tensors for D = {D} directions, "
                  f"got {len(weights)}")
    tensor_arg(op, "w_hh", weights[1], dim=2)
    G, H = RNN_GATES[mode], weights[1].shape[1]
    if H == 0:
        _fail(op, "the hidden size (w_hh.size(1)) must be positive")
    per_dir = len(weights) // D
    names = ("w_ih", "w_hh", "b_ih", "b_hh")
    shapes = ((G * H, I), (G * H, H), (G * H,), (G * H,))
    # w_ih / w_hh may be bfloat16 with float32 input: the bf16 inference layers
    # (fastner.nn.rnn_bf16); the biases always have the input's dtype.
    if matrix_dtype is not None:  # the int8 op: its own matrix dtype only
        matrix_dtypes = (matrix_dtype,)
    else:
        matrix_dtypes = (dtype, torch.bfloat16) if dtype == torch.float32 else (dtype,)
    for d in range(D):
        for j in range(per_dir):
            tensor_arg(op, f"{names[j]} of direction {d}", weights[d * per_dir + j], shape=shapes[j],
                   dtypes=matrix_dtypes if j < 2 else (dtype,), device=device, owner=owner)
    for name, state in (("hx", hx), ("cx", cx)):
        if state is not None:
            tensor_arg(op, name, state, shape=(D, B, H), dtypes=(dtype,), device=device, owner=owner)


def rnn_int8_args(op: str, input: Tensor, lengths: Tensor, weights: Sequence[Tensor], hidden_size,
                  hx: Optional[Tensor], cx: Optional[Tensor], mode: str, bidirectional: bool,
                  batch_first: bool, *, values: bool = True) -> None:
    """rnn_layer_int8_forward's arguments (csrc/fastner.cpp): input [B, T, I] float32, lengths
    int64 [B] in [0, T]; weights per direction packed w_ih [G*H, I], packed w_hh [G*H, H]
    (int8_packed_arg) and, with bias, b_ih, b_hh float32 [G*H]; hidden_size H > 0; hx / cx
    float32 [D, B, H]; all on the input's device."""
    if mode not in RNN_GATES:
        _fail(op, f"mode must be one of {sorted(RNN_GATES)}, got {mode!r}")
    owner = "the input's"
    tensor_arg(op, "input", input, dim=3, dtypes=(torch.float32,))
    B, T = (input.shape[0], input.shape[1]) if batch_first else (input.shape[1], input.shape[0])
    I = input.shape[2]
    device = input.device
    lengthsarg(op, lengths, B, T, device, values=values, allow_cpu=device.type == "cuda", owner=owner)
    D = 2 if bidirectional else 1
    weights = list(weights)
    if len(weights) not in (2 * D, 4 * D):
        _fail(op, f"weights must hold 2*D (no bias) or 4*D tensors for D = {D} directions, "
                  f"got {len(weights)}")
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or not 0 < hidden_size < 2**31:
        _fail(op, f"hidden_size must be a positive int below 2**31, got {hidden_size!r}")
    G, H = RNN_GATES[mode], hidden_size
    per_dir = len(weights) // D
    for d in range(D):
        for j, (name, k) in enumerate((("w_ih", I), ("w_hh", H))):
            int8_packed_arg(op, f"{name} of direction {d}", weights[d * per_dir + j], G * H, k,
                            device=device, values=values)
        for j in range(2, per_dir):
            tensor_arg(op, f"{('b_ih', 'b_hh')[j - 2]} of direction {d}", weights[d * per_dir + j],
                       shape=(G * H,), dtypes=(torch.float32,), device=device, owner=owner)
    for name, state in (("hx", hx), ("cx", cx)):
        if state is not None:
            tensor_arg(op, name, state, shape=(D, B, H), dtypes=(torch.float32,), device=device, owner=owner)


def int8_packed_arg(op: str, name: str, packed: Tensor, n: int, k: int, *,
                    device: Optional[torch.device] = None, values: bool = True) -> None:
    """`packed` is the packed form (rnn_int8_pack) of an int8 weight [n, k]: 1-D int8 of
    int8_packed_bytes(n, k) elements on `device` and, where values can be read, with the header
    rnn_int8_pack writes for [n, k] (the checks of the kernel's PackedWeights, csrc/cpu/rnn_int8.h).
    The payload is not checked: see rnn_int8.h."""
    from fastner import reference

    tensor_arg(op, name, packed, device=device, owner="the input's")
    if packed.dim() != 1 or packed.dtype != torch.int8:
        _fail(op, f"{name} must be a packed weight (1-D int8, from fastner.ops.rnn_int8_pack), got "
                  f"{str(packed.dtype).replace('torch.', '')} {list(packed.shape)}")
    size = reference.int8_packed_bytes(n, k)
    if packed.shape[0] != size:
        _fail(op, f"{name} must be a weight [{n}, {k}] packed by fastner::rnn_int8_pack ({size} bytes), "
                  f"got {packed.shape[0]} bytes")
    if values and _reads_values(packed):
        header = packed[:reference.INT8_PACK_HEADER_BYTES].clone().view(torch.int64).tolist()
        want = reference._int8_pack_header(n, k)
        if header[0] != want[0]:
            _fail(op, f"{name} is not a packed weight (no rnn_int8_pack header: pack it with "
                      "fastner.ops.rnn_int8_pack)")
        if header[1:3] != want[1:3]:
            _fail(op, f"{name} was packed for a weight [{header[1]}, {header[2]}], this layer needs "
                      f"[{n}, {k}]")
        if header != want:
            _fail(op, f"{name}'s header does not match the layout rnn_int8_pack writes for [{n}, {k}]")


def rnn_int8_pack_args(op: str, weight: Tensor, scale: Tensor, *, values: bool = True) -> None:
    """rnn_int8_pack's arguments: weight int8 [N, K] with every entry in [-63, 63] (the kernel's
    int16 sums need 7-bit weights: csrc/cpu/rnn_int8.h), scale float32 [N] on its device."""
    tensors(op, ("weight", "scale"), (weight, scale))
    if weight.dim() != 2 or weight.dtype != torch.int8:
        _fail(op, f"weight must be 2-D int8 [N, K] (fastner.reference.quantize_weight_int8), got "
                  f"{str(weight.dtype).replace('torch.', '')} {list(weight.shape)}")
    if scale.dim() != 1 or scale.shape[0] != weight.shape[0] or scale.dtype != torch.float32:
        _fail(op, f"scale must be float32 [N] = [{weight.shape[0]}], got "
                  f"{str(scale.dtype).replace('torch.', '')} {list(scale.shape)}")
    tensor_arg(op, "scale", scale, device=weight.device, owner="the weight's")
    # not on a traced weight: no data to read
    if values and weight.numel() and _reads_values(weight):
        outside = (weight.abs() > 63) | (weight == -128)  # abs(-128) wraps to -128 in int8
        if bool(outside.any()):
            row = int(outside.any(dim=1).nonzero()[0, 0])
            low, high = int(weight[row].min()), int(weight[row].max())
            bad = low if low < -63 else high  # the kernel's message: the row's minimum, else its maximum
            _fail(op, f"weight must be in [-63, 63] (fastner.reference.quantize_weight_int8), got "
                      f"{int(bad)} in row {row}")


def tag_lists_args(tags: Tensor, lengths: Tensor) -> None:
    """tag_lists' arguments: tags int64 [B, T] and lengths int64 [B] in [0, T], on one device."""
    op = "tag_lists"
    tensor_arg(op, "tags", tags, dim=2, dtypes=(torch.long,))
    lengthsarg(op, lengths, tags.shape[0], tags.shape[1], tags.device, owner="the tags'")


def packed_batch_sizes(op: str, batch_sizes: Tensor, rows: int) -> None:
    """A PackedSequence's batch_sizes: int64 [T] on the CPU, positive, non-increasing and summing
    to the number of packed rows (what pack_padded_sequence makes; torch's RNNs refuse others)."""
    tensor_arg(op, "batch_sizes", batch_sizes, dim=1, dtypes=(torch.long,),
               device=torch.device("cpu"), owner="the required")
    sizes = batch_sizes.tolist()
    if not sizes:
        _fail(op, "batch_sizes must not be empty")
    if min(sizes) <= 0 or any(later > earlier for earlier, later in zip(sizes, sizes[1:])):
        _fail(op, f"batch_sizes must be positive and non-increasing, got {sizes}")
    if sum(sizes) != rows:
        _fail(op, f"batch_sizes must sum to the number of packed rows {rows}, got {sum(sizes)}")


def dropout_args(op: str, input: Tensor, p, seed) -> None:
    """dropout_mask's arguments (csrc/fastner.cpp): input a floating-point tensor, p a number in
    [0, 1), seed a Python int in int64's range."""
    tensor_arg(op, "input", input, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and 0.0 <= p < 1.0):
        _fail(op, f"p must be a number in [0, 1), got {p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63:
        _fail(op, f"seed must be an integer in int64's range, got {seed!r}")
