"""Pure-PyTorch implementations of every fastner op: the test oracle and the fallback.

Each function here computes what the matching torch.ops.fastner.* kernel computes, with plain,
vectorised torch operations (autograd gives the backward). They run wherever the extension does
not: FASTNER_BACKEND=reference, an unsupported device, or a failed build.

Why one ~750-line module: it is the one oracle that tests, benchmarks and docs name as
`fastner.reference.<op>`, one section per op family (CRF; recurrent layers with their int8 and
bf16 forms; char CNN; linear over a mask's rows; dropout masks), each function short.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastner import validation

# =============================================================================================
# Linear-chain CRF
# =============================================================================================
# All functions take batch-first tensors and lengths, like the torch.ops.fastner.crf_* kernels:
#   emissions: [B, T, K] (float16/bfloat16 are computed in float32), lengths: int64 [B],
#   transitions: [K, K] (i -> j), start_transitions / end_transitions: [K]; -inf forbids.
# They loop over time only; every step is vectorised over the batch and the tags.


def crf_accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype CRF scores are computed in for emissions of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _crf_inputs(emissions: Tensor, transitions: Tensor, start_transitions: Tensor,
                end_transitions: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dtype = crf_accumulate_dtype(emissions.dtype)
    return (emissions.to(dtype), transitions.to(dtype), start_transitions.to(dtype),
            end_transitions.to(dtype))


def _valid_steps(lengths: Tensor, T: int) -> Tensor:
    """mask: bool [B, T], True at the positions inside each sequence."""
    return torch.arange(T, device=lengths.device) < lengths.unsqueeze(1)


def _logsumexp(x: Tensor, dim: int) -> Tensor:
    # torch.logsumexp, with a gradient of 0 (not NaN) where every entry is -inf: constrained
    # CRFs forbid whole paths, and those must not poison the gradients of the allowed ones.
    # Shifted by the max m where it is finite: then s >= 1 (exp(0) at the max). A row whose max
    # is -inf, +inf or NaN is shifted by 0 and takes that value (log s + m); where every entry
    # is -inf, s = 0 and log 1 is taken instead, with a zero gradient (1/0 * 0 would be NaN).
    # Not s.clamp_min(1): s is exactly 1 wherever one entry dominates, and since torch 2.14
    # clamp passes no gradient at its bound (2.13 passed it all).
    m = x.amax(dim=dim, keepdim=True).detach()
    s = (x - m.nan_to_num(0.0, 0.0, 0.0)).exp().sum(dim=dim)
    return torch.where(s > 0, s, 1).log() + m.squeeze(dim)


def crf_lengths(mask: Tensor, batch_first: bool) -> Tensor:
    """Lengths int64 [B] of a right-padded bool/uint8 mask ([B, T] when batch_first, else [T, B]).

    Raises ValueError when a valid step follows an invalid one (skipped under torch.compile,
    where the check would be a data-dependent branch, and on meta tensors, which hold no values).
    """
    validation.crf_mask("crf_lengths", mask)
    valid = (mask if batch_first else mask.t()) != 0
    lengths = valid.sum(dim=1)
    if validation._reads_values(valid):  # not on meta, nor under torch.compile
        if not torch.equal(valid, _valid_steps(lengths, valid.shape[1])):
            raise ValueError("mask must be right-padded (no gap): each sequence's valid steps "
                             "come first, e.g. [1, 1, 1, 0, 0]")
    return lengths


def crf_alphas(emissions: Tensor, lengths: Tensor, transitions: Tensor,
               start_transitions: Tensor, end_transitions: Tensor) -> Tuple[Tensor, Tensor]:
    """Forward algorithm: (log_z [B], alphas [B, T, K]).

    alphas[b, t, j] is the log-sum of the scores of all tag prefixes y_0..y_t with y_t = j (start
    transition and emissions included); entries past a sequence's length are 0, and so is log_z
    of a sequence of length 0. A sequence that reads a NaN or +inf score has log_z NaN or +inf and
    the gradients of the contract in _NonFiniteLogZ.
    """
    validation.crf_args("crf_forward", emissions, lengths, transitions, start_transitions,
                        end_transitions)
    emissions, transitions, start, end = _crf_inputs(emissions, transitions, start_transitions,
                                                     end_transitions)
    B, T, K = emissions.shape
    valid = _valid_steps(lengths, T)
    if T == 0:  # log Z = 0, kept on the graph (a zero gradient, not an unconnected constant)
        return emissions.sum(dim=(1, 2)) * 0, emissions.new_zeros(B, 0, K)
    # A sequence reads no score outside its length: zeros stand in for the start and end scores
    # of an empty sequence and for the transition scores of the steps past its length. The steps
    # it skips are still computed, then dropped by torch.where, and log-sum-exp's backward of a
    # dropped step passed 0 * NaN = NaN back: a length-1 sequence got NaN gradients from a NaN
    # or +inf transition score it never reads, in a padded batch only.
    nonempty = valid[:, :1]  # [B, 1]
    alpha = torch.where(nonempty, start + emissions[:, 0], 0)  # [B, K]
    history = [alpha]
    for t in range(1, T):
        active = valid[:, t].unsqueeze(1)  # [B, 1]
        scores = torch.where(active.unsqueeze(2), alpha.unsqueeze(2) + transitions, 0)  # [B, K, K]
        alpha = torch.where(active, _logsumexp(scores, dim=1) + emissions[:, t], alpha)
        history.append(alpha)
    log_z = _logsumexp(torch.where(nonempty, alpha + end, 0), dim=1)
    log_z = torch.where(lengths > 0, log_z, torch.zeros_like(log_z))
    log_z = _NonFiniteLogZ.apply(log_z, valid, emissions, transitions, start, end)
    alphas = torch.stack(history, dim=1)
    alphas = torch.where(valid.unsqueeze(2), alphas, torch.zeros_like(alphas))
    return log_z, alphas


class _NonFiniteLogZ(torch.autograd.Function):
    """log Z unchanged, with the gradients of the NaN / +inf contract (csrc/cpu/crf_gold_nan.h):
    a sequence whose log Z is NaN or +inf (it reads a NaN or +inf score; finite scores would have
    to overflow the dtype's range) gets NaN emission gradients over its whole length, and the
    transition, start and end scores, which the batch shares, NaN gradients. Log-sum-exp's own
    backward makes only part of them NaN (0 * inf), e.g. not at a last step's finite tags.
    These gradients are added to the others: 0 where the contract changes nothing."""

    @staticmethod
    def forward(ctx, log_z, valid, emissions, transitions, start, end):
        poisoned = valid & ~(log_z < math.inf).unsqueeze(1)  # [B, T]: NaN or +inf
        ctx.save_for_backward(poisoned)
        ctx.shapes = emissions.shape, transitions.shape, start.shape, end.shape
        return log_z.clone()

    @staticmethod
    def backward(ctx, grad_log_z):
        (poisoned,) = ctx.saved_tensors
        nan, zero = grad_log_z.new_full((), math.nan), grad_log_z.new_zeros(())
        emissions = torch.where(poisoned.unsqueeze(2), nan, zero).expand(ctx.shapes[0])
        shared = torch.where(poisoned.any(), nan, zero)
        return (grad_log_z, None, emissions, *(shared.expand(shape) for shape in ctx.shapes[1:]))


def crf_log_partition(emissions: Tensor, lengths: Tensor, transitions: Tensor,
                      start_transitions: Tensor, end_transitions: Tensor) -> Tensor:
    """log Z: [B], the log-sum of the scores of every tag sequence (0 for length 0)."""
    return crf_alphas(emissions, lengths, transitions, start_transitions, end_transitions)[0]


def crf_gold_score(emissions: Tensor, tags: Tensor, lengths: Tensor, transitions: Tensor,
                   start_transitions: Tensor, end_transitions: Tensor) -> Tensor:
    """The score of the tag sequence `tags` (int64 [B, T], ignored past each length): [B]."""
    validation.crf_args("crf_forward", emissions, lengths, transitions, start_transitions,
                        end_transitions, tags)
    emissions, transitions, start, end = _crf_inputs(emissions, transitions, start_transitions,
                                                     end_transitions)
    B, T, K = emissions.shape
    if T == 0:
        return emissions.sum(dim=(1, 2)) * 0
    valid = _valid_steps(lengths, T)
    safe_tags = torch.where(valid, tags, torch.zeros_like(tags))
    zero = emissions.new_zeros(())
    emitted = emissions.gather(2, safe_tags.unsqueeze(2)).squeeze(2)  # [B, T]
    score = torch.where(valid, emitted, zero).sum(dim=1)
    if T > 1:
        pairs = transitions[safe_tags[:, :-1], safe_tags[:, 1:]]  # [B, T-1]
        score = score + torch.where(valid[:, 1:], pairs, zero).sum(dim=1)
    last = safe_tags.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    score = score + torch.where(lengths > 0, start[safe_tags[:, 0]] + end[last], zero)
    return score


def crf_forward(emissions: Tensor, tags: Optional[Tensor], lengths: Tensor, transitions: Tensor,
                start_transitions: Tensor, end_transitions: Tensor) -> Tuple[Tensor, Tensor]:
    """Reference of torch.ops.fastner.crf_forward: (log_z [B], gold_score [B])."""
    log_z = crf_log_partition(emissions, lengths, transitions, start_transitions, end_transitions)
    if tags is None:
        gold = torch.zeros_like(log_z)
    else:
        gold = crf_gold_score(emissions, tags, lengths, transitions, start_transitions,
                              end_transitions)
    return log_z, gold


def _nan_or_posinf(x: Tensor) -> Tensor:
    return ~(x < math.inf)


def crf_window_probabilities(emissions: Tensor, lengths: Tensor, transitions: Tensor,
                             start_transitions: Tensor, end_transitions: Tensor, rows: Tensor,
                             starts: Tensor, allowed: Tensor) -> Tensor:
    """Reference of torch.ops.fastner.crf_window_probabilities (the definition): float64 [N], for
    each n the total exp(score) of sequence rows[n]'s paths that keep to allowed[n, w] at position
    starts[n] + w (inside its length) over its Z: the log partition of its emissions with the
    disallowed tags at -inf, minus its own, in float64. NaN where the sequence's scores hold a NaN
    or +inf it reads (a transition from length 2 on), or where it has no path."""
    validation.crf_window_args("crf_window_probabilities", emissions, lengths, transitions,
                               start_transitions, end_transitions, rows, starts, allowed)
    N, W, K = allowed.shape
    if N == 0:
        return emissions.new_empty(0, dtype=torch.float64)
    scores = tuple(s.to(torch.float64) for s in (transitions, start_transitions, end_transitions))
    picked = emissions.to(torch.float64).index_select(0, rows)  # [N, T, K]
    picked_lengths = lengths.index_select(0, rows)
    T = picked.shape[1]
    # allowed[n, w] at position starts[n] + w: scattered onto [N, T, K], cut where it runs past T
    positions = starts.unsqueeze(1) + torch.arange(W, device=starts.device)  # [N, W]
    inside = positions < T
    mask = torch.ones(N, T, K, dtype=torch.bool, device=emissions.device)
    n_index = torch.arange(N, device=starts.device).unsqueeze(1).expand(N, W)
    mask[n_index[inside], positions[inside]] = allowed[inside]
    constrained = picked.masked_fill(~mask, -math.inf)
    log_z_set = crf_log_partition(constrained, picked_lengths, *scores)
    log_z = crf_log_partition(picked, picked_lengths, *scores)
    probability = (log_z_set - log_z).exp()
    valid = _valid_steps(picked_lengths, T).unsqueeze(2)
    poisoned = (_nan_or_posinf(picked) & valid).flatten(1).any(1)
    poisoned |= bool(_nan_or_posinf(scores[1]).any() or _nan_or_posinf(scores[2]).any())
    poisoned |= (picked_lengths >= 2) & bool(_nan_or_posinf(scores[0]).any())
    return torch.where(poisoned | (log_z == -math.inf), math.nan, probability)


def crf_backward(grad_log_z: Tensor, grad_gold_score: Tensor, emissions: Tensor,
                 tags: Optional[Tensor], lengths: Tensor, transitions: Tensor,
                 start_transitions: Tensor, end_transitions: Tensor
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference of torch.ops.fastner.crf_backward, by autograd through the reference forward."""
    inputs = [x.detach().requires_grad_() for x in
              (emissions, transitions, start_transitions, end_transitions)]
    with torch.enable_grad():
        log_z, gold = crf_forward(inputs[0], tags, lengths, *inputs[1:])
        total = (grad_log_z * log_z).sum() + (grad_gold_score * gold).sum()
        # An empty batch or T = 0 scores constants: no graph, zero gradients.
        grads = (torch.autograd.grad(total, inputs, allow_unused=True) if total.requires_grad
                 else [None] * len(inputs))
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))


