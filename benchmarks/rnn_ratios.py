"""fastner.nn.LSTM / GRU / RNN against torch.nn: speed ratios and distance to the GEMM floor.

    python benchmarks/rnn_ratios.py            # full run (tagger shape + B x H sweep)
    python benchmarks/rnn_ratios.py --quick    # fewer repeats, a smaller sweep

Prints markdown tables. Every time is the median over interleaved repeats inside this one
process (variant A, B, C, A, B, C, ...), so machine load drifting during the run hits all
variants alike; compare ratios, not absolute times, between runs.

Input forms: torch padded = nn.X on the padded tensor (computes over padding); torch packed =
nn.X on a ready PackedSequence (enforce_sorted=False); fastner padded / packed the same with
fastner.nn.X; fastner lengths= = fastner.nn.X(padded, lengths=lengths). Inference runs under
torch.inference_mode in eval(); training is forward + backward to the input and every parameter.

The GEMM floor: the multiply-adds of the useful (non-padded) work, 2*(I+H)*G*H per token and
direction (G = 4 LSTM, 3 GRU, 1 RNN), times 3 for training (forward, input/state gradients,
weight gradients), divided by the rate torch.mm reaches at the tagger's input-projection shape,
timed in the same interleaved rounds as the row. "x of floor" = measured time / that time.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch
from torch.nn.utils.rnn import pack_padded_sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastner  # noqa: E402
import fastner.nn  # noqa: E402
from fastner._extension import use_fused  # noqa: E402

CELLS = ("LSTM", "GRU", "RNN")
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
TAGGER = dict(batch=32, time_len=40, input_size=130, hidden=200, bidirectional=True)
VARIANTS = ("torch padded", "torch packed", "fastner padded", "fastner packed", "fastner lengths=")


# ---------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------


def conll_like_lengths(batch: int, time_len: int, seed: int = 0) -> torch.Tensor:
    """int64 [batch]: sentence lengths shaped like CoNLL-2003 English train (mean 14.5, median
    10, 90% <= 32, max 113), clipped to time_len; the longest is time_len, as in a batch padded
    to its own longest sentence."""
    gen = torch.Generator().manual_seed(seed)
    gamma = torch.distributions.Gamma(torch.tensor(1.2), torch.tensor(1 / 12.0))
    torch.manual_seed(seed)  # Gamma.sample draws from the global RNG
    lengths = gamma.sample((batch,)).round().clamp(1, 113).clamp(max=time_len).long()
    lengths[int(torch.randint(0, batch, (1,), generator=gen))] = time_len
    return lengths


@dataclass
class Workload:
    cell: str
    batch: int
    time_len: int
    input_size: int
    hidden: int
    bidirectional: bool
    lengths: torch.Tensor  # int64 [B]

    @property
    def useful_tokens(self) -> int:
        return int(self.lengths.sum())

    def forward_flops(self, tokens: int) -> float:
        d = 2 if self.bidirectional else 1
        return 2.0 * (self.input_size + self.hidden) * GATES[self.cell] * self.hidden * tokens * d

    def floor_seconds(self, training: bool, gemm_flops_per_s: float) -> float:
        return self.forward_flops(self.useful_tokens) * (3 if training else 1) / gemm_flops_per_s


def make_modules(w: Workload):
    torch_cls = getattr(torch.nn, w.cell)
    fastner_cls = getattr(fastner.nn, w.cell)
    reference = torch_cls(w.input_size, w.hidden, bidirectional=w.bidirectional)
    fused = fastner_cls(w.input_size, w.hidden, bidirectional=w.bidirectional)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def variant_calls(w: Workload, training: bool) -> Dict[str, Callable[[], object]]:
    """One zero-argument callable per variant, each doing one inference or training step."""
    reference, fused = make_modules(w)
    for m in (reference, fused):
        m.train(training)
    x = torch.randn(w.time_len, w.batch, w.input_size, requires_grad=training)
    packed = pack_padded_sequence(x.detach(), w.lengths, enforce_sorted=False)
    # The packed input's own leaf, so every timed step differentiates to its input.
    packed = packed._replace(data=packed.data.requires_grad_(training))

    def run(module, arg, **kwargs):
        if not training:
            def infer():
                with torch.inference_mode():
                    return module(arg, **kwargs)
            return infer

        leaves = [arg.data if hasattr(arg, "batch_sizes") else arg] + list(module.parameters())

        def train():
            out, _ = module(arg, **kwargs)
            data = out.data if hasattr(out, "batch_sizes") else out
            return torch.autograd.grad(data.sum(), leaves)
        return train

    return {
        "torch padded": run(reference, x),
        "torch packed": run(reference, packed),
        "fastner padded": run(fused, x),
        "fastner packed": run(fused, packed),
        "fastner lengths=": run(fused, x, lengths=w.lengths),
    }


def check_agreement(w: Workload) -> None:
    """Never time garbage: fastner lengths= must equal torch on the packed input."""
    from torch.nn.utils.rnn import pad_packed_sequence

    reference, fused = make_modules(w)
    x = torch.randn(w.time_len, w.batch, w.input_size)
    with torch.no_grad():
        expected, _ = reference(pack_padded_sequence(x, w.lengths, enforce_sorted=False))
        expected, _ = pad_packed_sequence(expected, total_length=w.time_len)
        got, _ = fused(x, lengths=w.lengths)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def interleaved_medians(calls: Dict[str, Callable], repeats: int, min_seconds: float = 0.02) -> Dict[str, float]:
    """Median seconds per call of each callable, timed in rounds that visit every callable once.

    Each timing sample runs a callable `inner` times, inner chosen so one sample lasts about
    min_seconds (timer resolution and Python overhead stay small against it)."""
    inner = {}
    for name, fn in calls.items():
        fn()  # warm up: allocations, oneDNN primitive creation, lazy init
        started = time.perf_counter()
        fn()
        once = max(time.perf_counter() - started, 1e-7)
        inner[name] = max(1, min(50, int(min_seconds / once)))
    samples: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            started = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - started) / inner[name])
    return {name: statistics.median(values) for name, values in samples.items()}


# The floor's GEMM: torch.mm at the tagger's input projection ([B*T, I] @ [I, 4H], float32).
GEMM_SHAPE = (TAGGER["batch"] * TAGGER["time_len"], TAGGER["input_size"], 4 * TAGGER["hidden"])


def gemm_call() -> Callable[[], object]:
    m, k, n = GEMM_SHAPE
    a, b = torch.randn(m, k), torch.randn(k, n)
    return lambda: torch.mm(a, b)


def gemm_rate(seconds: float) -> float:
    m, k, n = GEMM_SHAPE
    return 2.0 * m * k * n / seconds


def timed_with_gemm(calls: Dict[str, Callable], repeats: int):
    """Medians of the variants and the GEMM rate measured in the same interleaved rounds, so
    load drifting during the run moves the floor with the times it is compared to."""
    calls = dict(calls, gemm=gemm_call())
    t = interleaved_medians(calls, repeats)
    return t, gemm_rate(t.pop("gemm"))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def machine_line() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"Machine: {model}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, fastner RNN path {'fused' if use_fused('rnn_layer_forward', torch.device('cpu')) else 'reference'}, load average {load} "
        f"(at start), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def ratio(slow: float, fast: float) -> str:
    return f"{slow / fast:.2f}x"


def tagger_table(repeats: int, cells: Sequence[str]) -> List[str]:
    p = TAGGER
    lengths = conll_like_lengths(p["batch"], p["time_len"])
    rows = [
        f"### Tagger shape: bidirectional, B={p['batch']}, T={p['time_len']}, input {p['input_size']}, "
        f"hidden {p['hidden']}; lengths mean {lengths.float().mean():.1f}, max {int(lengths.max())}, "
        f"padding {100 * (1 - lengths.sum().item() / (p['batch'] * p['time_len'])):.0f}%",
        "",
        "| cell | task | torch padded ms | torch packed ms | fastner padded ms | fastner packed ms "
        "| fastner lengths= ms | lengths= vs torch packed | lengths= vs torch padded "
        "| padded vs torch padded | packed vs torch packed | GEMM GFLOP/s | GEMM floor ms | lengths= x of floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        w = Workload(cell, p["batch"], p["time_len"], p["input_size"], p["hidden"], p["bidirectional"], lengths)
        check_agreement(w)
        for training in (False, True):
            t, rate = timed_with_gemm(variant_calls(w, training), repeats)
            floor = w.floor_seconds(training, rate)
            rows.append(
                f"| {cell} | {'training' if training else 'inference'} | {ms(t['torch padded'])} "
                f"| {ms(t['torch packed'])} | {ms(t['fastner padded'])} | {ms(t['fastner packed'])} "
                f"| {ms(t['fastner lengths='])} | {ratio(t['torch packed'], t['fastner lengths='])} "
                f"| {ratio(t['torch padded'], t['fastner lengths='])} "
                f"| {ratio(t['torch padded'], t['fastner padded'])} "
                f"| {ratio(t['torch packed'], t['fastner packed'])} | {rate / 1e9:.0f} | {ms(floor)} "
                f"| {t['fastner lengths='] / floor:.1f} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)  # progress while the run goes on
    return rows


def sweep_table(repeats: int, cells: Sequence[str], batches: Sequence[int], hiddens: Sequence[int]):
    p = TAGGER
    rows = [
        f"### Sweep: bidirectional, T={p['time_len']}, input {p['input_size']}, CoNLL-like lengths",
        "",
        "| cell | task | B | H | torch padded ms | torch packed ms | fastner padded ms | fastner lengths= ms "
        "| lengths= vs torch packed | lengths= vs torch padded | padded vs torch padded "
        "| GEMM GFLOP/s | GEMM floor ms | lengths= x of floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        for batch in batches:
            lengths = conll_like_lengths(batch, p["time_len"], seed=batch)
            for hidden in hiddens:
                w = Workload(cell, batch, p["time_len"], p["input_size"], hidden, p["bidirectional"], lengths)
                for training in (False, True):
                    calls = variant_calls(w, training)
                    del calls["fastner packed"]
                    t, rate = timed_with_gemm(calls, repeats)
                    floor = w.floor_seconds(training, rate)
                    rows.append(
                        f"| {cell} | {'training' if training else 'inference'} | {batch} | {hidden} "
                        f"| {ms(t['torch padded'])} | {ms(t['torch packed'])} | {ms(t['fastner padded'])} "
                        f"| {ms(t['fastner lengths='])} | {ratio(t['torch packed'], t['fastner lengths='])} "
                        f"| {ratio(t['torch padded'], t['fastner lengths='])} "
                        f"| {ratio(t['torch padded'], t['fastner padded'])} | {rate / 1e9:.0f} | {ms(floor)} "
                        f"| {t['fastner lengths='] / floor:.1f} |"
                    )
                    print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller sweep")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds per table cell")
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated: LSTM,GRU,RNN")
    parser.add_argument("--no-sweep", action="store_true", help="only the tagger-shape table")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch.set_num_threads (default: torch's choice); 1 gives steadier ratios on a shared machine",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 15)
    cells = [c.strip().upper() for c in args.cells.split(",") if c.strip()]
    batches, hiddens = ((1, 32, 128), (200,)) if args.quick else ((1, 8, 32, 128), (100, 200, 512))
    sweep_cells = cells[:1] if args.quick else cells

    m, k, n = GEMM_SHAPE
    lines = [
        "## fastner RNN layers vs torch.nn (CPU, float32)",
        "",
        machine_line(),
        "",
        f"Times: medians of {repeats} interleaved rounds. GEMM GFLOP/s: torch.mm float32 [{m}, {k}] @ [{k}, {n}], "
        "timed in the same rounds as the row; the floor is the row's useful FLOPs at that rate.",
        "",
    ]
    print("\n".join(lines), flush=True)
    print("\n".join(tagger_table(repeats, cells)) + "\n", flush=True)
    if not args.no_sweep:
        print("\n".join(sweep_table(repeats, sweep_cells, batches, hiddens)), flush=True)


if __name__ == "__main__":
    main()
