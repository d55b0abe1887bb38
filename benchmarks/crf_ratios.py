"""Print a markdown table of CRF timings: fastner vs pytorch-crf (and fastner's reference path).

    python benchmarks/crf_ratios.py                 # the README table
    python benchmarks/crf_ratios.py --shapes 32x40x17 1x40x17 --repeats 31

The implementations are timed interleaved in one process (one sample of each in turn, then the
next round), so load from other processes hits all of them alike; each cell is the median of
the rounds. fp32, time-first inputs (both modules' default), random lengths in [1, T] with one
full-length sequence, parameters loaded from one pytorch-crf state_dict.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torchcrf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastner  # noqa: E402
import fastner.nn  # noqa: E402

DEFAULT_SHAPES = [(b, t, k) for b in (1, 32, 256) for t in (40, 128) for k in (9, 17)]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_inputs(batch, steps, num_tags):
    gen = torch.Generator().manual_seed(1000 * batch + steps + num_tags)
    emissions = torch.randn(steps, batch, num_tags, generator=gen)
    tags = torch.randint(0, num_tags, (steps, batch), generator=gen)
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
    lengths[0] = steps
    mask = (torch.arange(steps).unsqueeze(1) < lengths.unsqueeze(0)).contiguous()
    return emissions, tags, mask


class Impl:
    def __init__(self, name, crf, backend=None):
        self.name, self.crf, self.backend = name, crf, backend

    def run(self, fn, iters):
        old = os.environ.get("FASTNER_BACKEND")
        if self.backend:
            os.environ["FASTNER_BACKEND"] = self.backend
        try:
            start = time.perf_counter()
            for _ in range(iters):
                fn(self.crf)
            return (time.perf_counter() - start) / iters
        finally:
            if self.backend:
                if old is None:
                    del os.environ["FASTNER_BACKEND"]
                else:
                    os.environ["FASTNER_BACKEND"] = old


def tasks(emissions, tags, mask):
    em = emissions.clone().requires_grad_(True)

    def nll(crf):
        em.grad = None
        crf.zero_grad(set_to_none=True)
        (-crf(em, tags, mask=mask)).backward()

    def decode(crf):
        with torch.no_grad():
            crf.decode(emissions, mask=mask)

    return {"NLL fwd+bwd": nll, "decode": decode}


def measure(impls, fn, repeats, min_sample_s):
    # inner iterations per sample so that one sample lasts about min_sample_s, per implementation
    iters = {}
    for impl in impls:
        impl.run(fn, 1)  # warm-up
        one = impl.run(fn, 1)
        iters[impl.name] = max(1, int(min_sample_s / max(one, 1e-7)))
    samples = {impl.name: [] for impl in impls}
    for _ in range(repeats):
        for impl in impls:
            samples[impl.name].append(impl.run(fn, iters[impl.name]))
    return {name: statistics.median(v) for name, v in samples.items()}


def parse_shape(text):
    b, t, k = (int(x) for x in text.lower().split("x"))
    return b, t, k


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", type=parse_shape, default=DEFAULT_SHAPES, help="BxTxK, e.g. 32x40x17")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds; each cell is their median")
    parser.add_argument("--min-sample-ms", type=float, default=5.0, help="target duration of one sample")
    parser.add_argument("--no-reference", action="store_true", help="skip fastner's reference path (slow)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(f"CPU: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, fastner backend {fastner.backend()['cpu']}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"command: python benchmarks/crf_ratios.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    cols = ["task", "B", "T", "K", "pytorch-crf (ms)", "fastner (ms)", "speed-up"]
    if not args.no_reference:
        cols += ["reference (ms)", "fastner vs reference"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" if i < 4 else "---:" for i in range(len(cols))) + "|")
    for batch, steps, num_tags in args.shapes:
        torch.manual_seed(0)
        theirs = torchcrf.CRF(num_tags)
        ours = fastner.nn.CRF(num_tags)
        ours.load_state_dict(theirs.state_dict())
        impls = [Impl("pytorch-crf", theirs), Impl("fastner", ours)]
        if not args.no_reference:
            impls.append(Impl("reference", ours, backend="reference"))
        for task, fn in tasks(*make_inputs(batch, steps, num_tags)).items():
            med = measure(impls, fn, args.repeats, args.min_sample_ms / 1000)
            row = [task, str(batch), str(steps), str(num_tags), f"{med['pytorch-crf'] * 1e3:.3f}", f"{med['fastner'] * 1e3:.3f}", f"{med['pytorch-crf'] / med['fastner']:.0f}x"]
            if not args.no_reference:
                row += [f"{med['reference'] * 1e3:.3f}", f"{med['reference'] / med['fastner']:.0f}x"]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
