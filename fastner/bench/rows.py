"""What every group of rows shares: the run context, the row record and the skip signal."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import torch

from fastner.bench.timing import Settings, Stats, clock_for, measure_interleaved
from fastner.bench.workloads import Plan

BACKEND_ENV = "FASTNER_BACKEND"


class GroupSkipped(Exception):
    """A whole group cannot run here (its API is not importable yet, no baseline, ...)."""


@dataclass
class ImplResult:
    impl: str
    role: str  # "fastner" (measured against the baselines) or "baseline"
    stats: Stats
    speedup: Dict[str, float] = field(default_factory=dict)  # baseline median / this median
    extra: Dict[str, float] = field(default_factory=dict)  # e.g. sentences_per_s, x_floor

    def as_dict(self) -> Dict[str, object]:
        out: Dict[str, object] = {"impl": self.impl, "role": self.role}
        out.update(self.stats.as_dict())
        out["speedup"] = dict(self.speedup)
        out.update(self.extra)
        return out


@dataclass
class Row:
    """One comparison: the same work (op and shape) done by several implementations."""

    device: str
    group: str
    op: str
    shape: Dict[str, object]
    results: List[ImplResult] = field(default_factory=list)
    sweeps: List[str] = field(default_factory=list)  # the sweep axes ("B", "T", "H") it is on
    check: str = "n/a"  # whether the implementations agreed on this input
    info: Dict[str, object] = field(default_factory=dict)  # flops, floor_ms, units...
    error: Optional[str] = None
    # Stats of calls timed in the same rounds as the results but not implementations of the row
    # (a rate its ratios are taken against: Context.compare's `alongside`); not in the JSON.
    alongside: Dict[str, Stats] = field(default_factory=dict)

    def result(self, impl: str) -> Optional[ImplResult]:
        return next((r for r in self.results if r.impl == impl), None)

    def as_dict(self) -> Dict[str, object]:
        out: Dict[str, object] = {
            "device": self.device, "group": self.group, "op": self.op, "shape": self.shape,
            "sweeps": list(self.sweeps), "check": self.check,
            "results": [r.as_dict() for r in self.results],
        }
        out.update(self.info)
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass
class Context:
    device: torch.device
    plan: Plan
    settings: Settings
    emit: Callable[[Row], None]  # called with each row as soon as it is measured
    notes: List[str] = field(default_factory=list)
    gemm_flops_per_s: Optional[float] = None  # set by the gemm group, read by the rnn group

    def __post_init__(self) -> None:
        self.clock = clock_for(self.device, self.settings.thread_cpu_clock)
        if self.device.type == "cuda":
            # One call per sample, synchronized: the latency a caller sees. Back-to-back calls
            # in one sample would hide each call's launch work behind the previous kernels.
            self.settings = dataclasses.replace(self.settings, min_sample_s=0.0)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def compare(self, row: Row, calls: Mapping[str, Callable[[], object]],
                baselines: Sequence[str], settings: Optional[Settings] = None,
                alongside: Optional[Mapping[str, Callable[[], object]]] = None) -> Row:
        """Time `calls` interleaved; every non-baseline gets its speedup over each baseline.
        `alongside`: more calls timed in the same rounds that are not implementations of the
        row, such as the GEMM whose rate gives the row's floor: their Stats go to
        row.alongside, not to its results, so that the floor and the times it divides come
        from the same minutes of a host whose speed drifts."""
        stats = measure_interleaved({**calls, **(alongside or {})}, self.clock, settings or self.settings)
        for name in alongside or {}:
            row.alongside[name] = stats.pop(name)
        for name, stat in stats.items():
            role = "baseline" if name in baselines else "fastner"
            result = ImplResult(name, role, stat)
            if role == "fastner":
                for base in baselines:
                    if base in stats:
                        result.speedup[base] = stats[base].median / stat.median
            row.results.append(result)
        return row


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether two fp32 results agree as well as two correct implementations can.

    On CUDA, cuDNN's recurrent layers and convolutions may use TF32 (torch's default,
    torch.backends.cudnn.allow_tf32), about 1e-3 relative; on CPU everything is fp32.
    """
    tolerance = 2e-3 if got.device.type == "cuda" else 1e-4
    return torch.allclose(got, want, rtol=tolerance, atol=tolerance)


@contextlib.contextmanager
def forced_reference() -> Iterator[None]:
    """FASTNER_BACKEND=reference for the duration (fastner reads it at every call)."""
    previous = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = "reference"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[BACKEND_ENV]
        else:
            os.environ[BACKEND_ENV] = previous


def on_reference(fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        with forced_reference():
            return fn()
    return call


def describe_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()

