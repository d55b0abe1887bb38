"""Where one CRF training step's time goes: fastner.nn.CRF vs pytorch-crf, and the parts of
fastner's step (the kernel alone, the module's forward, the autograd floor).

    python -m benchmarks.crf_step_breakdown [--batches 1,32,256] [--threads 1]

A step is what `fastner bench` times as nll_fwd_bwd: llh = crf(emissions, tags, mask,
reduction='sum'), then torch.autograd.grad(-llh, [emissions, *parameters]); same inputs
(fastner.bench.workloads.crf_batch, T=40, K=17, batch-first). With one thread (the default) the
clock is the thread's CPU time (fastner.bench.timing.ThreadCpuClock), which machine load
inflates far less than wall time; otherwise wall time. Rows, per batch size:
  pytorch-crf step / fastner step   the whole step, and their ratio
  fastner forward only              the module call, no backward
  kernel crf_forward_backward       the fused kernel alone (what the step computes)
  autograd floor                    a do-nothing autograd.Function + torch.autograd.grad
"""
from __future__ import annotations

import argparse
import os

import torch

from fastner.bench.environment import cpu_model
from fastner.bench.timing import Settings, ThreadCpuClock, WallClock, measure_interleaved
from fastner.bench.workloads import crf_batch

SETTINGS = Settings(warmup=5, min_samples=20, max_samples=40, budget_s=0.3, min_sample_s=5e-3)


class _Nothing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return None


def calls(batch: int):
    import torchcrf

    import fastner.nn

    inputs = crf_batch(batch, 40, 17, seed=1000 + batch)
    fast = fastner.nn.CRF(17, batch_first=True)
    base = torchcrf.CRF(17, batch_first=True)
    fast.load_state_dict(base.state_dict())
    leaf = inputs.emissions.clone().requires_grad_(True)

    def step(module):
        return lambda: torch.autograd.grad(-module(leaf, inputs.tags, inputs.mask, reduction="sum"),
                                           [leaf, *module.parameters()])

    params = [p.detach() for p in (fast.transitions, fast.start_transitions, fast.end_transitions)]
    return {
        "pytorch-crf step": step(base),
        "fastner step": step(fast),
        "fastner forward only": lambda: fast(leaf, inputs.tags, inputs.mask, reduction="sum"),
        "kernel crf_forward_backward": lambda: torch.ops.fastner.crf_forward_backward(
            inputs.emissions, inputs.tags, inputs.lengths, *params),
        "autograd floor": lambda: torch.autograd.grad(_Nothing.apply(leaf), [leaf],
                                                      allow_unused=True),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = ThreadCpuClock() if args.threads == 1 else WallClock()
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} thread(s), clock {clock.name}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    for batch in (int(b) for b in args.batches.split(",")):
        stats = measure_interleaved(calls(batch), clock, SETTINGS)
        ratio = stats["pytorch-crf step"].median / stats["fastner step"].median
        print(f"B={batch} T=40 K=17: pytorch-crf / fastner step = {ratio:.1f}x")
        for name, stat in stats.items():
            print(f"    {name:30s} {stat.median * 1e6:10.1f} us  (IQR {stat.q1 * 1e6:.1f}..{stat.q3 * 1e6:.1f})")


if __name__ == "__main__":
    main()
