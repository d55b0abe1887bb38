"""fastner.nn.convert: swap torch's recurrent layers (and torchcrf.CRF) for fastner's, in place."""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from fastner.nn.rnn import GRU, LSTM, RNN

__all__ = ["convert"]

# Exact torch classes only: a user's own subclass may override forward, so it is left alone
# (and named in a warning: warn_left_alone).
_RNN_SWAPS = {torch.nn.LSTM: LSTM, torch.nn.GRU: GRU, torch.nn.RNN: RNN}
_PUBLIC_NAMES = {LSTM: "fastner.nn.LSTM", GRU: "fastner.nn.GRU", RNN: "fastner.nn.RNN",
                 torch.nn.LSTM: "torch.nn.LSTM", torch.nn.GRU: "torch.nn.GRU", torch.nn.RNN: "torch.nn.RNN"}


def swap_rnn_class(module: torch.nn.Module, cls: Optional[type] = None) -> torch.nn.Module:
    """`module` with its class rebound to `cls` (default: the fastner class of an exact torch
    LSTM / GRU / RNN; any other module is returned unchanged)."""
    cls = cls if cls is not None else _RNN_SWAPS.get(type(module))
    if cls is None:
        return module
    # The fastner classes add no constructor state of their own: rebinding the class keeps every
    # parameter, buffer, hook and flat-weight view exactly as it was (and shared parameters
    # stay shared).
    module.__class__ = cls
    return module


def swap_children(model: torch.nn.Module, swapped: Callable[[torch.nn.Module], torch.nn.Module]) -> torch.nn.Module:
    """Replace every submodule m of `model` by swapped(m) (in place, parents first) and return
    swapped(model)."""
    for parent in list(model.modules()):
        # _modules, not named_children(): that yields a child held under two names once, and
        # a replacement (bf16's copy) would leave the other name holding the old module.
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            new = swapped(child)
            if new is not child:
                setattr(parent, name, new)
    return swapped(model)


def _crf_swap():
    """(torchcrf.CRF, fastner.nn.CRF) when both exist, else None."""
    try:
        import torchcrf
    except ImportError:
        return None
    try:
        from fastner.nn.crf import CRF
    except ImportError:
        return None
    return torchcrf.CRF, CRF


def _swap_crf(module: torch.nn.Module, fastner_crf: type) -> torch.nn.Module:
    # The class is rebound, as for the recurrent layers, not the module replaced by a copy: a
    # copy left an optimizer built before convert() updating the old parameters, made trainable
    # again the ones frozen with requires_grad_(False), dropped hooks, and split a CRF shared by
    # two parents in two. fastner's CRF has torchcrf's attributes plus its constraint buffers.
    module.__class__ = fastner_crf
    module._set_constraints(None)  # on the parameters' device
    return module


def warn_left_alone(model: torch.nn.Module, done: tuple, what: str, caller: str) -> None:
    """One UserWarning per layer of `model` that is a torch.nn.RNNBase (LSTM / GRU / RNN) but
    not an instance of `done` after `caller` ran: a subclass of torch's or fastner's classes,
    which the swaps pass over (its own forward would be dropped), so that the model does not run
    in float where the caller believes it `what` without a word. (torch's quantize_dynamic does
    pass over subclasses silently: fastner's own benchmark once timed an "int8" torch model that
    ran in fp32.)"""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.RNNBase) and not isinstance(module, done):
            base = next((_PUBLIC_NAMES[c] for c in type(module).__mro__ if c in _PUBLIC_NAMES), "torch.nn.RNNBase")
            warnings.warn(
                f"{caller}: {repr(name) if name else 'the module'} ({type(module).__name__}, a subclass of {base}) is "
                f"left as it is, not {what}: a subclass may override forward, which the swap would "
                f"drop. Put a plain {base} in its place (its state_dict loads as is) to have it {what}",
                UserWarning, stacklevel=3)


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every torch.nn.LSTM / GRU / RNN (and torchcrf.CRF) inside `model` by the fastner
    equivalent, in place and keeping the weights; returns `model` (itself swapped when it is one
    of those layers). Subclasses of those classes are left alone (they may override forward),
    each named in a UserWarning."""
    crf = _crf_swap()

    def swapped(module: torch.nn.Module) -> torch.nn.Module:
        if crf is not None and type(module) is crf[0]:
            return _swap_crf(module, crf[1])
        return swap_rnn_class(module)

    converted = swap_children(model, swapped)
    warn_left_alone(converted, (LSTM, GRU, RNN), "converted", "fastner.nn.convert")
    return converted
