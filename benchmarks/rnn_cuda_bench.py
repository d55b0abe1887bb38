"""fastner's CUDA LSTM / GRU layers against cuDNN (torch.nn on the GPU), timed with CUDA events.

    python -m benchmarks.rnn_cuda_bench benchmarks/results/rnn_cuda_<gpu>.json

Rows: mode (lstm, gru) x batch (the tagger's 32, and 1, 8, 64, 256) x lengths (padded: every
sequence T long; variable: fastner.bench.workloads.conll_like_lengths, about two thirds padding) x phase (inference under
no_grad; training = forward + backward) x dtype, for one bidirectional layer of the tagger's
shape (T=40, input 130, hidden 200). Methods:
  cudnn_padded   torch.nn.LSTM/GRU on the padded batch (what most taggers run; on variable
                 lengths it also computes the padding, and its reverse direction is then wrong)
  cudnn_packed   pack_padded_sequence -> torch.nn -> pad_packed_sequence (the correct baseline
                 for variable lengths; cuDNN's packed path)
  fastner        torch.ops.fastner.rnn_layer_forward (+ its backward) with lengths on the CPU (no
                 device sync), default path selection
  fastner_persistent / fastner_stepwise   the same with the path (forward and backward) forced (where the
                 persistent grid does not fit the GPU the op silently runs step-wise, so a
                 fastner_persistent time equal to fastner_stepwise's means it did not run)
Timing is fastner.bench.timing's, as in `fastner bench --device cuda`: warm-up, then `repeats`
interleaved rounds (drift hits all methods alike), each sample one call between two CUDA events
with the queue drained first; the median per call is reported, with its ratio to cudnn_padded
and cudnn_packed of the same row.
float32 runs with TF32 off for both sides unless --tf32 (then on for both).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastner.bench.timing import CudaEventClock, Settings, measure_interleaved
from fastner.bench.workloads import conll_like_lengths, full_lengths

SHAPE = dict(T=40, I=130, H=200)
BATCHES = (32, 1, 8, 64, 256)
PATH_ENV = "FASTNER_RNN_CUDA_PATH"  # read by the op at every call (csrc/cuda/rnn.cu)


def build_methods(mode, batch, lengths, dtype, training, paths):
    T, I, H = SHAPE["T"], SHAPE["I"], SHAPE["H"]
    cls = torch.nn.LSTM if mode == "lstm" else torch.nn.GRU
    module = cls(I, H, batch_first=True, bidirectional=True).to(device="cuda", dtype=dtype)
    module.requires_grad_(training)
    x = torch.randn(batch, T, I, device="cuda", dtype=dtype, requires_grad=training)
    cot = torch.randn(batch, T, 2 * H, device="cuda", dtype=dtype)
    lengths_cpu = lengths.cpu()
    weights = [w.detach().clone().requires_grad_(training) for w in module._flat_weights]

    def run(forward):
        def call():
            if training:
                out = forward()
                torch.autograd.backward(out, cot)
            else:
                with torch.no_grad():
                    forward()

        return call

    def cudnn_padded():
        return module(x)[0]

    def cudnn_packed():
        packed = pack_padded_sequence(x, lengths_cpu, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(module(packed)[0], batch_first=True, total_length=T)
        return out

    def fastner_op():
        return torch.ops.fastner.rnn_layer_forward(
            x, lengths_cpu, weights, None, None, mode, True, True, training
        )[0]

    # name -> (forward path the fastner op is forced to, callable); "auto" for the rest.
    methods = {
        "cudnn_padded": ("auto", run(cudnn_padded)),
        "cudnn_packed": ("auto", run(cudnn_packed)),
        "fastner": ("auto", run(fastner_op)),
    }
    for path in paths:
        methods[f"fastner_{path}"] = (path, run(fastner_op))
    return methods


def measure(methods, repeats, warmup):
    """{name: median ms per call}; each call runs with its method's forced path."""

    def on_path(path, fn):
        def call():
            os.environ[PATH_ENV] = path
            return fn()
        return call

    settings = Settings(warmup=warmup, min_samples=repeats, max_samples=repeats, budget_s=0.0,
                        min_sample_s=0.0)
    try:
        calls = {name: on_path(path, fn) for name, (path, fn) in methods.items()}
        stats = measure_interleaved(calls, CudaEventClock(torch.device("cuda")), settings)
    finally:
        os.environ.pop(PATH_ENV, None)
    return {name: stat.median * 1e3 for name, stat in stats.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="path of the JSON results file")
    parser.add_argument("--modes", default="lstm,gru")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--repeats", type=int, default=50, help="samples (one call each) per method")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in cuDNN and cuBLAS (default: off for both)")
    parser.add_argument("--paths", default="persistent,stepwise", help="forced forward paths to time as well")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        sys.exit("rnn_cuda_bench: needs a CUDA GPU")
    import fastner.ops  # noqa: F401  (autograd formulas of the fastner ops)
    from fastner._extension import has_kernel

    if not has_kernel("rnn_layer_forward", "cuda"):
        sys.exit("rnn_cuda_bench: this fastner build has no CUDA kernel for rnn_layer_forward")
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = False
    paths = [p for p in args.paths.split(",") if p]
    rows = []
    started = time.time()
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for mode in args.modes.split(","):
            for batch in map(int, args.batches.split(",")):
                for form in ("padded", "variable"):
                    T = SHAPE["T"]
                    make_lengths = full_lengths if form == "padded" else conll_like_lengths
                    lengths = make_lengths(batch, T, seed=args.seed + batch)
                    for phase in ("inference", "training"):
                        torch.manual_seed(args.seed)
                        methods = build_methods(mode, batch, lengths, dtype, phase == "training", paths)
                        times = measure(methods, args.repeats, args.warmup)
                        row = dict(
                            mode=mode, batch=batch, form=form, phase=phase, dtype=dtype_name, **SHAPE,
                            bidirectional=True, padding=1.0 - float(lengths.sum()) / (batch * T),
                            ms=times,
                            speedup_vs_cudnn_padded={k: times["cudnn_padded"] / v for k, v in times.items()},
                            speedup_vs_cudnn_packed={k: times["cudnn_packed"] / v for k, v in times.items()},
                        )
                        rows.append(row)
                        print(
                            f"{dtype_name:8s} {mode:4s} B={batch:<4d} {form:8s} {phase:9s} "
                            + " ".join(f"{k}={v:.3f}ms" for k, v in times.items()),
                            flush=True,
                        )
    result = dict(
        device=torch.cuda.get_device_name(),
        capability=".".join(map(str, torch.cuda.get_device_capability())),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
        tf32=args.tf32,
        python=platform.python_version(),
        repeats=args.repeats,
        seconds=time.time() - started,
        rows=rows,
    )
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.output} ({len(rows)} rows, {result['device']})")


if __name__ == "__main__":
    main()
