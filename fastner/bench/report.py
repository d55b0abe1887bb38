"""Output: the table printed while measuring, and the JSON file (written atomically)."""
from __future__ import annotations

import json
import os
from typing import Dict, List

from fastner.bench.rows import Row

SCHEMA_VERSION = 1


def format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:8.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:8.3f} ms"
    return f"{seconds:8.3f} s "


def _shape_text(shape: Dict[str, object]) -> str:
    skip = {"lengths", "bidirectional", "layers"}
    return " ".join(f"{key}={value}" for key, value in shape.items() if key not in skip)


def row_lines(row: Row) -> List[str]:
    """The table lines of one row: a heading, then one line per implementation."""
    heading = f"{row.group} {row.op}  {_shape_text(row.shape)}"
    if "floor_ms" in row.info:
        heading += f"  floor {format_time(row.info['floor_ms'] / 1e3).strip()}"
    if "gflops_per_s" in row.info:
        heading += f"  -> {row.info['gflops_per_s']:.1f} GFLOP/s"
    if "int8_floor_ms" in row.info:
        heading += (f"  int8 floor {format_time(row.info['int8_floor_ms'] / 1e3).strip()}"
                    f" (fbgemm {row.info['int8_gemm_gops_per_s']:.0f} GOP/s)")
    if row.check not in ("ok", "n/a"):
        heading += f"  CHECK {row.check}"
    lines = [heading]
    if row.error is not None:
        lines.append(f"    ERROR {row.error}")
    width = max((len(r.impl) for r in row.results), default=8)
    for result in row.results:
        stats = result.stats
        text = (f"    {result.impl:<{width}} {format_time(stats.median)}"
                f"  IQR {format_time(stats.q1).strip()}..{format_time(stats.q3).strip()}"
                f"  n={stats.samples}")
        if "sentences_per_s" in result.extra:
            text += f"  {result.extra['sentences_per_s']:9.1f} sent/s"
        if "x_floor" in result.extra:
            text += f"  {result.extra['x_floor']:5.1f}x floor"
        if "x_int8_floor" in result.extra:
            text += f"  {result.extra['x_int8_floor']:5.2f}x int8 floor"
        for base, ratio in result.speedup.items():
            text += f"  {ratio:7.2f}x vs {base}"
        lines.append(text)
    return lines


def build_json(environment: Dict[str, object], settings: Dict[str, object],
               groups: List[Dict[str, object]], rows: List[Row], quick: bool,
               wall_s: float) -> Dict[str, object]:
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "fastner.bench",
        "quick": quick,
        "wall_s": wall_s,
        **environment,
        "settings": settings,
        "groups": groups,
        "rows": [row.as_dict() for row in rows],
    }


def write_json_atomic(path: str, data: Dict[str, object]) -> None:
    """Write the report so that readers never see half a file (fastner.storage.atomic_write_bytes)."""
    from fastner.storage import atomic_write_bytes

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=1, allow_nan=False) + "\n").encode("utf-8"))
