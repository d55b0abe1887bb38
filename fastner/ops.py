"""Typed Python entry points to every fastner op.

For each op: the fused kernel (torch.ops.fastner.*) where the extension serves the device,
else the reference in fastner/reference.py. Fused ops get a fake kernel
(torch.library.register_fake, so torch.compile and torch.export trace through them) and, when
trainable, an autograd formula (torch.library.register_autograd) calling their backward op.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastner import reference
from fastner._extension import extension_loaded, use_fused

# =============================================================================================
# Linear-chain CRF
# =============================================================================================


# =============================================================================================
# Helpers shared by the sections (keep this block between them)
# =============================================================================================


# =============================================================================================
# Recurrent layers (LSTM / GRU / RNN)
# =============================================================================================
