"""Which device to run on: the user's choice checked, or CUDA when available."""
from __future__ import annotations

from typing import Union

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """The device to run on; None picks CUDA when available. A CUDA device without CUDA is an error."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type not in ("cpu", "cuda"):
        # torch names more (meta, mps, xpu ...): a tagger on them failed later with a traceback
        # (`fastner tag DIR --device meta`: NotImplementedError from torch.nonzero's meta kernel)
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch has no CUDA device available")
    return resolved
