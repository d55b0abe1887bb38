"""Small helpers shared by fastner's tests: devices, dtypes, tolerances, lengths and masks.

Generic on purpose (no op-specific code): any test module may import it with
`from tests import testing` or `import testing` (tests/ is on sys.path under pytest).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Iterator, List, Optional

import pytest
import torch
from torch import Tensor

# The repository's root (a source tree, or the copy of tests/ and pyproject.toml that
# .ci/gpu_wheel.sh runs against an installed wheel): the working directory of a test's subprocess.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# The CPU's features, and the kernels fastner must pick on it (csrc/cpu/cpu_isa.h)
# ---------------------------------------------------------------------------------------------

AVX512 = frozenset({"avx512f", "avx512dq", "avx512bw", "avx512vl"})


def cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def expected_bf16_kernel(isa: Optional[str] = None) -> Optional[str]:
    """The bf16 layers' product kernel a process with FASTNER_CPU_ISA=`isa` (None: this
    process's environment) must run on this CPU: 'amx_bf16' where it has AVX-512, AMX-TILE and
    AMX-BF16 and no cap, 'avx512_bf16' where it has AVX-512 and AVX512_BF16 and no cap to AVX2,
    else 'avx2'; None where the flags cannot be read."""
    flags = cpu_flags()
    if not flags:
        return None
    isa = os.environ.get("FASTNER_CPU_ISA", "") if isa is None else isa
    avx512 = AVX512 <= flags and isa != "avx2"
    if avx512 and {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags and isa != "avx512":
        return "amx_bf16"
    return "avx512_bf16" if avx512 and "avx512_bf16" in flags else "avx2"


def expected_int8_kernel(isa: Optional[str] = None, int8: Optional[str] = None) -> Optional[str]:
    """The int8 layers' product kernel a process with FASTNER_CPU_ISA=`isa` and
    FASTNER_RNN_INT8=`int8` (None: this process's environment) must run on this CPU: 'amx_int8'
    where it has AVX-512, AVX512-VNNI, AMX-TILE and AMX-INT8 and nothing caps it,
    'avx512_vnni' where it has AVX-512 and AVX512-VNNI and neither variable forces AVX2, else
    'avx2'; None where the flags cannot be read."""
    flags = cpu_flags()
    if not flags:
        return None
    isa = os.environ.get("FASTNER_CPU_ISA", "") if isa is None else isa
    int8 = os.environ.get("FASTNER_RNN_INT8", "") if int8 is None else int8
    vnni = AVX512 <= flags and "avx512_vnni" in flags and isa != "avx2" and int8 != "avx2"
    if vnni and {"amx_tile", "amx_int8"} <= flags and isa != "avx512":
        return "amx_int8"
    return "avx512_vnni" if vnni else "avx2"


# ---------------------------------------------------------------------------------------------
# Devices and dtypes
# ---------------------------------------------------------------------------------------------

DEVICES: List[torch.device] = [torch.device("cpu")] + (
    [torch.device("cuda")] if torch.cuda.is_available() else []
)
FLOAT_DTYPES = [torch.float32, torch.float64]
LOW_PRECISION_DTYPES = [torch.float16, torch.bfloat16]

# Parametrise a test over every device / float dtype this machine has:
#   @testing.devices  def test_x(device): ...
devices = pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.type)
float_dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).split(".")[-1])
low_precision_dtypes = pytest.mark.parametrize(
    "dtype", LOW_PRECISION_DTYPES, ids=lambda d: str(d).split(".")[-1]
)


def tolerances(dtype: torch.dtype) -> dict:
    """assert_close keyword tolerances for comparing two implementations in `dtype`.

    float64 is tight (different summation orders only); float32 allows the rounding that
    accumulates over a time loop of ~100 steps.
    """
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-9)
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-4)
    return dict(rtol=2e-2, atol=2e-2)


def assert_close(actual: Tensor, expected: Tensor, dtype: Optional[torch.dtype] = None, scale: float = 1.0, msg: str = "") -> None:
    """torch.testing.assert_close with tolerances for `dtype`, atol scaled by `scale`
    (pass the magnitude of a sum, e.g. a batch-summed gradient, so atol stays relative to it)."""
    tol = tolerances(dtype or expected.dtype)
    torch.testing.assert_close(
        actual.to(expected.dtype),
        expected,
        rtol=tol["rtol"],
        atol=tol["atol"] * max(1.0, scale),
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


# ---------------------------------------------------------------------------------------------
# Reproducible randomness per parametrised case
# ---------------------------------------------------------------------------------------------


def base_seed() -> int:
    return int(os.environ.get("FASTNER_TEST_SEED", "0"))


def reseed(case: int) -> int:
    """Seed torch's RNG for case `case` of a parametrised test (the conftest fixture gives every
    test the same seed, so cases that draw shapes must mix their index in). Returns the seed."""
    seed = base_seed() * 100003 + 7919 * case + 1
    torch.manual_seed(seed)
    return seed


def randint(low: int, high: int) -> int:
    """An int in [low, high], inclusive, from torch's global RNG."""
    return int(torch.randint(low, high + 1, ()).item())


