"""The CUDA RNN code (csrc/cuda/rnn.cu and csrc/cuda/kernels/rnn.cuh) run on the CPU through an
emulation of the CUDA runtime (tests/ops/cuda_emulation/): the binding's plan, GEMM orientation,
layouts, both paths (the persistent kernels with real threads and barriers, and step-wise) of the
forward and the backward, against torch.nn run sequence by sequence. It checks the logic, not the GPU: not
cuBLAS itself, stream concurrency, the memory model or performance (tests/ops/rnn/test_rnn_cuda.py does
that on a GPU). The sources are rewritten mechanically (launch syntax, shared memory), compiled
with the host compiler and registered as the ops fastner_emu::rnn_layer_* for the CPU.

Slow (a C++ build of about a minute); needs the CUDA headers (cuda_runtime.h, cuda_fp16.h) but
no GPU and no CUDA torch.
"""
from __future__ import annotations

import os
import pathlib
import re

import pytest
import torch

from tests import testing
from tests.ops.rnn.samples import MODES, OP_MODE, LayerCase

ROOT = testing.REPO_ROOT
SHIM = ROOT / "tests" / "ops" / "cuda_emulation"

pytestmark = pytest.mark.slow


def _cuda_include():
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and (pathlib.Path(base) / "include" / "cuda_runtime.h").exists():
            return str(pathlib.Path(base) / "include")
    return None


def _emulated_sources(out: pathlib.Path) -> pathlib.Path:
    cuh = (ROOT / "csrc/cuda/kernels/rnn.cuh").read_text()
    cuh, launches = re.subn(r"(\w+<[^<>;]*>)<<<(.*?)>>>\(", r"emu::launch(\2, \1, ", cuh)
    assert launches > 0
    cuh = cuh.replace("extern __shared__ __align__(16) unsigned char smem[];", "unsigned char* smem = emu::block_smem();")
    cuh = cuh.replace("__launch_bounds__(kPersistentThreads) ", "")
    cuh = cuh.replace("#include <cooperative_groups.h>", '#include "emu.h"')
    (out / "cuda/kernels").mkdir(parents=True, exist_ok=True)
    (out / "cuda/kernels/rnn.cuh").write_text(cuh)
    for shared in ("accumulate.cuh",):  # headers rnn.cuh includes, unchanged
        (out / "cuda/kernels" / shared).write_text((ROOT / "csrc/cuda/kernels" / shared).read_text())
    cu = (ROOT / "csrc/cuda/rnn.cu").read_text()
    cu = cu.replace("pinned_memory(true)", "pinned_memory(false)")
    cu = cu[: cu.index("TORCH_LIBRARY_IMPL(fastner, CUDA, m)")]
    schemas = (ROOT / "csrc/fastner.cpp").read_text()
    defs = re.findall(r'm\.def\("rnn_layer_(?:forward|backward)\(.*?\);', schemas, flags=re.S)
    assert len(defs) == 2, "the RNN schemas are missing from csrc/fastner.cpp"
    cu += '\n#include "emu_runtime.h"\nTORCH_LIBRARY(fastner_emu, m) {\n' + "\n".join(defs) + "\n}\n"
    cu += (
        "TORCH_LIBRARY_IMPL(fastner_emu, CPU, m) {\n"
        '  m.impl("rnn_layer_forward", &fastner::cuda::rnn::rnn_layer_forward);\n'
        '  m.impl("rnn_layer_backward", &fastner::cuda::rnn::rnn_layer_backward);\n}\n'
    )
    (out / "emu_rnn.cpp").write_text(cu)
    return out / "emu_rnn.cpp"


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    include = _cuda_include()
    if include is None:
        pytest.skip("CUDA headers not found (CUDA_HOME/include/cuda_runtime.h)")
    if "rnn_layer_forward" not in (ROOT / "csrc/fastner.cpp").read_text():
        pytest.skip("no RNN schemas in csrc/fastner.cpp in this tree")
    from torch.utils import cpp_extension

    src = tmp_path_factory.mktemp("rnn_cuda_emu")
    source = _emulated_sources(src)
    build = src / "build"
    build.mkdir()
    cpp_extension.load(
        name="fastner_rnn_cuda_emu",
        sources=[str(source)],
        # src (the rewritten kernels) before csrc (checks.h, rnn_layout.h: shared with the CPU build)
        extra_include_paths=[str(SHIM), str(src), str(ROOT / "csrc"), include],
        # -fno-gnu-unique: namespace emu's inline variables stay private to this library (see
        # tests/ops/crf/test_crf_cuda_emulated.py, whose emulation has same-named ones)
        extra_cflags=["-std=c++20", "-O1", "-w", "-pthread", "-fno-gnu-unique"],
        extra_ldflags=["-pthread"],
        is_python_module=False,
        build_directory=str(build),
    )
    return torch.ops.fastner_emu


