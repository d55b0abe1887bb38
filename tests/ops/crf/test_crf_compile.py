"""torch.compile(fullgraph=True) over a small tagger head using fastner.nn.CRF: no graph break,
and the same log-likelihood, gradients and Viterbi decode as eager."""
from __future__ import annotations

import pytest
import torch

import fastner.nn
from tests import testing


class TinyTagger(torch.nn.Module):
    def __init__(self, features, num_tags):
        super().__init__()
        self.proj = torch.nn.Linear(features, num_tags)
        self.crf = fastner.nn.CRF(num_tags, batch_first=True)

    def forward(self, x, tags, mask):  # x: [B, T, F]
        return -self.crf(self.proj(x), tags, mask=mask, reduction="mean")

    def viterbi(self, x, mask):
        return self.crf.viterbi(self.proj(x), mask=mask)


def _check_compiled_matches_eager(backend):
    torch._dynamo.reset()
    batch, steps, features, num_tags = 5, 9, 8, 6
    model = TinyTagger(features, num_tags)
    x = torch.randn(batch, steps, features)
    tags = torch.randint(0, num_tags, (batch, steps))
    mask = testing.mask_from_lengths(testing.random_lengths(batch, steps), steps)

    eager_loss = model(x, tags, mask)
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    eager_tags, eager_scores = model.viterbi(x, mask)
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    loss = compiled(x, tags, mask)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], msg=n)
    compiled_viterbi = torch.compile(model.viterbi, fullgraph=True, backend=backend)
    c_tags, c_scores = compiled_viterbi(x, mask)
    assert torch.equal(c_tags, eager_tags)
    torch.testing.assert_close(c_scores, eager_scores)


def test_compile_fullgraph_aot_eager_matches_eager():
    # aot_eager traces the ops through their fake kernels and autograd formulas (what fullgraph
    # needs) without inductor's C++ code generation, which takes minutes on a busy 2-core machine
    _check_compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor_matches_eager():
    _check_compiled_matches_eager("inductor")
