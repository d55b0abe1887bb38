"""CRF on CUDA: fastner's fused kernels against pytorch-crf (torchcrf.CRF) on the same GPU.

Usage: python benchmarks/crf_cuda_bench.py OUT.json [--repeats N] [--batches 1,32,512]

Rows (T=40, K=17, float32, every sequence full length unless --ragged):
  nll_fwd_bwd    -crf(emissions, tags, mask).sum() forward + backward (emissions and params)
  decode         best paths; pytorch-crf's decode returns Python lists (a host sync per token),
                 fastner's viterbi() returns tensors (one kernel); both end synchronised
  decode_lists   fastner's decode() (same output type as pytorch-crf's: lists)
  raw_viterbi    torch.ops.fastner.crf_viterbi alone (the kernel plus its launch)

Each timing is the median over --repeats runs of CUDA-event time around one call (after
warm-up), with a torch.cuda.synchronize() after each run so that host-side work is included
(the end-to-end figure a user sees). The two implementations are interleaved run by run, so
load on the machine affects both alike. Writes JSON with the device name, versions and the
ratios; prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastner  # noqa: E402
import fastner.nn  # noqa: E402

T_STEPS = 40
NUM_TAGS = 17


def time_call(fn, repeats):
    """Median milliseconds of fn() measured by CUDA events, synchronising after each run."""
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def interleaved(fns, repeats, warmup=5):
    """{name: median ms}, running the functions alternately."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(time_call(fn, 1))
    return {name: statistics.median(values) for name, values in samples.items()}


def make_models(device):
    import torchcrf

    ours = fastner.nn.CRF(NUM_TAGS, batch_first=True)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.5)
    theirs = torchcrf.CRF(NUM_TAGS, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    return ours.to(device), theirs.to(device)


def bench_batch(batch, repeats, ragged, device):
    ours, theirs = make_models(device)
    gen = torch.Generator().manual_seed(batch)
    emissions = torch.randn(batch, T_STEPS, NUM_TAGS, generator=gen).to(device)
    tags = torch.randint(0, NUM_TAGS, (batch, T_STEPS), generator=gen).to(device)
    if ragged:
        lengths = torch.randint(1, T_STEPS + 1, (batch,), generator=gen)
        lengths[0] = T_STEPS
    else:
        lengths = torch.full((batch,), T_STEPS)
    mask = (torch.arange(T_STEPS) < lengths.unsqueeze(1)).to(device)
    lengths = lengths.to(device)
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
        "unit": "ms (median, CUDA events, synchronised after each call)",
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