def _per_sequence_reference(module, mode, x, lengths, hx, cx, batch_first, D, H):
    """torch.nn on each sequence alone (length 0: zeros out, state kept): output, h_n, c_n."""
    B, T = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
    h0 = hx if hx is not None else x.new_zeros(D, B, H)
    c0 = cx if cx is not None else x.new_zeros(D, B, H)
    outs, hs, cs = [], [], []
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            outs.append(x.new_zeros(T, D * H))
            hs.append(h0[:, b])
            cs.append(c0[:, b])
            continue
        xb = (x[b] if batch_first else x[:, b])[:n].unsqueeze(1)
        state = (h0[:, b : b + 1].contiguous(), c0[:, b : b + 1].contiguous()) if mode == "LSTM" else h0[:, b : b + 1].contiguous()
        ob, sb = module(xb, state)
        outs.append(torch.cat([ob[:, 0], x.new_zeros(T - n, D * H)]))
        hs.append((sb[0] if mode == "LSTM" else sb)[:, 0])
        cs.append(sb[1][:, 0] if mode == "LSTM" else None)
    out = torch.stack(outs, 0 if batch_first else 1)
    h_n = torch.stack(hs, 1)
    c_n = torch.stack(cs, 1) if mode == "LSTM" else None
    return out, h_n, c_n


