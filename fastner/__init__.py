"""fastner: fused LSTM/GRU/RNN and linear-chain CRF kernels for PyTorch, and a NER tagger."""
from __future__ import annotations

from typing import Dict

import torch

__version__ = "0.1.0"

from fastner import _extension

# Ops whose kernels decide what "fused" means for a device in backend().
_PROBE_OPS = ("crf_forward",)


def backend() -> Dict[str, str]:
    """Which implementation serves each device, and whether the CUDA kernels were built.

    'cpu' and 'cuda': 'fused', 'reference' or ('cuda' only) 'unavailable' when torch sees no GPU.
    'cuda_kernels': 'built' when the loaded extension carries the CUDA kernels (then 'cuda' is
    'fused' wherever a GPU is visible), 'not built' for a CPU-only build, 'not loaded' when the
    extension is not loaded (FASTNER_BACKEND=reference, or a broken build: see 'extension_error').

    >>> fastner.backend()  # a CUDA wheel on a machine without a GPU
    {'cpu': 'fused', 'cuda': 'unavailable', 'cuda_kernels': 'built', 'version': '0.1.0',
     'torch': '2.14.1+cu130', 'cpu_simd': 'avx2'}
    """

    def serving(device_type: str) -> str:
        if _extension.forced_reference():
            return "reference"
        return "fused" if kernels_built(device_type) else "reference"

    def kernels_built(device_type: str) -> bool:
        return all(_extension.has_kernel(op, device_type) for op in _PROBE_OPS)

    loaded = _extension.extension_loaded()
    info = {
        "cpu": serving("cpu"),
        "cuda": serving("cuda") if torch.cuda.is_available() else "unavailable",
        # Asked of the dispatcher, which knows the CUDA kernels without a GPU to run them on.
        "cuda_kernels": ("built" if kernels_built("cuda") else "not built") if loaded else "not loaded",
        "version": __version__,
        "torch": torch.__version__,
    }
    error = _extension.load_error()
    if error is not None:
        info["extension_error"] = error
    elif info["cpu"] == "fused":
        from fastner import _C

        info["cpu_simd"] = _C.cpu_isa()  # 'avx512' or 'avx2', for every CPU kernel family
        info["cpu_int8"] = _C.rnn_int8_kernel()  # the int8 layers' product: 'avx512_vnni' or 'avx2'
        info["cpu_bf16"] = _C.rnn_bf16_kernel()  # the bf16 layers' product: 'avx512_bf16' or 'avx2'
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
