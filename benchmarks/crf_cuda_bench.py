"""CRF on CUDA: fastner's fused kernels against pytorch-crf (torchcrf.CRF) on the same GPU.

Usage: python -m benchmarks.crf_cuda_bench OUT.json [--repeats N] [--batches 1,32,512] [--ragged]

Rows (T=40, K=17, float32, every sequence full length unless --ragged):
  nll_fwd_bwd    -crf(emissions, tags, mask).sum() forward + backward (emissions and params)
  decode         best paths; pytorch-crf's decode returns Python lists (a host sync per token),
                 fastner's viterbi() returns tensors (one kernel); both end synchronised
  decode_lists   fastner's decode() (same output type as pytorch-crf's: lists)
  raw_viterbi    torch.ops.fastner.crf_viterbi alone (the kernel plus its launch)

Inputs come from fastner.bench.workloads.crf_batch (lengths 'full', or 'uniform' with --ragged)
and the timing from fastner.bench.timing, as in `fastner bench --device cuda`: implementations
interleaved, each sample one call between CUDA events with the queue drained before it, so
host-side work counts as it does for a user; medians over --repeats samples. Writes JSON with
the device name, versions and the ratios; prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import fastner
import fastner.nn
from fastner.bench.timing import CudaEventClock, Settings, measure_interleaved
from fastner.bench.workloads import crf_batch

T_STEPS = 40
NUM_TAGS = 17


def interleaved(fns, repeats, warmup=5):
    """{name: median ms}: the functions in interleaved rounds, one call per sample."""
    settings = Settings(warmup=warmup, min_samples=repeats, max_samples=repeats, budget_s=0.0,
                        min_sample_s=0.0)
    stats = measure_interleaved(fns, CudaEventClock(torch.device("cuda")), settings)
    return {name: stat.median * 1e3 for name, stat in stats.items()}


def make_models(device):
    from fastner.bench.baselines import torch_baseline

    ours = fastner.nn.CRF(NUM_TAGS, batch_first=True)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.5)
    ours = ours.to(device)
    return ours, torch_baseline(ours)[0]


def bench_batch(batch, repeats, ragged, device):
    ours, theirs = make_models(device)
    inputs = crf_batch(batch, T_STEPS, NUM_TAGS, seed=batch, lengths="uniform" if ragged else "full",
                       device=device)
    emissions, tags, mask, lengths = inputs.emissions, inputs.tags, inputs.mask, inputs.lengths
    em_ours = emissions.clone().requires_grad_(True)
    em_theirs = emissions.clone().requires_grad_(True)

    def nll(crf, em):
        def run():
            crf.zero_grad(set_to_none=True)
            em.grad = None
            loss = -crf(em, tags, mask=mask, reduction="sum")
            loss.backward()
        return run

    # Sanity: same loss and decode before timing.
    with torch.no_grad():
        a = ours(emissions, tags, mask=mask)
        b = theirs(emissions, tags, mask=mask)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    assert ours.decode(emissions, mask=mask) == theirs.decode(emissions, mask=mask)

    scores = ours._scores(emissions)
    rows = {}
    rows["nll_fwd_bwd"] = interleaved({"fastner": nll(ours, em_ours), "pytorch_crf": nll(theirs, em_theirs)}, repeats)
    rows["decode"] = interleaved({
        "fastner": lambda: ours.viterbi(emissions, mask=mask),
        "pytorch_crf": lambda: theirs.decode(emissions, mask=mask),
    }, repeats)
    rows["decode_lists"] = interleaved({
        "fastner": lambda: ours.decode(emissions, mask=mask),
        "pytorch_crf": lambda: theirs.decode(emissions, mask=mask),
    }, repeats)
    rows["raw_viterbi"] = interleaved({
        "fastner": lambda: torch.ops.fastner.crf_viterbi(emissions, lengths, *scores),
    }, repeats)
    for row in rows.values():
        if "pytorch_crf" in row:
            row["speedup"] = row["pytorch_crf"] / row["fastner"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batches", default="1,32,512")
    parser.add_argument("--ragged", action="store_true", help="random lengths in [1, T] instead of all T")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("CUDA is not available")
    device = torch.device("cuda")
    backend = fastner.backend()
    if backend.get("cuda") != "fused":
        print(f"warning: fastner's CUDA backend is {backend.get('cuda')!r}, not the fused kernels", file=sys.stderr)
    results = {
        "what": "fastner CRF vs pytorch-crf on CUDA, T=%d K=%d float32" % (T_STEPS, NUM_TAGS),
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "fastner_backend": backend,
        "repeats": args.repeats,
        "ragged": args.ragged,
        "unit": "ms (median, one call per sample between CUDA events, queue drained first)",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "batches": {},
    }
    for batch in (int(b) for b in args.batches.split(",")):
        rows = bench_batch(batch, args.repeats, args.ragged, device)
        results["batches"][str(batch)] = rows
        for name, row in rows.items():
            parts = "  ".join(f"{k}={v:.4f}" for k, v in row.items())
            print(f"B={batch:<5d} {name:<13s} {parts}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