@pytest.mark.parametrize("mode", MODES)
def test_emulated_cuda_matches_torch(ops, mode, rnn_cuda_path):
    gen = torch.Generator().manual_seed(int(os.environ.get("FASTNER_TEST_SEED", "0")) * 7919 + MODES.index(mode))
    for case in range(8):
        case_ = LayerCase.draw(gen, mode, torch.float64, max_batch=5, max_time=7, max_input=6, max_hidden=7,
                               full_length=case % 2 == 0, with_state=case % 3 != 2)
        module, lengths = case_.module, case_.lengths
        bidirectional, batch_first, bias = case_.bidirectional, case_.batch_first, case_.bias
        T, B, I, H = case_.time_len, case_.batch, case_.input_size, case_.hidden
        D = 2 if bidirectional else 1
        dtype = torch.float64
        if case == 3:
            lengths[:] = T  # time-major full batch: the input is used in place as packed rows
        x, _, weights, hx, cx = case_.inputs()
        x.requires_grad_()
        hx, cx = (None if t is None else t.requires_grad_() for t in (hx, cx))
        what = f"case {case}: bi={bidirectional} bf={batch_first} bias={bias} T={T} B={B} I={I} H={H} lengths={lengths.tolist()}"

        out, h_n, c_n, workspace = ops.rnn_layer_forward(x, lengths, weights, hx, cx, OP_MODE[mode], bidirectional, batch_first, True)
        ref_out, ref_h, ref_c = _per_sequence_reference(module, mode, x, lengths, hx, cx, batch_first, D, H)
        tol = dict(rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out, ref_out.detach(), **tol, msg=lambda m: f"output, {what}: {m}")
        torch.testing.assert_close(h_n, ref_h.detach(), **tol, msg=lambda m: f"h_n, {what}: {m}")
        if mode == "LSTM":
            torch.testing.assert_close(c_n, ref_c.detach(), **tol, msg=lambda m: f"c_n, {what}: {m}")
        inference = ops.rnn_layer_forward(x.detach(), lengths, weights, hx, cx, OP_MODE[mode], bidirectional, batch_first, False)
        assert inference[3].numel() == 0
        torch.testing.assert_close(inference[0], ref_out.detach(), **tol)

        g_out, g_h = torch.randn_like(out), torch.randn_like(h_n)
        g_c = torch.randn_like(h_n) if mode == "LSTM" else torch.zeros(0, dtype=dtype)
        leaves = [x] + [t for t in (hx, cx) if t is not None] + list(module._flat_weights)
        loss = (ref_out * g_out).sum() + (ref_h * g_h).sum() + ((ref_c * g_c).sum() if mode == "LSTM" else 0)
        if torch.is_tensor(loss) and loss.requires_grad:
            expected = torch.autograd.grad(loss, leaves, allow_unused=True)
        else:  # every sequence empty and no state given: nothing depends on the leaves
            expected = [None] * len(leaves)
        expected = [torch.zeros_like(l) if e is None else e for e, l in zip(expected, leaves)]
        grad_input, grad_hx, grad_cx, grad_weights = ops.rnn_layer_backward(
            g_out, g_h, g_c, x.detach(), lengths, weights, None if hx is None else hx.detach(),
            None if cx is None else cx.detach(), workspace, OP_MODE[mode], bidirectional, batch_first,
        )
        got = [grad_input] + [g for g, t in ((grad_hx, hx), (grad_cx, cx)) if t is not None] + list(grad_weights)
        for i, (g, e) in enumerate(zip(got, expected)):
            torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-8, msg=lambda m, i=i: f"gradient {i}, {what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_emulated_cuda_low_precision_close_to_float64(ops, mode, dtype, rnn_cuda_path):
    gen = torch.Generator().manual_seed(int(os.environ.get("FASTNER_TEST_SEED", "0")) * 7919 + 101)
    G = 4 if mode == "lstm" else 3
    B, T, I, H, D = 4, 6, 5, 6, 2
    x = torch.randn(B, T, I, generator=gen)
    lengths = torch.tensor([6, 3, 0, 5])
    weights = [torch.randn(*s, generator=gen) * 0.4 for s in [(G * H, I), (G * H, H), (G * H,), (G * H,)] * D]
    hx = torch.randn(D, B, H, generator=gen)
    cx = torch.randn(D, B, H, generator=gen) if mode == "lstm" else None
    cast = lambda t, dt: None if t is None else t.to(dt)  # noqa: E731
    results = {}
    for dt in (torch.float64, dtype):
        fwd = ops.rnn_layer_forward(cast(x, dt), lengths, [cast(w, dt) for w in weights], cast(hx, dt), cast(cx, dt), mode, True, True, True)
        grads = [torch.ones_like(fwd[0]), torch.ones_like(fwd[1]), torch.ones_like(fwd[1]) if mode == "lstm" else fwd[2]]
        bwd = ops.rnn_layer_backward(*grads, cast(x, dt), lengths, [cast(w, dt) for w in weights], cast(hx, dt), cast(cx, dt), fwd[3], mode, True, True)
        results[dt] = [t for t in fwd[:3] if t.numel()] + [bwd[0], bwd[1]] + list(bwd[3])
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for i, (low, ref) in enumerate(zip(results[dtype], results[torch.float64])):
        assert low.dtype == dtype
        scale = max(float(ref.abs().max()), 1.0)
        err = float((low.double() - ref).abs().max()) / scale
        assert err < tol, f"tensor {i}: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("mode", ["rnn_relu", "rnn_tanh", "lstm", "gru"])
def test_emulated_cuda_propagates_nan_like_torch(ops, mode, rnn_cuda_path):
    # A NaN input step: NaN exactly where torch.nn has it (relu once took NaN to 0).
    gen = torch.Generator().manual_seed(202)
    G = {"lstm": 4, "gru": 3}.get(mode, 1)
    B, T, I, H = 3, 5, 4, 6
    x = torch.randn(B, T, I, generator=gen, dtype=torch.float64)
    x[1, 2, 0] = float("nan")
    lengths = torch.tensor([5, 4, 5])
    weights = [torch.randn(*s, generator=gen, dtype=torch.float64) * 0.4
               for s in [(G * H, I), (G * H, H), (G * H,), (G * H,)] * 2]
    out = ops.rnn_layer_forward(x, lengths, weights, None, None, mode, True, True, False)[0]
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(mode, torch.nn.RNN)
    kwargs = {"nonlinearity": mode[4:]} if cls is torch.nn.RNN else {}
    module = cls(I, H, batch_first=True, bidirectional=True, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        for p, w in zip(module._flat_weights, weights):
            p.copy_(w)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        want, _ = torch.nn.utils.rnn.pad_packed_sequence(module(packed)[0], batch_first=True, total_length=T)
    assert want.isnan().any()
    assert torch.equal(out.isnan(), want.isnan())
