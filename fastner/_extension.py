"""Loading fastner._C and deciding which implementation serves each device.

The fused kernels live in the compiled extension fastner._C; importing it registers
torch.ops.fastner.*. When it is missing or broken, fastner keeps working on the pure-PyTorch
reference path (fastner/reference.py) and warns once, naming the cause.
FASTNER_BACKEND=reference forces the reference path, so both can always be compared.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Tuple, Union

import torch

ENV_VAR = "FASTNER_BACKEND"
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else ENV_VAR

_loaded: Optional[bool] = None
_load_error: Optional[str] = None


class TorchMismatchError(ImportError):
    """The compiled extension was built for another torch (or CUDA) than the one installed."""


def _check_build_matches_torch() -> None:
    # An extension compiled against another torch fails in obscure ways (undefined symbols,
    # wrong ABI) or, worse, silently falls back to slow code on a server; say plainly what was
    # built against what, and refuse to start.
    try:
        from fastner import _build_info
    except ImportError:  # a source tree that was never built: nothing to compare
        return

    running = torch.__version__.split("+")[0]
    if _build_info.TORCH_VERSION != running:
        raise TorchMismatchError(
            f"fastner._C was built for torch {_build_info.TORCH_VERSION} but torch {running} is "
            "installed; install the fastner wheel built for this torch, or rebuild it "
            f"(pip install --no-build-isolation .), or set {ENV_VAR}=reference to run without "
            "the compiled kernels"
        )
    if _build_info.CUDA_VERSION is not None and torch.version.cuda is not None:
        if _build_info.CUDA_VERSION.split(".")[0] != torch.version.cuda.split(".")[0]:
            raise TorchMismatchError(
                f"fastner._C was built with CUDA {_build_info.CUDA_VERSION} but torch uses CUDA "
                f"{torch.version.cuda}; install the matching wheel or rebuild fastner, or set "
                f"{ENV_VAR}=reference"
            )


def forced_reference() -> bool:
    raw = _environ_get()
    if raw is None:  # the common case, answered without os.environ's Mapping machinery
        return False
    value = raw.strip().lower()
    if value not in ("", "auto", "fused", "reference"):
        raise ValueError(f"{ENV_VAR} must be 'reference', 'fused' or 'auto', got {value!r}")
    return value == "reference"


def _environ_get() -> Optional[str]:
    # os.environ.get costs ~1-2 us for a missing key (it raises and catches KeyError), and every
    # op call asks: read CPython's underlying dict of encoded keys where there is one.
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict):
        raw = data.get(_ENV_KEY)
        return None if raw is None else os.environ.decodevalue(raw)
    return os.environ.get(ENV_VAR)


def extension_loaded() -> bool:
    """Import fastner._C once; True when the fused kernels are registered."""
    global _loaded, _load_error
    if _loaded is None:
        if forced_reference():
            # Not loading at all keeps FASTNER_BACKEND=reference usable with a mismatched build.
            _loaded = False
            return _loaded
        _check_build_matches_torch()  # raises: a mismatch is a deployment error, not a fallback
        try:
            from fastner import _C  # noqa: F401  (registers torch.ops.fastner.*)

            _loaded = True
        except (ImportError, OSError) as err:
            _loaded = False
            _load_error = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"fastner: the compiled extension could not be loaded ({_load_error}); "
                "running on the pure-PyTorch reference path",
                RuntimeWarning,
                stacklevel=2,
            )
    return _loaded


def load_error() -> Optional[str]:
    extension_loaded()
    return _load_error


# (op, device type) -> whether a kernel is registered. Kernels do not come and go once the
# extension is loaded, and asking the dispatcher costs microseconds on every call of a
# microsecond-scale op.
_kernels: Dict[Tuple[str, str], bool] = {}


def has_kernel(op: str, device_type: str) -> bool:
    """Whether torch.ops.fastner.<op> has a kernel for this device type ('cpu', 'cuda')."""
    key = (op, device_type)
    known = _kernels.get(key)
    if known is None:
        known = _kernels[key] = _dispatcher_has_kernel(op, device_type)
    return known


def _dispatcher_has_kernel(op: str, device_type: str) -> bool:
    if not extension_loaded():
        return False
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if dispatch_key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastner::{op}", dispatch_key)
    except RuntimeError:  # op not registered at all
        return False


def _constant_under_compile(fn):
    """torch.compiler.assume_constant_result(fn), which sets exactly this attribute, but after
    importing torch._dynamo: 1.3 s of every `import fastner` (each `fastner tag` call, each server
    start), compiled or not. tests/test_backend.py checks the two stay the same."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def use_fused(op: str, device: Union[torch.device, str]) -> bool:
    """Whether a call of `op` on `device` goes to the fused kernel (else to the reference).

    The dispatcher query is opaque to Dynamo, so under torch.compile the answer is taken once,
    at trace time, and becomes a constant of the compiled graph.
    """
    # Every op call asks, so the common case is a handful of operations: FASTNER_BACKEND unset
    # (one _environ_get; forced_reference parses it only when set) and one dict lookup.
    if _environ_get() is not None and forced_reference():
        return False
    known = _fused.get((op, device))
    if known is None:
        # device.type builds a new string each time: asked once per (op, device).
        known = _fused[(op, device)] = has_kernel(op, device if isinstance(device, str) else device.type)
    return known


# (op, device or device type) -> has_kernel's answer; a process meets a handful of devices.
_fused: Dict[Tuple[str, Union[torch.device, str]], bool] = {}
