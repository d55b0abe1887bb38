"""PNG plots of speedup against batch size, sequence length and hidden size (matplotlib).

Drawn from the JSON rows, so a saved result can be plotted again:
    python -m fastner.bench.plots RESULT.json OUT_DIR
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

MISSING = ("--plot needs matplotlib, which is not installed: pip install matplotlib "
           "(or the extra: pip install 'fastner[plot]')")

# (fastner implementation, baseline, line style): the comparisons each RNN plot draws.
RNN_PAIRS = (("fastner.lengths", "torch.packed", "-"), ("fastner.lengths", "torch.padded", ":"),
             ("fastner.padded", "torch.padded", "--"))
AXES = (("B", "batch size B", "batch"), ("T", "sequence length T (longest in the batch)", "seqlen"),
        ("H", "hidden size H (per direction)", "hidden"))


def require_matplotlib() -> Optional[str]:
    """None when matplotlib can be imported, else the message to show."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return MISSING
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _speedup(row: Dict, impl: str, base: str) -> Optional[float]:
    for result in row.get("results", []):
        if result["impl"] == impl:
            return result.get("speedup", {}).get(base)
    return None


def _series(rows: Iterable[Dict], key: str, impl: str, base: str) -> Tuple[List, List]:
    points = sorted((row["shape"][key], _speedup(row, impl, base)) for row in rows)
    points = [(x, y) for x, y in points if y is not None]
    return [x for x, _ in points], [y for _, y in points]


def _device_label(device: str) -> str:
    return device.replace(":", "")


def _finish(plt, fig, axes, path: str, title: str) -> str:
    for ax in axes:
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_ylabel("speedup (baseline time / fastner time)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    import io

    from fastner.storage import atomic_write_bytes

    image = io.BytesIO()
    fig.savefig(image, dpi=110, format="png")
    atomic_write_bytes(path, image.getvalue())
    plt.close(fig)
    return path


def rnn_plots(plt, rows: Sequence[Dict], device: str, names: Dict[str, str], directory: str) -> List[str]:
    written = []
    rnn = [r for r in rows if r["group"] == "rnn" and r["device"] == device and "error" not in r]
    colors = {"lstm": "tab:blue", "gru": "tab:orange", "rnn": "tab:green"}
    for axis, label, stem in AXES:
        on_axis = [r for r in rnn if axis in r.get("sweeps", [])]
        # (mode, cell) -> comparisons with at least two points along this axis
        lines: Dict[str, List[Tuple[str, str, str, List, List]]] = {}
        for mode in ("inference", "training"):
            for cell in sorted({r["cell"] for r in on_axis if r["mode"] == mode}):
                subset = [r for r in on_axis if r["mode"] == mode and r["cell"] == cell]
                for impl, base, style in RNN_PAIRS:
                    xs, ys = _series(subset, axis, impl, base)
                    if len(xs) > 1:
                        lines.setdefault(mode, []).append((cell, f"{impl} vs {base}", style, xs, ys))
        if not lines:
            continue
        fig, axes = plt.subplots(1, len(lines), figsize=(6 * len(lines), 4.2), squeeze=False)
        for ax, (mode, series) in zip(axes[0], lines.items()):
            for cell, what, style, xs, ys in series:
                ax.plot(xs, ys, style, marker="o", color=colors.get(cell), label=f"{cell}: {what}")
            ax.set_xlabel(label)
            ax.set_title(mode)
            if axis == "B":
                ax.set_xscale("log", base=2)
        path = os.path.join(directory, f"rnn_speedup_vs_{stem}_{_device_label(device)}.png")
        title = f"fastner RNN layers vs torch.nn on {names.get(device, device)} ({device})"
        written.append(_finish(plt, fig, axes[0], path, title))
    return written


def crf_plots(plt, rows: Sequence[Dict], device: str, names: Dict[str, str], directory: str) -> List[str]:
    written = []
    crf = [r for r in rows if r["group"] == "crf" and r["device"] == device and "error" not in r]
    if not crf:
        return written
    for axis, label, stem, fixed in (("B", "batch size B", "batch", "T"),
                                     ("T", "sequence length T", "seqlen", "B")):
        ops = sorted({r["op"] for r in crf})
        fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4.2), squeeze=False)
        for ax, op in zip(axes[0], ops):
            subset = [r for r in crf if r["op"] == op]
            groups = sorted({(r["shape"][fixed], r["shape"]["K"]) for r in subset})
            for fixed_value, num_tags in groups:
                same = [r for r in subset
                        if r["shape"][fixed] == fixed_value and r["shape"]["K"] == num_tags]
                for base, style in (("pytorch-crf", "-"), ("reference", "--")):
                    xs, ys = _series(same, axis, "fastner", base)
                    if len(xs) > 1:
                        ax.plot(xs, ys, style, marker="o",
                                label=f"{fixed}={fixed_value} K={num_tags} vs {base}")
            ax.set_xlabel(label)
            ax.set_title(op)
            ax.set_yscale("log")
            if axis == "B":
                ax.set_xscale("log", base=2)
        if not any(ax.lines for ax in axes[0]):
            plt.close(fig)
            continue
        path = os.path.join(directory, f"crf_speedup_vs_{stem}_{_device_label(device)}.png")
        title = f"fastner CRF vs pytorch-crf and the reference on {names.get(device, device)} ({device})"
        written.append(_finish(plt, fig, axes[0], path, title))
    return written


def write_plots(result: Dict, directory: str) -> List[str]:
    """Every plot the rows of `result` (the JSON dict) support; returns the files written."""
    message = require_matplotlib()
    if message is not None:
        raise RuntimeError(message)
    plt = _pyplot()
    os.makedirs(directory, exist_ok=True)
    rows = result["rows"]
    names = {d["device"]: d["name"] for d in result.get("devices", [])}
    written: List[str] = []
    for device in sorted({r["device"] for r in rows}):
        written += rnn_plots(plt, rows, device, names, directory)
        written += crf_plots(plt, rows, device, names, directory)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m fastner.bench.plots RESULT.json OUT_DIR", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as handle:
        result = json.load(handle)
    try:
        for path in write_plots(result, args[1]):
            print(path)
    except RuntimeError as err:
        print(f"fastner bench: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