# ---------------------------------------------------------------------------------------------
# Lengths and right-padded masks
# ---------------------------------------------------------------------------------------------


def random_lengths(batch: int, max_len: int, min_len: int = 1, include_extremes: bool = True) -> Tensor:
    """int64 [batch] lengths in [min_len, max_len]; when include_extremes, one sequence has
    max_len (so the padded length is really used) and, when batch >= 2, another has min_len."""
    lengths = torch.randint(min_len, max_len + 1, (batch,), dtype=torch.int64)
    if include_extremes and batch >= 1:
        order = torch.randperm(batch)
        lengths[order[0]] = max_len
        if batch >= 2:
            lengths[order[1]] = min_len
    return lengths


def mask_from_lengths(lengths: Tensor, max_len: int, batch_first: bool = True, dtype: torch.dtype = torch.bool) -> Tensor:
    """Right-padded mask, [B, T] when batch_first else [T, B]."""
    steps = torch.arange(max_len, device=lengths.device)
    mask = steps.unsqueeze(0) < lengths.unsqueeze(1)  # [B, T]
    if not batch_first:
        mask = mask.t()
    return mask.to(dtype).contiguous()


def to_layout(x: Tensor, batch_first: bool) -> Tensor:
    """A batch-first tensor [B, T, ...] in the requested layout (contiguous)."""
    return x.contiguous() if batch_first else x.transpose(0, 1).contiguous()


def to_batch_first(x: Tensor, batch_first: bool) -> Tensor:
    return x if batch_first else x.transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# Backend selection (fastner reads FASTNER_BACKEND at every call)
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the block with FASTNER_BACKEND=<name> ('reference', 'fused' or 'auto')."""
    old = os.environ.get("FASTNER_BACKEND")
    os.environ["FASTNER_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["FASTNER_BACKEND"]
        else:
            os.environ["FASTNER_BACKEND"] = old


def op_registered(name: str) -> bool:
    """Whether torch.ops.fastner.<name> exists (the extension is built and loaded)."""
    from fastner import _extension

    if not _extension.extension_loaded():
        return False
    try:
        getattr(torch.ops.fastner, name)
        return True
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count is `count` inside the block, and what it was after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def requires_op(name: str):
    """Skip marker for tests that call torch.ops.fastner.<name> directly."""
    return pytest.mark.skipif(not op_registered(name), reason=f"torch.ops.fastner.{name} is not registered (extension not built)")


def tiny_config(**overrides):
    """The training recipe of the tiny-model suites (2 epochs, hidden 8, Adam); overrides win."""
    from fastner.train import TrainConfig

    options = dict(epochs=2, batch_size=8, seed=3, optimizer="adam", lr=0.01, word_dim=8,
                   model={"hidden": 8, "char_filters": 6, "char_dim": 6})
    options.update(overrides)
    return TrainConfig(**options)
