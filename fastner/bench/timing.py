"""Timing: clocks for CPU and CUDA, interleaved measurement, and robust summary statistics.

Every implementation in one comparison is timed in the same process, in rounds (A B C, A B C,
...) after a warm-up, so that load from other processes and frequency changes hit all of them
alike; the median per call is what gets compared, with the quartiles and the extremes kept as
the spread.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

Call = Callable[[], object]


@dataclass(frozen=True)
class Stats:
    """Seconds per call over the samples of one implementation."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    samples: int
    calls_per_sample: int = 1

    def as_dict(self) -> Dict[str, float]:
        ms = 1e3
        return {
            "median_ms": self.median * ms,
            "q1_ms": self.q1 * ms,
            "q3_ms": self.q3 * ms,
            "min_ms": self.min * ms,
            "max_ms": self.max * ms,
            "samples": self.samples,
            "calls_per_sample": self.calls_per_sample,
        }


def _quantile(ordered: Sequence[float], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default), on an already sorted list.
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples: Sequence[float], calls_per_sample: int = 1) -> Stats:
    """Median, quartiles and extremes of `samples` (seconds per call)."""
    if not samples:
        raise ValueError("summarize: samples is empty; at least one timing is needed")
    ordered = sorted(samples)
    return Stats(
        median=_quantile(ordered, 0.5),
        q1=_quantile(ordered, 0.25),
        q3=_quantile(ordered, 0.75),
        min=ordered[0],
        max=ordered[-1],
        samples=len(ordered),
        calls_per_sample=calls_per_sample,
    )


class WallClock:
    """Host wall time around `number` calls (CPU work is synchronous)."""

    name = "perf_counter"

    def time(self, fn: Call, number: int = 1) -> float:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return time.perf_counter() - start


class CudaEventClock:
    """CUDA events around `number` calls on the current stream, queue drained before and after.

    Draining the queue first makes the start event fire as soon as it is recorded, so the
    elapsed time covers the host-side launch work too (what a user waits for), not only the
    kernels.
    """

    name = "cuda_events"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def time(self, fn: Call, number: int = 1) -> float:
        torch.cuda.synchronize(self.device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds


class ThreadCpuClock:
    """CPU time of the calling thread around `number` calls: time spent runnable but waiting
    for a core does not count, so one-thread runs on a loaded machine stay comparable (threads
    that torch starts are not counted: use it with torch.set_num_threads(1))."""

    name = "thread_time"

    def time(self, fn: Call, number: int = 1) -> float:
        start = time.thread_time()
        for _ in range(number):
            fn()
        return time.thread_time() - start


def clock_for(device: torch.device, thread_cpu: bool = False):
    """CUDA events on a GPU; on the CPU wall time, or the thread's CPU time when asked
    (`fastner bench --clock thread`, one torch thread only: see ThreadCpuClock)."""
    if device.type == "cuda":
        return CudaEventClock(device)
    return ThreadCpuClock() if thread_cpu else WallClock()


@dataclass(frozen=True)
class Settings:
    """How long to measure. `budget_s` is the measured time per implementation to aim for."""

    warmup: int = 2
    min_samples: int = 5
    max_samples: int = 50
    budget_s: float = 0.5
    # Calls shorter than this are repeated inside one sample (CPU), so that each sample
    # measures a call's steady cost. In interleaved rounds the first call after another
    # implementation runs cold (its code and data evicted): the CRF NLL step at B=32 took
    # 300-470 us there against ~140 us warm (Zen 4, 1 thread). With 1 ms samples that first call
    # was one of ~5 in a sample of the fast implementation but the whole sample of one that
    # takes over 1 ms, a bias against short calls: the step's median read 172-182 us (IQR
    # 166-209) against 137-145 us (IQR 133-148) with 10 ms, pytorch-crf's 8.1-8.4 ms either way.
    min_sample_s: float = 1e-2
    # CPU rows timed by the calling thread's CPU time instead of wall time (clock_for).
    thread_cpu_clock: bool = False


def measure_interleaved(calls: Mapping[str, Call], clock, settings: Settings,
                        order_log: Optional[List[str]] = None) -> Dict[str, Stats]:
    """Time every call in `calls` in interleaved rounds; returns Stats per name.

    Each implementation is warmed up (its last warm-up call sizes how many calls make one
    sample), then rounds run every implementation once, in a rotating order, until each has
    `min_samples` and either `max_samples` or `budget_s` of measured time per implementation.
    """
    if not calls:
        raise ValueError("measure_interleaved: calls is empty")
    names = list(calls)
    number: Dict[str, int] = {}
    for name in names:
        # Single warm-up calls; the last one sizes a sample. (Sizing from the very first call,
        # which pays lazy initialisation, made every sample of a fast call a single call, each
        # one cold after the other implementations ran: 2-3x its steady time.)
        last = 0.0
        for _ in range(max(1, settings.warmup)):
            last = clock.time(calls[name])
        number[name] = max(1, min(1000, math.ceil(settings.min_sample_s / max(last, 1e-9))))

    samples: Dict[str, List[float]] = {name: [] for name in names}
    spent = 0.0
    round_index = 0
    while True:
        # Rotating the start of each round keeps any "first after the other one" effect from
        # always falling on the same implementation.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if order_log is not None:
                order_log.append(name)
            elapsed = clock.time(calls[name], number[name])
            samples[name].append(elapsed / number[name])
            spent += elapsed
        round_index += 1
        if round_index < settings.min_samples:
            continue
        if round_index >= settings.max_samples or spent >= settings.budget_s * len(names):
            break
    return {name: summarize(samples[name], number[name]) for name in names}
