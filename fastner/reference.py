"""Pure-PyTorch implementations of every fastner op: the test oracle and the fallback.

Each function here computes what the matching torch.ops.fastner.* kernel computes, with plain,
vectorised torch operations (autograd gives the backward). They run wherever the extension does
not: FASTNER_BACKEND=reference, an unsupported device, or a failed build.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

# =============================================================================================
# Linear-chain CRF
# =============================================================================================


# =============================================================================================
# Helpers shared by the sections (keep this block between them)
# =============================================================================================


# =============================================================================================
# Recurrent layers (LSTM / GRU / RNN)
# =============================================================================================
