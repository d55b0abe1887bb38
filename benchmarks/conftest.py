"""pytest-benchmark setup shared by fastner's benchmark suites (run them explicitly:
`python -m pytest benchmarks/bench_crf.py --benchmark-only`; tests/ is the default testpath)."""
from __future__ import annotations

import torch

from fastner.bench.environment import cpu_model


def machine_summary() -> dict:
    return {"cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def pytest_benchmark_update_machine_info(config, machine_info):
    # saved with --benchmark-json / --benchmark-autosave, so a run says where it was measured
    machine_info.update(machine_summary())
