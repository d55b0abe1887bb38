"""The CUDA CRF kernels (csrc/cuda/kernels/crf.cuh) run on the CPU under a thread-and-barrier
emulation of CUDA (tests/ops/cuda_emulation/), against fastner.reference.

This runs the real device code and the real launchers (launch shapes, shared-memory layouts,
scratch sizes, warp and block paths, groups looping over several sequences) on machines without
a GPU. It cannot see warp-level timing, memory-model races, the device's math library or
resource limits; tests/ops/crf/test_crf_cuda.py on a GPU covers those. Skipped when g++ or the CUDA
headers (cuda_runtime.h, from nvcc's toolkit) are missing.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest
import torch

from fastner import reference
from fastner.reference import crf_accumulate_dtype
from tests import testing
from tests.ops.crf.samples import crf_inputs

ROOT = testing.REPO_ROOT
EMULATION = ROOT / "tests" / "ops" / "cuda_emulation"
SOURCES = [ROOT / "csrc" / "cuda" / "kernels" / "crf.cuh", EMULATION / "emulate_cuda.h", EMULATION / "crf_emulated.cpp"]
INF = float("-inf")

if not hasattr(reference, "crf_forward"):
    pytest.skip("fastner.reference has no CRF section yet", allow_module_level=True)


def cuda_include_dir():
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(pathlib.Path(os.path.realpath(nvcc)).parents[1]))
    for base in candidates:
        if base and (pathlib.Path(base) / "include" / "cuda_runtime.h").exists():
            return pathlib.Path(base) / "include"
    return None


@pytest.fixture(scope="module")
def emu():
    """The emulated kernels as a ctypes library, built once per source version."""
    include = cuda_include_dir()
    compiler = shutil.which("g++")
    if include is None or compiler is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_runtime.h)")
    # -fno-gnu-unique: the emulation's inline variables (namespace emu) stay private to this
    # library; as GNU unique symbols they would be bound process-wide, onto the RNN emulation's
    # same-named ones (tests/ops/rnn/test_rnn_cuda_emulated.py) when both run in one process.
    flags = ["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wno-attributes", "-fno-gnu-unique"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + " ".join(flags).encode()).hexdigest()[:16]
    lib = pathlib.Path(tempfile.gettempdir()) / f"fastner_crf_emulated_{digest}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [compiler, *flags, f"-I{include}", f"-I{ROOT / 'csrc'}", f"-I{EMULATION}",
               str(EMULATION / "crf_emulated.cpp"), "-o", str(tmp)]
        subprocess.run(cmd, check=True)
        os.replace(tmp, lib)
    return ctypes.CDLL(str(lib))


# ---------------------------------------------------------------------------------------------
# calling the emulated launchers
# ---------------------------------------------------------------------------------------------

SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}


def p(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def i64(x):
    return ctypes.c_int64(x)


def call(emu, name, dtype, *args):
    fn = getattr(emu, f"emu_{name}_{SUFFIX[dtype]}")
    fn.restype = ctypes.c_int
    status = fn(*args)
    assert status == 0, f"{name}: launcher returned cudaError {status}"


def forward(emu, emissions, tags, lengths, tr, start, end, with_alphas=True):
    """log Z, gold, alphas (None unless with_alphas: crf_forward passes none, crf_backward a buffer)."""
    B, T, K = emissions.shape
    a = crf_accumulate_dtype(emissions.dtype)
    log_z, gold = torch.empty(B, dtype=a), torch.empty(B, dtype=a)
    alphas = torch.empty(B, T, K, dtype=a) if with_alphas else None
    call(emu, "forward", emissions.dtype, p(emissions), p(tags), p(lengths), p(tr), p(start), p(end),
         p(log_z), p(gold), p(alphas), i64(B), i64(T), ctypes.c_int(K))
    return log_z, gold, alphas


def backward(emu, gl, gg, emissions, tags, lengths, tr, start, end, sms=1):
    B, T, K = emissions.shape
    a = crf_accumulate_dtype(emissions.dtype)
    grads = (torch.empty(B, T, K, dtype=emissions.dtype), torch.empty(K, K, dtype=a), torch.empty(K, dtype=a),
             torch.empty(K, dtype=a))
    call(emu, "backward", emissions.dtype, p(gl), p(gg), p(emissions), p(tags), p(lengths), p(tr), p(start),
         p(end), *map(p, grads), i64(B), i64(T), ctypes.c_int(K), ctypes.c_int(sms))
    return grads


def reference_alphas(emissions, tags, lengths, tr, start, end):
    """The log forward variables [B, T, K] the forward kernel writes where given a buffer
    (crf_backward's recomputation): the reference's, zeros past each length."""
    return reference.crf_alphas(emissions, lengths, tr, start, end)[1]


def viterbi(emu, emissions, lengths, tr, start, end):
    B, T, K = emissions.shape
    tags, scores = torch.empty(B, T, dtype=torch.int64), torch.empty(B, dtype=crf_accumulate_dtype(emissions.dtype))
    call(emu, "viterbi", emissions.dtype, p(emissions), p(lengths), p(tr), p(start), p(end), p(tags), p(scores),
         i64(B), i64(T), ctypes.c_int(K))
    return tags, scores


def kbest(emu, emissions, lengths, tr, start, end, k):
    B, T, K = emissions.shape
    tags, scores = torch.empty(B, k, T, dtype=torch.int64), torch.empty(B, k, dtype=crf_accumulate_dtype(emissions.dtype))
    call(emu, "kbest", emissions.dtype, p(emissions), p(lengths), p(tr), p(start), p(end), p(tags), p(scores),
         i64(B), i64(T), ctypes.c_int(K), ctypes.c_int(k), i64(227 * 1024))
    return tags, scores


def marginals(emu, emissions, lengths, tr, start, end):
    B, T, K = emissions.shape
    out = torch.empty(B, T, K, dtype=crf_accumulate_dtype(emissions.dtype))
    call(emu, "marginals", emissions.dtype, p(emissions), p(lengths), p(tr), p(start), p(end), p(out), i64(B),
         i64(T), ctypes.c_int(K))
    return out


# ---------------------------------------------------------------------------------------------
# inputs and comparisons
# ---------------------------------------------------------------------------------------------


def close(actual, expected, dtype, scale=1.0, msg=""):
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=tol["rtol"],
                               atol=tol["atol"] * max(1.0, scale), msg=(lambda m: f"{msg}\n{m}") if msg else None)


# warp path (K <= 32), block path (K > 32), uint16 backpointers (K > 256). The emulation runs
# every GPU thread as a host thread: the larger shapes take seconds to minutes, so only a few
# run by default (`pytest -m slow` runs the rest).
SHAPES = [(1, 1, 1), (3, 5, 2), (9, 7, 17), (6, 4, 32), (5, 5, 33), (3, 4, 64), (2, 3, 100), (2, 3, 300)]
DEFAULT_CASES = {2, 4}  # K = 17 (warp path), K = 33 (block path)
CASES = [pytest.param(case, marks=() if case in DEFAULT_CASES else pytest.mark.slow) for case in range(len(SHAPES))]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("constrained", [False, True], ids=["free", "constrained"])
def test_every_op_matches_reference(emu, case, dtype, constrained):
    torch.manual_seed(31 * case + 7 * constrained + (dtype == torch.float64))
    B, T, K = SHAPES[case]
    inputs = crf_inputs(B, T, K, dtype, constrained=constrained)
    emissions, tags, lengths, tr, start, end = inputs
    scale = float(lengths.sum())

    log_z, gold, alphas = forward(emu, *inputs)
    expected = (*reference.crf_forward(*inputs), reference_alphas(*inputs))
    for name, a, e in zip(("log_z", "gold", "alphas"), (log_z, gold, alphas), expected):
        close(a, e, dtype, msg=name)
    log_z_only, gold_none, _ = forward(emu, emissions, None, lengths, tr, start, end)
    assert torch.equal(log_z_only, log_z) and torch.equal(gold_none, torch.zeros(B, dtype=gold.dtype))

    gl, gg = torch.randn(B, dtype=crf_accumulate_dtype(dtype)), torch.randn(B, dtype=crf_accumulate_dtype(dtype))
    for sms in (1, 64):  # 1: groups loop over several sequences
        grads = backward(emu, gl, gg, *inputs, sms=sms)
        for name, a, e in zip(("emissions", "transitions", "start", "end"), grads,
                              reference.crf_backward(gl, gg, *inputs)):
            assert not torch.isnan(a).any(), name
            close(a, e, dtype, scale=scale, msg=f"grad {name} (sms={sms})")
    no_tags = backward(emu, gl, gg, emissions, None, lengths, tr, start, end)
    for name, a, e in zip(("emissions", "transitions", "start", "end"), no_tags,
                          reference.crf_backward(gl, torch.zeros_like(gg), emissions, None, lengths, tr, start, end)):
        close(a, e, dtype, scale=scale, msg=f"grad {name} without tags")

    plain = (emissions, lengths, tr, start, end)
    tags_v, scores_v = viterbi(emu, *plain)
    tags_r, scores_r = reference.crf_viterbi(*plain)
    assert torch.equal(tags_v, tags_r)
    close(scores_v, scores_r, dtype)

    for k in (1, 3, 7):
        tags_k, scores_k = kbest(emu, *plain, k)
        tags_kr, scores_kr = reference.crf_kbest(*plain, k)
        close(scores_k, scores_kr, dtype, msg=f"k={k}")
        assert torch.equal(tags_k, tags_kr), f"k={k}"

    close(marginals(emu, *plain), reference.crf_marginals(*plain), dtype, msg="marginals")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_one_tag_has_log_likelihood_exactly_zero(emu, dtype):
    # K = 1: log Z is the only path's score. It was the recursion's, which rounds in another
    # order than the gold score: up to 8.6e-6 apart at T = 40 (scores ~3) in float32.
    torch.manual_seed(1)
    B, T = 9, 40
    emissions = torch.randn(B, T, 1, dtype=dtype) * 3
    tr, start, end = torch.randn(1, 1, dtype=dtype), torch.randn(1, dtype=dtype), torch.randn(1, dtype=dtype)
    lengths = torch.randint(0, T + 1, (B,))
    lengths[0] = T
    tags = torch.zeros(B, T, dtype=torch.long)
    log_z, gold, _ = forward(emu, emissions, tags, lengths, tr, start, end, with_alphas=False)
    assert torch.equal(log_z, gold)
    assert torch.equal(forward(emu, emissions, None, lengths, tr, start, end, with_alphas=False)[0], gold)
    torch.testing.assert_close(log_z, reference.crf_forward(emissions, tags, lengths, tr, start, end)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("K", [5, 40])
def test_low_precision_emissions(emu, dtype, K):
    torch.manual_seed(K)
    inputs = crf_inputs(4, 6, K, dtype)
    emissions, tags, lengths, tr, start, end = inputs
    log_z, gold, alphas = forward(emu, *inputs)
    for a, e in zip((log_z, gold, alphas), (*reference.crf_forward(*inputs), reference_alphas(*inputs))):
        assert a.dtype == torch.float32
        close(a, e, torch.float32)
    gl, gg = torch.randn(4), torch.randn(4)
    grads = backward(emu, gl, gg, *inputs)
    expected = reference.crf_backward(gl, gg, *inputs)
    assert grads[0].dtype == dtype
    torch.testing.assert_close(grads[0].float(), expected[0].float(), rtol=1e-2, atol=1e-2)
    for a, e in zip(grads[1:], expected[1:]):
        close(a, e, torch.float32, scale=float(lengths.sum()))
    plain = (emissions, lengths, tr, start, end)
    assert torch.equal(viterbi(emu, *plain)[0], reference.crf_viterbi(*plain)[0])
    close(marginals(emu, *plain), reference.crf_marginals(*plain), torch.float32)


@pytest.mark.parametrize("K", [3, 40])
def test_empty_and_dead_sequences(emu, K):
    torch.manual_seed(100 + K)
    for B, T in ((3, 0), (0, 4)):
        emissions, tags, lengths, tr, start, end = crf_inputs(B, T, K, torch.float32)
        log_z, gold, alphas = forward(emu, emissions, tags, lengths, tr, start, end)
        assert torch.equal(log_z, torch.zeros(B)) and torch.equal(gold, torch.zeros(B))
        grads = backward(emu, torch.ones(B), torch.ones(B), emissions, tags, lengths, tr, start, end)
        for g in grads[1:]:
            assert torch.equal(g, torch.zeros_like(g))
        tags_k, scores_k = kbest(emu, emissions, lengths, tr, start, end, 2)
        assert (tags_k == -1).all()
        if B:
            assert torch.equal(scores_k, torch.tensor([[0.0, INF]] * B))
    # every transition forbidden: no path longer than 1
    emissions, tags, lengths, tr, start, end = crf_inputs(5, 6, K, torch.float32, min_len=1)
    tr = torch.full((K, K), INF)
    inputs = (emissions, tags, lengths, tr, start, end)
    log_z, gold, alphas = forward(emu, *inputs)
    assert torch.equal(torch.isneginf(log_z), lengths > 1)
    gl, gg = torch.randn(5), torch.randn(5)
    grads = backward(emu, gl, gg, *inputs)
    for a, e in zip(grads, reference.crf_backward(gl, gg, *inputs)):
        assert not torch.isnan(a).any()
        close(a, e, torch.float32, scale=float(lengths.sum()))
    m = marginals(emu, emissions, lengths, tr, start, end)
    assert not torch.isnan(m).any()
    close(m, reference.crf_marginals(emissions, lengths, tr, start, end), torch.float32)


@pytest.mark.slow
def test_long_sequences_take_the_global_backpointers(emu):
    torch.manual_seed(5)
    emissions, _, lengths, tr, start, end = crf_inputs(4, 600, 17, torch.float32)
    tags, scores = viterbi(emu, emissions, lengths, tr, start, end)
    tags_r, scores_r = reference.crf_viterbi(emissions, lengths, tr, start, end)
    assert torch.equal(tags, tags_r)
    torch.testing.assert_close(scores, scores_r, rtol=1e-5, atol=1e-3)


def test_bad_values_poison_with_nan(emu):
    torch.manual_seed(6)
    emissions, tags, lengths, tr, start, end = crf_inputs(4, 5, 6, torch.float32, min_len=1)
    lengths[2] = 9
    lengths[3] = -1
    tags[1, 0] = 6
    log_z, gold, alphas = forward(emu, emissions, tags, lengths, tr, start, end)
    assert torch.isnan(log_z[2:]).all() and torch.isnan(gold[1:]).all()
    assert not torch.isnan(log_z[:2]).any() and not torch.isnan(gold[0])
    grads = backward(emu, torch.ones(4), torch.ones(4), emissions, tags, lengths, tr, start, end)
    assert torch.isnan(grads[0][1:]).all() and not torch.isnan(grads[0][0]).any()
    assert torch.isnan(grads[1]).all()
    tags_v, scores_v = viterbi(emu, emissions, lengths, tr, start, end)
    assert torch.isnan(scores_v[2:]).all() and (tags_v[2:] == -1).all()
    tags_k, scores_k = kbest(emu, emissions, lengths, tr, start, end, 2)
    assert torch.isnan(scores_k[2:]).all() and (tags_k[2:] == -1).all()
    assert torch.isnan(marginals(emu, emissions, lengths, tr, start, end)[2:]).all()


def kbest_in_cpu_order(emissions, length, tr, start, end, k):
    """One sequence's k best paths by the CPU kernel's algorithm (csrc/cpu/crf.cpp, TopK):
    per tag a list of the k best prefixes, filled by offering candidates in (i, r) order with a
    stable insertion, -inf never admitted. Exact on integer-valued scores, where ties abound."""
    K = len(start)
    neg = float("-inf")

    def top_k(candidates):
        slots = [(neg, -1, -1)] * k
        for value, a, b in candidates:
            if not value > slots[-1][0]:
                continue
            at = k - 1
            while at > 0 and value > slots[at - 1][0]:
                at -= 1
            slots = slots[:at] + [(value, a, b)] + slots[at:k - 1]
        return slots

    tags, scores = [[-1] * len(emissions) for _ in range(k)], [neg] * k
    if length == 0:
        scores[0] = 0.0
        return tags, scores
    cur = [[start[j] + emissions[0][j]] + [neg] * (k - 1) for j in range(K)]
    back = [None]
    for t in range(1, length):
        lists = [top_k((cur[i][r] + tr[i][j], i, r) for i in range(K) if tr[i][j] != neg for r in range(k))
                 for j in range(K)]
        cur = [[value + emissions[t][j] for value, _, _ in lists[j]] for j in range(K)]
        back.append([[(a, b) for _, a, b in lists[j]] for j in range(K)])
    final = top_k((cur[j][r] + end[j], j, r) for j in range(K) for r in range(k))
    for n, (value, tag, rank) in enumerate(final):
        if value == neg:
            break
        scores[n] = value
        for t in range(length - 1, 0, -1):
            tags[n][t] = tag
            tag, rank = back[t][tag][rank]
        tags[n][0] = tag
    return tags, scores


@pytest.mark.parametrize("K", [3, 34])
def test_kbest_ties_follow_the_cpu_order(emu, K):
    # Small integer scores: many paths tie exactly, and the order among them is the contract.
    torch.manual_seed(7 + K)
    B, T, k = 6, 5, 6
    emissions = torch.randint(-1, 2, (B, T, K)).float()
    tr = torch.randint(-1, 2, (K, K)).float().masked_fill(torch.rand(K, K) < 0.2, INF)
    start = torch.randint(-1, 2, (K,)).float()
    end = torch.zeros(K)
    lengths = torch.tensor([T, 0, 1, 2, 3, T])
    tags, scores = kbest(emu, emissions, lengths, tr, start, end, k)
    for b in range(B):
        expected_tags, expected_scores = kbest_in_cpu_order(emissions[b].tolist(), int(lengths[b]), tr.tolist(),
                                                            start.tolist(), end.tolist(), k)
        assert scores[b].tolist() == expected_scores, b
        assert tags[b].tolist() == expected_tags, b


# Where a NaN or +inf score sits (csrc/cpu/crf_gold_nan.h, "NaN and +inf propagation"):
# sequence 0 meets it, sequence 1 has one past its length (which changes nothing), or every
# sequence does (a start or transition score), or every sequence but a length-1 one (a
# transition score: length 1 reads none).
NONFINITE = ["nan_emission", "posinf_emission", "posinf_meets_minus_inf", "nan_transition", "posinf_start"]
LENGTH_1 = ["posinf_transition_length_1", "nan_transition_length_1"]


@pytest.mark.parametrize("K", [5, 33], ids=["warp", "block"])
@pytest.mark.parametrize("case", NONFINITE + LENGTH_1)
def test_nan_and_posinf_scores_follow_the_cpu_contract(emu, case, K):
    # It was (seen under this emulation): log Z -inf for a NaN or +inf score (the max-shifted
    # log-sum-exp skipped NaN terms and shifted +inf by inf - inf), finite emission and shared
    # gradients, finite marginals.
    B, T = 3, 5
    emissions, tags, lengths, tr, start, end = nonfinite_inputs(case, K, B, T)
    inputs = (emissions, tags, lengths, tr, start, end)
    plain = (emissions, lengths, tr, start, end)
    ops = torch.ops.fastner

    def same(actual, expected, msg):
        torch.testing.assert_close(actual, expected.to(actual.dtype), equal_nan=True, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{case} {msg}\n{m}")

    log_z, gold, _ = forward(emu, *inputs)
    cpu_log_z, cpu_gold = ops.crf_forward(*inputs)
    same(log_z, cpu_log_z, "log_z")
    same(gold, cpu_gold, "gold")
    poisoned = ~cpu_log_z.isfinite()
    every = case in ("nan_transition", "posinf_start")
    expected = poisoned.all() if every else not poisoned[1:].any()
    if case in LENGTH_1:  # it was NaN for sequence 1 too (on CPU and here), not the reference's
        expected = poisoned.tolist() == [True, False, True]
        alone = reference.crf_forward(emissions[1:2, :1], tags[1:2, :1], lengths[1:2], tr, start, end)
        same(log_z[1:2], alone[0], "log_z of the length-1 sequence")
    assert poisoned[0] and expected
    gl, gg = torch.ones(B), torch.ones(B)
    for name, a, e in zip(("emissions", "transitions", "start", "end"), backward(emu, gl, gg, *inputs),
                          ops.crf_backward(gl, gg, *inputs)):
        same(a, e, f"grad {name}")
    same(marginals(emu, *plain), ops.crf_marginals(*plain), "marginals")


def nonfinite_inputs(case, K, B, T):
    torch.manual_seed(K)
    emissions, tags, lengths, tr, start, end = crf_inputs(B, T, K, torch.float32, min_len=2)
    lengths[:] = torch.tensor([T, 2, 3])
    inf = float("inf")
    if case == "nan_emission":
        emissions[0, 2, 1] = float("nan")
        emissions[1, 3, 1] = float("nan")
    elif case.startswith("posinf_emission") or case == "posinf_meets_minus_inf":
        emissions[0, 2, 1] = inf
        emissions[1, 3, 1] = inf
        if case == "posinf_meets_minus_inf":
            tr[1, :] = INF  # nothing follows tag 1: its +inf path meets -inf
    elif case == "nan_transition":
        tr[0, K - 1] = float("nan")
    elif case in LENGTH_1:  # sequence 1 reads no transition score: finite, as on CPU
        tr[2, 3] = inf if case.startswith("posinf") else float("nan")
        lengths[1] = 1
    else:
        start[2] = inf
    return emissions, tags, lengths, tr, start, end


@pytest.mark.parametrize("K", [5, 33], ids=["warp", "block"])
@pytest.mark.parametrize("case", NONFINITE + LENGTH_1)
def test_nan_and_posinf_scores_decode_as_on_cpu(emu, case, K):
    # It was: the comparisons skip NaN, so a NaN score (or a +inf one meeting -inf) gave a finite
    # best score and finite k-best rows with tags (seen: 7.30 where the CPU gives NaN).
    B, T = 3, 5
    emissions, _, lengths, tr, start, end = nonfinite_inputs(case, K, B, T)
    plain = (emissions, lengths, tr, start, end)
    ops = torch.ops.fastner
    poisoned = ~ops.crf_forward(emissions, None, lengths, tr, start, end)[0].isfinite()
    tags_v, scores_v = viterbi(emu, *plain)
    cpu_tags_v, cpu_scores_v = ops.crf_viterbi(*plain)
    torch.testing.assert_close(scores_v, cpu_scores_v, equal_nan=True)
    # a poisoned sequence keeps a path (the CPU's and the reference's may differ there: the
    # argmax of NaN scores is no contract); the others are exact
    assert torch.equal(tags_v[~poisoned], cpu_tags_v[~poisoned])
    valid = torch.arange(T)[None] < lengths[:, None]
    assert ((tags_v >= 0) & (tags_v < K))[valid].all() and (tags_v[~valid] == -1).all()
    tags_k, scores_k = kbest(emu, *plain, 2)
    cpu_tags_k, cpu_scores_k = ops.crf_kbest(*plain, 2)
    torch.testing.assert_close(scores_k, cpu_scores_k, equal_nan=True)
    assert torch.equal(tags_k, cpu_tags_k)
    if case in LENGTH_1:  # the length-1 sequence decodes as the reference does (it was NaN)
        alone = (emissions[1:2, :1], lengths[1:2], tr, start, end)
        ref_tags_v, ref_scores_v = reference.crf_viterbi(*alone)
        ref_tags_k, ref_scores_k = reference.crf_kbest(*alone, 2)
        torch.testing.assert_close(scores_v[1:2], ref_scores_v)
        assert torch.equal(tags_v[1:2, :1], ref_tags_v)
        torch.testing.assert_close(scores_k[1:2], ref_scores_k)
        assert torch.equal(tags_k[1:2, :, :1], ref_tags_k)
