"""What every trainable op shares: the one "needs a gradient" test, the guard that runs an op
below its autograd kernel, and the registration of that kernel.

Each trainable op has ONE autograd formula, registered as the op's kernel at the Autograd
dispatch key. Eager calls, torch.compile (AOTAutograd traces that kernel), torch.export and
torch.library.opcheck all reach it through the dispatcher, so a fix to the formula reaches
every mode. crf_forward's and the RNN layer's formulas are torch.autograd.Functions here;
crf_log_likelihood's (the CRF training step) is a C++ torch::autograd::Function
(csrc/cpu/crf_log_likelihood.cpp). Measured per CRF training step (B=32, T=40, K=17; forward +
torch.autograd.grad; AMD EPYC Zen 2, 1 thread, thread CPU time, idle machine,
`python -m benchmarks.crf_step_breakdown`): Python formula 292.5 us, C++ formula 252.8 us (the
kernel alone 80-82 us). An earlier comparison on a machine at load ~9 had ranked them the other
way (363 vs 403-414 us; register_autograd 620-645 us); that C++ prototype saved its gradients
with save_for_backward and scaled them with _foreach_mul. All pass opcheck (with
test_aot_dispatch_dynamic) and torch.compile(fullgraph=True).
"""
from __future__ import annotations

from typing import Callable

import torch

# Kernels registered through this library live as long as the module (torch.library drops the
# registrations of a Library that is garbage-collected).
_LIBRARY = torch.library.Library("fastner", "IMPL")


def needs_grad(*tensors) -> bool:
    """Whether a gradient can flow into any of `tensors` (None entries ignored) from here."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # a plain loop: a generator costs a microsecond more per call
        if t is not None and t.requires_grad:
            return True
    return False


def below_autograd():
    """Run op calls past the Autograd key (what an autograd kernel's forward must do: calling
    the op itself again would re-enter the kernel)."""
    return torch._C._AutoDispatchBelowAutograd()


def call(op, kernel: Callable, *args):
    """Run `op` (an OpOverload whose Autograd kernel is `kernel`) on `args`. In eager mode the
    kernel is called directly: the dispatcher would run the very same function, and skipping
    its Python-kernel hop saves ~10% of a small CRF training step. Traced (torch.compile,
    torch.export), the op itself is called, so that the graph holds it."""
    if torch.compiler.is_compiling():
        return op(*args)
    return kernel(*args)


def register_autograd_kernel(op: str, kernel: Callable) -> None:
    """`kernel` (the op's arguments, in schema order) serves fastner::`op` at the Autograd key."""
    _LIBRARY.impl(op, kernel, "Autograd")


def reference_backward(forward: Callable, inputs: tuple, grad_outputs: tuple) -> list:
    """An autograd formula's backward when a graph of it is wanted (create_graph=True: a
    gradient of a gradient, as in gradient penalties or Hessian-vector products). The fused
    backward ops have no derivative of their own, and autograd would backpropagate through
    them as zero with only a warning: silently wrong second-order terms. Instead `forward` (the
    op's pure-PyTorch reference) is run again on the saved `inputs` and differentiated with a
    graph. Returns one gradient per input (None where none flows)."""
    with torch.enable_grad():
        outputs = forward(*inputs)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
             if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
    wanted = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    result = [None] * len(inputs)
    if pairs and wanted:
        grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted],
                                    [g for _, g in pairs], create_graph=True, allow_unused=True)
        for i, g in zip(wanted, grads):
            result[i] = g
    return result