def crf_viterbi(emissions: Tensor, lengths: Tensor, transitions: Tensor,
                start_transitions: Tensor, end_transitions: Tensor) -> Tuple[Tensor, Tensor]:
    """Best path per sequence: tags int64 [B, T] (-1 past each length), scores [B]."""
    validation.crf_args("crf_viterbi", emissions, lengths, transitions, start_transitions,
                        end_transitions)
    emissions, transitions, start, end = _crf_inputs(emissions, transitions, start_transitions,
                                                     end_transitions)
    B, T, K = emissions.shape
    tags = torch.full((B, T), -1, dtype=torch.long, device=emissions.device)
    if T == 0:
        return tags, emissions.new_zeros(B)
    valid = _valid_steps(lengths, T)
    score = start + emissions[:, 0]  # [B, K]
    backpointers = []  # backpointers[t - 1][b, j]: best tag at t-1 before tag j at t
    for t in range(1, T):
        step, best_prev = (score.unsqueeze(2) + transitions).max(dim=1)
        score = torch.where(valid[:, t].unsqueeze(1), step + emissions[:, t], score)
        backpointers.append(best_prev)
    best_score, current = (score + end).max(dim=1)
    last = lengths - 1
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            previous = backpointers[t].gather(1, current.unsqueeze(1)).squeeze(1)
            current = torch.where(t < last, previous, current)
        tags[:, t] = torch.where(t <= last, current, tags[:, t])
    best_score = torch.where(lengths > 0, best_score, torch.zeros_like(best_score))
    return tags, best_score


