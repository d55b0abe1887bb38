"""pytest-benchmark setup shared by fastner's benchmark suites (run them explicitly:
`python -m pytest benchmarks/bench_crf.py --benchmark-only`; tests/ is the default testpath)."""
from __future__ import annotations

import platform

import torch


def cpu_model() -> str:
    """The CPU's model name (lscpu's "Model name"), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary() -> dict:
    return {"cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def pytest_benchmark_update_machine_info(config, machine_info):
    # saved with --benchmark-json / --benchmark-autosave, so a run says where it was measured
    machine_info.update(machine_summary())
