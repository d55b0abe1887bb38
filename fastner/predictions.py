"""Checks Tagger.predict and the exported runtime share (fastner.inference, fastner.documents).
Light on imports, so the exported runtime stays free of the model and training code."""
from __future__ import annotations


def check_batch_size(batch_size) -> int:
    """batch_size as an int >= 1, else ValueError (a bool, float or negative count is a mistake)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size
