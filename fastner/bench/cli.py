"""`fastner bench` / `python -m fastner.bench`: every fused path against what users run today."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from typing import Dict, List, Optional, Sequence

import torch

from fastner.bench import crf_rows, gemm_rows, precision_rows, rnn_rows, tagger_rows
from fastner.bench.environment import describe, device_name
from fastner.bench.plots import require_matplotlib, write_plots
from fastner.bench.report import build_json, row_lines, write_json_atomic
from fastner.bench.rows import Context, GroupSkipped, Row, describe_error
from fastner.bench.timing import Settings
from fastner.bench.workloads import make_plan
from fastner.cli_parser import MAX_THREADS

# Run order matters: the fp32 GEMM rate measured first gives the RNN rows their floor (the
# precision rows time their int8 GEMM in their own rounds: rnn_rows._precision_row).
GROUPS = {"gemm": gemm_rows, "crf": crf_rows, "rnn": rnn_rows, "precision": precision_rows, "tagger": tagger_rows}

DEFAULT_SETTINGS = Settings(warmup=2, min_samples=5, max_samples=40, budget_s=0.4)
QUICK_SETTINGS = Settings(warmup=1, min_samples=3, max_samples=10, budget_s=0.04)


def _parser() -> argparse.ArgumentParser:
    from fastner.cli_parser import _Parser  # the `fastner: error: ...` line (exit 2) every subcommand gives

    parser = _Parser(
        prog="fastner bench",
        description="Time fastner's fused CRF, RNN and whole-tagger paths against pytorch-crf, "
                    "torch.nn (padded and packed) and fastner's reference path: interleaved, "
                    "after warm-up, medians with quartiles, in one process per device.")
    parser.add_argument("--quick", action="store_true",
                        help="a small subset (under a minute on 2 cores) to check the setup")
    parser.add_argument("--json", metavar="FILE", help="write every row and the environment here")
    parser.add_argument("--plot", metavar="DIR", help="write PNG plots of the speedups here (matplotlib)")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="where to run (default: all = cpu, and cuda when available)")
    parser.add_argument("--only", metavar="GROUPS", default=",".join(GROUPS),
                        help=f"comma-separated groups to run, of {','.join(GROUPS)} (default: all)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="CPU rows' clock: wall time (default), or the calling thread's CPU time, "
                             "which time spent waiting for a core on a busy machine does not count "
                             "(needs --threads 1: torch's own threads would not be counted)")
    return parser


def _groups(text: str, parser: argparse.ArgumentParser) -> List[str]:
    wanted = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in GROUPS]
    if unknown or not wanted:
        parser.error(f"--only takes a comma-separated list of {', '.join(GROUPS)}; got {text!r}")
    return [name for name in GROUPS if name in wanted]


def _devices(choice: str, parser: argparse.ArgumentParser) -> List[torch.device]:
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        parser.error("--device cuda: CUDA is not available to this torch "
                     f"({torch.__version__}, CUDA {torch.version.cuda})")
    devices = []
    if choice in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if choice == "cuda" or (choice == "all" and cuda):
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    return devices


def _say(text: str = "") -> None:
    print(text, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(arguments)
    groups = _groups(args.only, parser)
    devices = _devices(args.device, parser)
    if args.threads is not None:
        if not 1 <= args.threads <= MAX_THREADS:  # the other commands' bound
            parser.error(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread needs --threads 1 (the CPU time of torch's other threads is not counted)")
    if args.plot:
        message = require_matplotlib()
        if message is not None:  # say so now, not after a ten-minute run
            parser.error(message)
    started = time.perf_counter()
    torch.manual_seed(0)
    plan = make_plan(args.quick)
    settings = QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS
    settings = dataclasses.replace(settings, thread_cpu_clock=args.clock == "thread")
    environment = describe(devices, arguments)

    _say(f"fastner {environment['fastner_version']} (backend {environment['fastner_backend']}), "
         f"torch {environment['torch_version']}, {environment['threads']} threads, {args.clock} clock, "
         f"commit {environment['git_commit'] or 'unknown'}")
    if os.environ.get("FASTNER_BACKEND", "").strip().lower() == "reference":
        _say("note: FASTNER_BACKEND=reference is set, so the 'fastner' rows measure the reference path")
    _say("times are medians per call (IQR = quartiles); Nx vs B = B's median / this median")

    rows: List[Row] = []
    group_records: List[Dict[str, object]] = []
    for device in devices:
        _say()
        _say(f"=== {device}: {device_name(device)}")
        kernels = next(d["fused_ops"] for d in environment["devices"] if d["device"] == str(device))
        if kernels:
            _say("    " + _kernel_line(kernels))
        for name in groups:
            group_records.append(_run_group(name, device, plan, settings, rows))

    wall = time.perf_counter() - started
    failed = [r for r in rows if r.error is not None] + \
        [g for g in group_records if g["status"] == "error"]
    _say()
    _say(f"done in {wall:.1f} s: {len(rows)} rows, "
         f"{sum(g['status'] == 'skipped' for g in group_records)} groups skipped, "
         f"{len(failed)} errors")
    result = build_json(environment, {**settings.__dict__, "plan": _plan_dict(plan)},
                        group_records, rows, args.quick, wall)
    if args.json:
        write_json_atomic(args.json, result)
        _say(f"wrote {args.json}")
    if args.plot:
        for path in write_plots(result, args.plot):
            _say(f"wrote {path}")
    return 1 if failed else 0


def _run_group(name: str, device: torch.device, plan, settings: Settings,
               rows: List[Row]) -> Dict[str, object]:
    """Run one group on one device, appending its rows; returns the group's record."""
    module = GROUPS[name]
    _say(f"--- {module.TITLE}")
    record: Dict[str, object] = {"device": str(device), "group": name}

    def emit(row: Row) -> None:
        rows.append(row)
        _print(row)

    ctx = Context(device, plan, settings, emit=emit)
    ctx.gemm_flops_per_s = _gemm_rate(rows, str(device))  # measured by an earlier group
    started = time.perf_counter()
    try:
        module.run(ctx)
        record["status"] = "ok"
    except GroupSkipped as skip:
        record["status"] = "skipped"
        record["skipped"] = str(skip)
        _say(f"    skipped: {skip}")
    except Exception as err:  # report it and go on with the other groups
        record["status"] = "error"
        record["error"] = describe_error(err)
        _say(f"    ERROR: {describe_error(err)}")
        traceback.print_exc()
    record["notes"] = list(ctx.notes)
    for note in ctx.notes:
        _say(f"    note: {note}")
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def _kernel_line(kernels: Dict[str, bool]) -> str:
    fused = ", ".join(op for op, has in kernels.items() if has) or "none"
    reference = ", ".join(op for op, has in kernels.items() if not has) or "none"
    return f"fused kernels: {fused}; reference path: {reference}"


def _print(row: Row) -> None:
    for line in row_lines(row):
        _say(line)


def _gemm_rate(rows: List[Row], device: str) -> Optional[float]:
    """The fp32 rate (FLOP/s) an earlier gemm row measured."""
    for row in rows:
        if row.group == "gemm" and row.device == device and "gflops_per_s" in row.info:
            return row.info["gflops_per_s"] * 1e9
    return None


def _plan_dict(plan) -> Dict[str, object]:
    return {key: (list(value) if isinstance(value, tuple) else value)
            for key, value in plan.__dict__.items()}
