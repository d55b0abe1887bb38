"""What a result is only meaningful with: the machine, the versions, the commit, the threads."""
from __future__ import annotations

import os
import pathlib
import platform
import subprocess
from typing import Dict, Optional

import torch

_REPO = pathlib.Path(__file__).resolve().parents[2]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# The cpuinfo flags that decide which kernels run (fastner's, MKL's, oneDNN's, fbgemm's).
_KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                 "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> list:
    """The kernel-relevant flags of this CPU (from /proc/cpuinfo; [] where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in _KERNEL_FLAGS if flag in present]
    except OSError:
        pass
    return []


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True,
                              timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_commit() -> Optional[str]:
    """HEAD of the checkout fastner runs from, or None (an installed wheel, no git)."""
    commit = _git("rev-parse", "HEAD")
    return commit or None


def git_dirty() -> Optional[bool]:
    if git_commit() is None:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def fused_ops(device: torch.device) -> Dict[str, bool]:
    """For every registered torch.ops.fastner op: whether a fused kernel serves this device."""
    from fastner import _extension

    try:
        _extension.extension_loaded()
        names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                       if n.startswith("fastner::"))
        return {name: _extension.has_kernel(name, device.type) for name in names}
    except Exception:  # private dispatcher API: its absence only costs this detail
        return {}


def describe(devices, arguments) -> Dict[str, object]:
    import fastner

    try:
        backend = fastner.backend()
    except Exception as err:  # a broken build must not stop the run that would show it
        backend = {"error": f"{type(err).__name__}: {err}"}
    return {
        "fastner_version": fastner.__version__,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "quantized_engine": torch.backends.quantized.engine,
        # What the CUDA baselines run with: torch's defaults, as users get them.
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32,
                 "matmul": torch.backends.cuda.matmul.allow_tf32},
        "fastner_backend": backend,
        "fastner_backend_env": os.environ.get("FASTNER_BACKEND"),
        "devices": [{"device": str(d), "name": device_name(d), "fused_ops": fused_ops(d)}
                    for d in devices],
        "arguments": list(arguments),
    }
