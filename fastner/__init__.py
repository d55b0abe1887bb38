"""fastner: fused LSTM/GRU/RNN and linear-chain CRF kernels for PyTorch, and a NER tagger."""
from __future__ import annotations

from typing import Dict

import torch

__version__ = "0.1.0"

from fastner import _extension

# Ops whose kernels decide what "fused" means for a device in backend().
_PROBE_OPS = ("crf_forward",)


def backend() -> Dict[str, str]:
    """Which implementation serves each device: 'fused', 'reference' or 'unavailable'.

    >>> fastner.backend()
    {'cpu': 'fused', 'cuda': 'unavailable', 'version': '0.1.0', 'torch': '2.13.0+cpu',
     'cpu_simd': 'avx512'}
    """

    def serving(device_type: str) -> str:
        if _extension.forced_reference():
            return "reference"
        fused = all(_extension.has_kernel(op, device_type) for op in _PROBE_OPS)
        return "fused" if fused else "reference"

    info = {
        "cpu": serving("cpu"),
        "cuda": serving("cuda") if torch.cuda.is_available() else "unavailable",
        "version": __version__,
        "torch": torch.__version__,
    }
    error = _extension.load_error()
    if error is not None:
        info["extension_error"] = error
    elif info["cpu"] == "fused":
        from fastner import _C

        info["cpu_simd"] = _C.crf_lanes_isa()  # 'avx512' or 'avx2' (float32 CRF kernels)
    return info


try:
    _extension.extension_loaded()
except ValueError:
    # a bad FASTNER_BACKEND value: raised again, with its message, by backend() and by the first
    # op call, where callers (the CLI among them) can report it; not as an import traceback
    pass


def __getattr__(name: str):
    # fastner.Tagger without importing the tagger stack on `import fastner`
    if name == "Tagger":
        from fastner.tagger import Tagger

        return Tagger
    raise AttributeError(f"module 'fastner' has no attribute {name!r}")