def crf_kbest(emissions: Tensor, lengths: Tensor, transitions: Tensor, start_transitions: Tensor,
              end_transitions: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k best paths, best first: tags int64 [B, k, T] and scores [B, k].

    Rows beyond the number of paths with a finite score hold tags -1 and score -inf. A sequence
    of length 0 has one path (the empty one, score 0). A sequence whose best path scores NaN or
    +inf (it reads a NaN or +inf score) has that score in every row, and tags -1.
    """
    validation.crf_k("crf_kbest", k)
    validation.crf_args("crf_kbest", emissions, lengths, transitions, start_transitions,
                        end_transitions)
    emissions, transitions, start, end = _crf_inputs(emissions, transitions, start_transitions,
                                                     end_transitions)
    B, T, K = emissions.shape
    device = emissions.device
    neg_inf = float("-inf")
    tags = torch.full((B, k, T), -1, dtype=torch.long, device=device)
    if T == 0:
        scores = emissions.new_full((B, k), neg_inf)
        scores[:, 0] = 0
        return tags, scores
    valid = _valid_steps(lengths, T)
    # score[b, j, r]: the r-th best score of a prefix ending in tag j.
    score = emissions.new_full((B, K, k), neg_inf)
    score[:, :, 0] = start + emissions[:, 0]
    prev_tag, prev_rank = [], []  # per step t >= 1: [B, k, K]
    for t in range(1, T):
        # candidates[b, i * k + r, j]: r-th best prefix ending in i, then i -> j.
        candidates = (score.unsqueeze(3) + transitions.view(1, K, 1, K)).reshape(B, K * k, K)
        best, index = candidates.topk(k, dim=1)  # [B, k, K], sorted descending
        step = best.transpose(1, 2) + emissions[:, t].unsqueeze(2)  # [B, K, k]
        score = torch.where(valid[:, t].view(B, 1, 1), step, score)
        prev_tag.append(index // k)
        prev_rank.append(index % k)
    final = (score + end.view(1, K, 1)).reshape(B, K * k)
    scores, index = final.topk(k, dim=1)  # [B, k]
    tag, rank = index // k, index % k
    last = (lengths - 1).unsqueeze(1)
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            at = (tag * k + rank).unsqueeze(2)  # index into the flattened [K, k] of step t + 1
            earlier_tag = prev_tag[t].transpose(1, 2).reshape(B, K * k, 1).gather(1, at).squeeze(2)
            earlier_rank = prev_rank[t].transpose(1, 2).reshape(B, K * k, 1).gather(1, at).squeeze(2)
            follow = t < last
            tag = torch.where(follow, earlier_tag, tag)
            rank = torch.where(follow, earlier_rank, rank)
        tags[:, :, t] = torch.where(t <= last, tag, tags[:, :, t])
    tags = torch.where(torch.isfinite(scores).unsqueeze(2), tags, torch.full_like(tags, -1))
    # The NaN / +inf contract (csrc/cpu/crf_gold_nan.h), with the best score Viterbi's. Its rows
    # above may be NaN where that is +inf: a +inf score added to the -inf of a rank that holds
    # no path yet (at step 1, each tag has one prefix), which gave NaN scores.
    best = crf_viterbi(emissions, lengths, transitions, start, end)[1]
    poisoned = ~(best < math.inf)  # NaN or +inf
    scores = torch.where(poisoned.unsqueeze(1), best.unsqueeze(1), scores)
    tags = torch.where(poisoned.view(B, 1, 1), torch.full_like(tags, -1), tags)
    # Unconditionally: a branch on any(lengths == 0) would read values (none on meta tensors).
    empty = lengths == 0
    first_row = torch.arange(k, device=device) == 0
    empty_scores = torch.where(first_row, 0.0, neg_inf).to(scores.dtype)
    scores = torch.where(empty.unsqueeze(1), empty_scores, scores)
    tags = torch.where(empty.view(B, 1, 1), torch.full_like(tags, -1), tags)
    return tags, scores


def _log_normalize(x: Tensor) -> Tensor:
    """x - logsumexp(x) over the last dim; rows that are all -inf stay -inf.

    A row holding NaN or +inf gets NaN (x - NaN; inf - inf where the +inf is). It was: a NaN
    log-sum-exp replaced by 0 (nan_to_num's default), which left the row unnormalised and gave
    a length-2 sequence with a NaN transition score "marginals" of 1.6 to 3.2."""
    log_z = _logsumexp(x, dim=-1).unsqueeze(-1)
    return x - torch.where(log_z == -math.inf, 0, log_z)


def crf_marginals(emissions: Tensor, lengths: Tensor, transitions: Tensor,
                  start_transitions: Tensor, end_transitions: Tensor) -> Tensor:
    """Posterior marginals p(y_t = j | x): [B, T, K] (zeros past each length), by forward-backward.

    Both recursions are normalised at every step (log-sum-exp over the tags subtracted), and each
    step's marginals are a softmax of alpha_t + beta_t: no value grows with T. (alpha + beta - log Z
    in absolute terms cancels two numbers of size ~T, which in float32 at T = 20000 gave
    "probabilities" up to 2.)
    """
    validation.crf_args("crf_marginals", emissions, lengths, transitions, start_transitions,
                        end_transitions)
    emissions, transitions, start, end = _crf_inputs(emissions, transitions, start_transitions,
                                                     end_transitions)
    B, T, K = emissions.shape
    if T == 0:
        return emissions.new_zeros(B, 0, K)
    valid = _valid_steps(lengths, T)
    last = lengths - 1
    alpha = _log_normalize(start + emissions[:, 0])  # [B, K]
    alphas = [alpha]
    for t in range(1, T):
        step = _log_normalize(_logsumexp(alpha.unsqueeze(2) + transitions, dim=1) + emissions[:, t])
        alpha = torch.where(valid[:, t].unsqueeze(1), step, alpha)
        alphas.append(alpha)
    # beta[b, j] at step t: log-sum of the scores of every suffix after y_t = j (end included),
    # up to a per-step constant.
    beta = end.expand(B, K)
    betas = [beta] * T
    for t in range(T - 2, -1, -1):
        step = _log_normalize(_logsumexp(transitions + (emissions[:, t + 1] + beta).unsqueeze(1), dim=2))
        beta = torch.where((t < last).unsqueeze(1), step, end.expand(B, K))
        betas[t] = beta
    # exp: -inf (a forbidden tag) gives 0, NaN stays NaN
    marginals = _log_normalize(torch.stack(alphas, dim=1) + torch.stack(betas, dim=1)).exp()
    marginals = torch.where(valid.unsqueeze(2), marginals, torch.zeros_like(marginals))
    # The NaN / +inf contract (csrc/cpu/crf_gold_nan.h): the marginals, log Z's gradient, are NaN
    # over the whole length of a sequence that reads a NaN or +inf score: the sequences with a
    # NaN marginal (finite and -inf scores give none: every step is normalised). The NaN shows
    # at some of its steps and tags only, e.g. a +inf end score's at its last step's tag alone.
    poisoned = marginals.isnan().flatten(1).any(1)
    return torch.where(poisoned.view(B, 1, 1) & valid.unsqueeze(2), math.nan, marginals)


# =============================================================================================
# Recurrent layers (LSTM / GRU / RNN)
# =============================================================================================

def _rnn_cell(mode: str, x_proj: Tensor, h: Tensor, c: Optional[Tensor], h_proj: Tensor):
    """One step of one direction: x_proj = W_ih x + b_ih [B, G*H], h_proj = W_hh h + b_hh
    [B, G*H], h / c [B, H] -> (h', c')."""
    if mode == "lstm":
        i, f, g, o = (x_proj + h_proj).chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new
    if mode == "gru":
        x_r, x_z, x_n = x_proj.chunk(3, dim=1)
        h_r, h_z, h_n = h_proj.chunk(3, dim=1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, None
    pre = x_proj + h_proj
    return (torch.relu(pre) if mode == "rnn_relu" else torch.tanh(pre)), None


def _flush_denormals(x: Tensor) -> Tensor:
    """x with its denormals made zeros of their sign (float32's: |x| < 2^-126)."""
    return torch.where(x.abs() < torch.finfo(torch.float32).tiny, x * 0, x)


def round_to_bf16(x: Tensor) -> Tensor:
    """float32 x rounded to bfloat16 and widened back: the bf16 layers' left operand of every
    product (csrc/cpu/rnn_gemm_avx512_bf16.h; vcvtne2ps2bf16 rounds so): a denormal becomes a zero
    of its sign, NaN stays NaN, +-inf stays, the rest round to nearest even as .to(torch.bfloat16)
    does."""
    return _flush_denormals(x).to(torch.bfloat16).to(x.dtype)


def rnn_layer(
    input: Tensor,
    lengths: Tensor,
    weights: list,
    hx: Optional[Tensor],
    cx: Optional[Tensor],
    mode: str,
    bidirectional: bool,
    batch_first: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One recurrent layer, both directions, with per-sequence lengths (see fastner::rnn_layer_forward).

    input: [B, T, I] if batch_first else [T, B, I]; lengths: int64 [B]; weights: torch's flat
    weights of the layer (w_ih [G*H, I], w_hh [G*H, H], (b_ih, b_hh) [G*H] per direction);
    hx / cx: [D, B, H] or None. Returns output (input's layout, D*H features, zeros past each
    length), h_n [D, B, H] and c_n ([D, B, H] for lstm, else an empty tensor). bfloat16 w_ih /
    w_hh with float32 input (fastner.nn.rnn_bf16): the bf16 layers' arithmetic, below.
    """
    validation.rnn_args("rnn_layer", input, lengths, weights, hx, cx, mode, bidirectional,
                        batch_first)
    # bf16 w_ih / w_hh (the bf16 layers, float32 input): every product multiplies bf16 by bf16
    # in float32 (round_to_bf16 on its left operand, x or h; the weights widened exactly,
    # denormals as zeros), as the kernels do; sums, gates and states stay float32.
    bf16 = bool(weights) and weights[0].dtype == torch.bfloat16
    weights = [_flush_denormals(w.to(input.dtype)) if bf16 and w.dtype == torch.bfloat16 else w.to(input.dtype)
               for w in weights]
    D = 2 if bidirectional else 1
    per_dir = len(weights) // D

    def product(d: int, which: int, x: Tensor) -> Tensor:  # x @ W^T (+ b): which 0 = ih, 1 = hh
        out = (round_to_bf16(x) if bf16 else x) @ weights[d * per_dir + which].t()
        return out + weights[d * per_dir + 2 + which] if per_dir == 4 else out

    return _rnn_layer_loop(input, lengths, product, weights[1].shape[1], hx, cx, mode, D,
                           batch_first)


def _rnn_layer_loop(input: Tensor, lengths: Tensor, product, H: int, hx: Optional[Tensor],
                    cx: Optional[Tensor], mode: str, D: int, batch_first: bool):
    """rnn_layer's time loop, with the products given: product(d, 0, x [B, T, I]) is direction
    d's projected input [B, T, G*H] and product(d, 1, h [B, H]) its W_hh h term [B, G*H],
    each with its bias."""
    x = input if batch_first else input.transpose(0, 1)  # [B, T, I]
    B, T = x.shape[0], x.shape[1]
    lengths = lengths.to(x.device)  # a CUDA input may come with CPU lengths
    steps = torch.arange(T, device=x.device)
    valid = (steps[None, :] < lengths[:, None]).unsqueeze(-1)  # [B, T, 1]
    outputs, h_last, c_last = [], [], []
    for d in range(D):
        x_proj = product(d, 0, x)
        h = hx[d] if hx is not None else x.new_zeros(B, H)
        c = None
        if mode == "lstm":
            c = cx[d] if cx is not None else x.new_zeros(B, H)
        out = [None] * T
        # The reverse direction walks time backwards; a sequence's state stays at its initial
        # value until its own last step, so it starts there.
        for t in (range(T) if d == 0 else range(T - 1, -1, -1)):
            m = valid[:, t]
            h_new, c_new = _rnn_cell(mode, x_proj[:, t], h, c, product(d, 1, h))
            h = torch.where(m, h_new, h)
            if c is not None:
                c = torch.where(m, c_new, c)
            out[t] = torch.where(m, h_new, torch.zeros_like(h_new))
        # T = 0: an empty output that is still on the graph (zero gradients, not an error).
        outputs.append(torch.stack(out, dim=1) if T else x_proj[:, :, :H] * 0)
        h_last.append(h)
        if c is not None:
            c_last.append(c)
    output = torch.cat(outputs, dim=2)
    if not batch_first:
        output = output.transpose(0, 1)
    h_n = torch.stack(h_last)
    c_n = torch.stack(c_last) if c_last else x.new_empty(0)
    return output, h_n, c_n


# int8 layers (fastner.nn.quantize(..., torch.qint8); csrc/cpu/rnn_int8.h says why 7 bits).
# Weights: symmetric 7-bit per output channel, w ~= w_q * scale[:, None]. Rows of
# the left operand: asymmetric u7 per row, quantized on every product. These functions define
# the arithmetic the kernel reproduces: the same float32 operations in the same order, the
# integer sums exact.
INT8_ACTIVATION_MAX = 127
INT8_WEIGHT_MAX = 63


def quantize_weight_int8(w: Tensor, name: str = "w") -> Tuple[Tensor, Tensor]:
    """w [N, K] float -> (w_q int8 [N, K] in [-63, 63], scale float32 [N]): w_q = round(w /
    scale) with scale = max|w[n, :]| / 63 (1 for an all-zero row). ValueError naming `name`
    where w holds NaN or +-inf (no scale represents such a row)."""
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} holds NaN or +-inf: non-finite weights cannot be quantized to int8")
    scale = w.abs().amax(dim=1) / INT8_WEIGHT_MAX if w.shape[1] else w.new_ones(w.shape[0])
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    w_q = torch.round(w / scale[:, None]).clamp(-INT8_WEIGHT_MAX, INT8_WEIGHT_MAX).to(torch.int8)
    return w_q, scale


def quantize_rows_int8(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """x [..., K] float32 -> (q int32 [..., K] in [0, 127], scale [..., 1], zero int32 [..., 1]):
    x ~= (q - zero) * scale, with the range widened to include 0. A row holding NaN or +-inf
    gets q = 0, scale 1, zero 0 (a zero product: int8_product gives it its float one)."""
    finite = nonfinite_rows(x).logical_not()  # [..., 1]
    x = torch.where(finite, x, torch.zeros_like(x))
    zero_f = x.new_zeros(())
    lo = torch.minimum(x.amin(dim=-1, keepdim=True), zero_f) if x.shape[-1] else x.new_zeros(*x.shape[:-1], 1)
    hi = torch.maximum(x.amax(dim=-1, keepdim=True), zero_f) if x.shape[-1] else lo
    scale = (hi - lo) / INT8_ACTIVATION_MAX
    # A range past float's max: divided first. A tiny range: at least the smallest normal
    # float, so that 1 / scale stays finite. An all-zero row: scale 1.
    scale = torch.where(scale.isinf(), hi / INT8_ACTIVATION_MAX - lo / INT8_ACTIVATION_MAX, scale)
    scale = torch.where(scale > 0, scale.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(scale))
    inv = 1.0 / scale
    zero = torch.round(-lo * inv).clamp(0, INT8_ACTIVATION_MAX).to(torch.int32)
    # |x * inv| <= ~127: the conversion is exact.
    q = (torch.round(x * inv).to(torch.int32) + zero).clamp(0, INT8_ACTIVATION_MAX)
    return q, scale, zero


def nonfinite_rows(x: Tensor) -> Tensor:
    """x [..., K] -> bool [..., 1]: the rows holding NaN or +-inf (one check for the int8
    products: quantize_rows_int8 and int8_product)."""
    return torch.isfinite(x).logical_not().any(dim=-1, keepdim=True)


def int8_product_nonfinite(x: Tensor, w_q: Tensor) -> Tensor:
    """The product of rows holding NaN or +-inf, x [..., K] @ W^T with W's signs w_q [N, K]
    -> [..., N], as float arithmetic gives it whatever the finite entries: NaN where the row
    has a NaN, or an inf meets a zero weight (inf * 0), or +inf and -inf terms meet; else the
    infinite terms' sign. (Finite rows: any value; int8_product takes this only where
    nonfinite_rows.)"""
    def hits(a: Tensor, b: Tensor) -> Tensor:  # any k with a[..., k] and b[n, k]
        return (a.to(torch.float32) @ b.to(torch.float32).t()) > 0

    pos_x, neg_x = x == float("inf"), x == float("-inf")
    pos_w, neg_w = w_q > 0, w_q < 0
    pos = hits(pos_x, pos_w) | hits(neg_x, neg_w)
    neg = hits(pos_x, neg_w) | hits(neg_x, pos_w)
    nan = hits(pos_x | neg_x, w_q == 0) | (pos & neg) | x.isnan().any(dim=-1, keepdim=True)
    inf = torch.full_like(pos, float("inf"), dtype=torch.float32)
    return torch.where(nan, torch.full_like(inf, float("nan")), torch.where(pos, inf, -inf))


def int8_product(x: Tensor, w_q: Tensor, scale: Tensor) -> Tensor:
    """x [..., K] float32 @ (w_q * scale[:, None])^T with x quantized per row: float(sum_k (q -
    zero) w_q) * (x_scale * scale), the integer sum exact. -> [..., N] float32. Rows holding
    NaN or +-inf: int8_product_nonfinite (NaN and inf propagate as in a float product)."""
    x = x.float()
    q, x_scale, zero = quantize_rows_int8(x)
    acc = (q.to(torch.int64) - zero.to(torch.int64)) @ w_q.to(torch.int64).t()
    out = acc.to(torch.float32) * (x_scale * scale)
    bad = nonfinite_rows(x)
    # traced (torch.export of the reference path) there are no values to branch on: the graph
    # always takes the non-finite rows' product
    if not validation._reads_values(x) or bool(bad.any()):
        out = torch.where(bad, out + int8_product_nonfinite(x, w_q), out)
    return out


# The packed form of an int8 weight (fastner::rnn_int8_pack; the layout is documented in
# csrc/cpu/rnn_int8.h): an int8 tensor of bytes, a 64-byte header (8 int64: the magic, N, K,
# groups, panels, total bytes, 0, 0), the weights in panels of 16 output channels x groups of 4
# k, the column sums (int32) and the scales (float32), each padded to whole panels with zeros.
# rnn_int8_pack here writes the kernel's bytes exactly (a test compares them) and
# rnn_int8_unpack reads them back exactly.
INT8_PACK_MAGIC = 0x31304B5038494E46  # b"FNI8PK01" as a little-endian int64 (format version 01)
INT8_PACK_HEADER_BYTES = 64
INT8_PANEL = 16


def int8_pack_layout(n: int, k: int) -> Tuple[int, int, int, int, int]:
    """(groups, panels, column sums' offset, scales' offset, total bytes) of a packed [n, k]
    weight: groups = 2 * ceil(k / 8), panels = ceil(n / 16)."""
    groups, panels = (k + 7) // 8 * 2, (n + INT8_PANEL - 1) // INT8_PANEL
    colsum_at = INT8_PACK_HEADER_BYTES + panels * groups * 64
    scale_at = colsum_at + panels * INT8_PANEL * 4
    return groups, panels, colsum_at, scale_at, scale_at + panels * INT8_PANEL * 4


def int8_packed_bytes(n: int, k: int) -> int:
    """The size in bytes (int8 elements) of a packed [n, k] weight."""
    return int8_pack_layout(n, k)[4]


def _int8_pack_header(n: int, k: int) -> list:
    groups, panels, _, _, total = int8_pack_layout(n, k)
    return [INT8_PACK_MAGIC, n, k, groups, panels, total, 0, 0]


def rnn_int8_pack(weight: Tensor, scale: Tensor) -> Tensor:
    """weight int8 [N, K] in [-63, 63], scale float32 [N] -> the packed weight, int8
    [int8_packed_bytes(N, K)] (torch.ops.fastner.rnn_int8_pack's contract and bytes)."""
    validation.rnn_int8_pack_args("rnn_int8_pack", weight, scale)
    n, k = weight.shape
    groups, panels, _, _, _ = int8_pack_layout(n, k)
    padded = weight.new_zeros(panels * INT8_PANEL, groups * 4)
    padded[:n, :k] = weight
    # channel 16p + 8h + c, k 4g + b -> [p, g, h, c, b]
    panel_bytes = padded.reshape(panels, 2, 8, groups, 4).permute(0, 3, 1, 2, 4).reshape(-1)
    colsum = torch.zeros(panels * INT8_PANEL, dtype=torch.int32, device=weight.device)
    colsum[:n] = weight.sum(dim=1, dtype=torch.int32)
    scales = torch.zeros(panels * INT8_PANEL, dtype=torch.float32, device=weight.device)
    scales[:n] = scale
    header = torch.tensor(_int8_pack_header(n, k), dtype=torch.int64, device=weight.device)
    return torch.cat([header.view(torch.int8), panel_bytes, colsum.view(torch.int8), scales.view(torch.int8)])


def rnn_int8_unpack(packed: Tensor, n: int, k: int, name: str = "packed") -> Tuple[Tensor, Tensor]:
    """The packed weight of a [n, k] int8 weight -> (weight int8 [n, k], scale float32 [n]),
    exactly what rnn_int8_pack was given. ValueError naming `name` for a tensor that is not the
    packed form of a [n, k] weight (dtype, size; header where values can be read). The column
    sums are not read: they are sum_k weight by construction."""
    validation.int8_packed_arg("rnn_int8_unpack", name, packed, n, k)
    groups, panels, colsum_at, scale_at, total = int8_pack_layout(n, k)
    if packed.storage_offset() % 4 or not packed.is_contiguous():
        packed = packed.clone(memory_format=torch.contiguous_format)  # .view(float32) needs 4-byte alignment
    weight = (packed[INT8_PACK_HEADER_BYTES:colsum_at].reshape(panels, groups, 2, 8, 4)
              .permute(0, 2, 3, 1, 4).reshape(panels * INT8_PANEL, groups * 4)[:n, :k])
    scale = packed[scale_at:total].view(torch.float32)[:n]
    return weight, scale


def rnn_layer_int8(
    input: Tensor,
    lengths: Tensor,
    weights: list,
    hidden_size: int,
    hx: Optional[Tensor],
    cx: Optional[Tensor],
    mode: str,
    bidirectional: bool,
    batch_first: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """rnn_layer with both products in int8 (see fastner::rnn_layer_int8_forward): weights has
    per direction the packed w_ih, w_hh (rnn_int8_pack) and float32 biases; hidden_size H."""
    validation.rnn_int8_args("rnn_layer_int8", input, lengths, weights, hidden_size, hx, cx, mode,
                             bidirectional, batch_first)
    D = 2 if bidirectional else 1
    per_dir = len(weights) // D
    GH, I = validation.RNN_GATES[mode] * hidden_size, input.shape[2]
    unpacked = [[rnn_int8_unpack(weights[d * per_dir + which], GH, (I, hidden_size)[which],
                                 f"{('w_ih', 'w_hh')[which]} of direction {d}") for which in (0, 1)]
                for d in range(D)]

    def product(d: int, which: int, x: Tensor) -> Tensor:
        out = int8_product(x, *unpacked[d][which])
        return out + weights[d * per_dir + 2 + which] if per_dir == 4 else out

    return _rnn_layer_loop(input, lengths, product, hidden_size, hx, cx, mode, D, batch_first)


# =============================================================================================
# Character CNN
# =============================================================================================


def char_conv_max(input: Tensor, valid: Tensor, weight: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
    """A word's character features: conv1d over its characters, then the maximum over the valid
    ones (torch.ops.fastner.char_conv_max's contract, csrc/fastner.cpp).

    input: [N, C, I]; valid: bool [N, C]; weight: [F, I, W] (W odd, zero padding W // 2);
    bias: [F]. Returns output [N, F] (0 for a word without valid characters) and argmax int64
    [N, F] (the first maximal position; -1 for such a word).
    """
    validation.char_conv_args("char_conv_max", input, valid, weight, bias)
    if input.shape[1] == 0:  # no characters at all: one invalid position keeps the graph whole
        input = torch.nn.functional.pad(input, (0, 0, 0, 1))
        valid = valid.new_zeros(input.shape[0], 1)
    conv = torch.nn.functional.conv1d(input.transpose(1, 2), weight, bias, padding=weight.shape[2] // 2)
    output, argmax = conv.masked_fill(~valid.unsqueeze(1), float("-inf")).max(dim=2)  # [N, F]
    any_valid = valid.any(dim=1, keepdim=True)
    return (torch.where(any_valid, output, torch.zeros_like(output)),
            torch.where(any_valid, argmax, torch.full_like(argmax, -1)))


def char_embed_conv_max(chars: Tensor, words: Tensor, embedding: Tensor, weight: Tensor, bias: Tensor,
                        pad_id: int) -> Tensor:
    """char_conv_max's output for embedded characters, by its definition (the contract of
    torch.ops.fastner.char_embed_conv_max, csrc/fastner.cpp): for each word n marked in words,
    char_conv_max(embedding[chars[n]], chars[n] != pad_id, weight, bias)[0]; 0 for the others.

    chars: int64 [..., C]; words: bool [...]; embedding: [V, I]; weight: [F, I, W]; bias: [F].
    Returns [..., F].
    """
    validation.char_embed_args("char_embed_conv_max", chars, words, embedding, weight, bias, pad_id)
    flat_chars, flat_words = chars.flatten(0, -2), words.flatten()  # [N, C], [N]
    output = embedding.new_zeros(flat_words.shape[0], weight.shape[0])
    marked = flat_words.nonzero().squeeze(1)
    read = flat_chars[marked]  # [M, C], each in [0, V)
    output[marked] = char_conv_max(embedding[read], read != pad_id, weight, bias)[0]
    return output.view(*chars.shape[:-1], weight.shape[0])


# =============================================================================================
# Linear over a mask's rows
# =============================================================================================

def masked_linear(input: Tensor, mask: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """input[b, t] @ weight^T + bias where mask[b, t], bias (zeros without one) elsewhere, whose
    input rows are not read (the contract of torch.ops.fastner.masked_linear, csrc/fastner.cpp).

    input: [B, T, I]; mask: bool [B, T]; weight: [K, I]; bias: [K] or None. Returns [B, T, K],
    contiguous.
    """
    validation.masked_linear_args("masked_linear", input, mask, weight, bias)
    B, T, I = input.shape
    K = weight.shape[0]
    rows = mask.reshape(-1).nonzero().squeeze(1)  # the marked rows of input viewed as [B*T, I]
    fill = bias if bias is not None else input.new_zeros(K)
    output = fill.expand(B, T, K).contiguous()
    marked = torch.nn.functional.linear(input.reshape(B * T, I).index_select(0, rows), weight, bias)
    return output.view(B * T, K).index_copy_(0, rows, marked).view(B, T, K)


# =============================================================================================
# Dropout masks
# =============================================================================================
_SPLITMIX_GAMMA = 0x9E3779B97F4A7C15 - 2**64  # splitmix64's constants as int64 (two's complement)
_SPLITMIX_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_SPLITMIX_MIX2 = 0x94D049BB133111EB - 2**64


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical (unsigned) right shift of int64 values: torch's >> is arithmetic."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def dropout_mask(input: Tensor, p: float, seed: int) -> Tensor:
    """A dropout mask shaped and typed like `input` (torch.ops.fastner.dropout_mask's contract,
    csrc/fastner.cpp; the rule in csrc/cpu/dropout.cpp): element j is 1 / (1 - p) when 32-bit
    word j of splitmix64(seed) is >= round(p * 2^32), else 0. Integer ops wrap modulo 2^64, as
    the kernel's uint64 arithmetic does."""
    validation.dropout_args("dropout_mask", input, p, seed)
    n = input.numel()
    z = torch.arange(1, (n + 1) // 2 + 1, dtype=torch.int64, device=input.device) * _SPLITMIX_GAMMA + seed
    z = (z ^ _shift_right(z, 30)) * _SPLITMIX_MIX1
    z = (z ^ _shift_right(z, 27)) * _SPLITMIX_MIX2
    z = z ^ _shift_right(z, 31)
    words = torch.stack([z & 0xFFFFFFFF, _shift_right(z, 32)], dim=1).reshape(-1)[:n]  # [n] in [0, 2^32)
    keep = words >= math.floor(p * 4294967296.0 + 0.5)
    # 1 / (1 - p) in float64 for float64 masks, else rounded to float32 first (as the kernel);
    # chosen, not multiplied: in float16 it can overflow to inf, and 0 * inf would be NaN
    kept = torch.tensor(1.0 / (1.0 - p), dtype=torch.float64 if input.dtype == torch.float64 else torch.float32)
    return torch.where(keep, kept.to(input.dtype), torch.zeros((), dtype=input.dtype)).reshape(input.shape)
