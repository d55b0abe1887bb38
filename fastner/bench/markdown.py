"""Markdown tables from a `fastner bench --json` result, for the README's results section.

    python -m fastner.bench.markdown RESULT.json > results.md
"""
from __future__ import annotations

import json
import sys
from typing import Dict, List, Optional, Sequence

RNN_IMPLS = ("torch.padded", "torch.packed", "fastner.padded", "fastner.lengths", "fastner.packed")


def _ms(result: Optional[Dict]) -> str:
    if result is None:
        return "–"
    value = result["median_ms"]
    return f"{value * 1e3:.0f} µs" if value < 1 else f"{value:.2f} ms"


def _ratio(result: Optional[Dict], base: str) -> str:
    if result is None or base not in result.get("speedup", {}):
        return "–"
    return f"{result['speedup'][base]:.1f}x"


def _find(row: Dict, impl: str) -> Optional[Dict]:
    return next((r for r in row["results"] if r["impl"] == impl), None)


def _table(header: Sequence[str], lines: List[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return out


def render(result: Dict) -> str:
    out: List[str] = []
    names = {d["device"]: d["name"] for d in result.get("devices", [])}
    commit = (result.get("git_commit") or "unknown")[:12]
    out.append(f"fastner {result['fastner_version']}, torch {result['torch_version']}, "
               f"{result['threads']} threads, commit {commit}"
               + (" (quick run)" if result.get("quick") else "") + ". Medians per call; "
               "speedup = baseline time / fastner time.")
    rows = [r for r in result["rows"] if "error" not in r]
    for device in sorted({r["device"] for r in rows}):
        here = [r for r in rows if r["device"] == device]
        out += ["", f"### {names.get(device, device)} ({device})"]
        gemm = [r for r in here if r["group"] == "gemm"]
        if gemm:
            shape = gemm[0]["shape"]
            out += ["", f"GEMM rate (torch.mm fp32, {shape['M']}³): "
                        f"{gemm[0]['gflops_per_s']:.0f} GFLOP/s."]
        crf = [r for r in here if r["group"] == "crf"]
        if crf:
            lines = []
            for row in crf:
                s = row["shape"]
                fast = _find(row, "fastner")
                lines.append((row["op"], s["B"], s["T"], s["K"], _ms(fast), _ms(_find(row, "pytorch-crf")),
                              _ms(_find(row, "reference")), _ratio(fast, "pytorch-crf"),
                              _ratio(fast, "reference")))
            out += [""] + _table(("CRF", "B", "T", "K", "fastner", "pytorch-crf", "reference",
                                  "vs pytorch-crf", "vs reference"), lines)
        rnn = [r for r in here if r["group"] == "rnn" and
               set(RNN_IMPLS) <= {x["impl"] for x in r["results"]}]
        if rnn:
            lines = []
            for row in rnn:
                s = row["shape"]
                lengths, padded = _find(row, "fastner.lengths"), _find(row, "fastner.padded")
                floor = f"{row['floor_ms']:.2f} ms" if "floor_ms" in row else "–"
                lines.append((f"{row['cell']} {row['mode']}", f"{s['B']}×{s['T']}×{s['input']}→{s['H']}",
                              *(_ms(_find(row, impl)) for impl in RNN_IMPLS),
                              _ratio(lengths, "torch.packed"), _ratio(lengths, "torch.padded"),
                              _ratio(padded, "torch.padded"), floor))
            out += [""] + _table(("RNN (bidirectional)", "B×T×I→H", *RNN_IMPLS,
                                  "lengths vs packed", "lengths vs padded", "padded vs padded",
                                  "GEMM floor"), lines)
        tagger = [r for r in here if r["group"] == "tagger"]
        if tagger:
            lines = []
            for row in tagger:
                s = row["shape"]
                fast, base = _find(row, "fastner"), _find(row, "torch+pytorch-crf")
                lines.append((row["op"].replace("tagger_", ""), s["batching"], s["batch_size"],
                              f"{fast['sentences_per_s']:.0f}", f"{base['sentences_per_s']:.0f}",
                              _ratio(fast, "torch+pytorch-crf")))
            out += [""] + _table(("whole tagger", "batches", "batch size", "fastner sent/s",
                                  "nn.LSTM + pytorch-crf sent/s", "speedup"), lines)
    skipped = [g for g in result.get("groups", []) if g["status"] != "ok"]
    if skipped:
        out += [""] + [f"- {g['device']} {g['group']}: {g['status']}: {g.get('skipped') or g.get('error')}"
                       for g in skipped]
    return "\n".join(out) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m fastner.bench.markdown RESULT.json", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as handle:
        sys.stdout.write(render(json.load(handle)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
