"""Whole-tagger rows: sentences/s of the BiLSTM-CNN-CRF for training steps (forward, backward,
clipping, SGD step) and for inference (forward + Viterbi), fastner against the same model on
torch.nn layers (packed) and pytorch-crf, weights shared, on CoNLL-like batches."""
from __future__ import annotations

import copy
import random
from typing import Callable, List

import torch

from fastner.bench.rows import Context, GroupSkipped, Row, close, describe_error
from fastner.bench.workloads import LENGTHS_NOTE, mask_from_lengths, sentence_batches

TITLE = ("Whole tagger: fastner vs the same model on nn.LSTM (packed) + pytorch-crf, weights "
         "shared (sentences/s)")
ENTITY_TYPES = ("PER", "ORG", "LOC", "MISC")
TAGS = ["O"] + [f"{prefix}-{kind}" for kind in ENTITY_TYPES for prefix in "BIES"]  # BIOES, 17
NUM_WORDS = 20000
NUM_CHARS = 90
MEAN_WORD_CHARS = 5.5  # CoNLL-2003 English tokens average about 5.5 characters
MAX_WORD_CHARS = 20
SGD = {"lr": 0.015, "momentum": 0.9}  # Ma & Hovy's recipe
CLIP_NORM = 5.0


def fastner_tagger(device: torch.device):
    """fastner's default tagger (LSTM encoder, CRF head) and its Batch class."""
    try:
        from fastner.data import Batch
        from fastner.models import ModelConfig, SequenceTagger
    except ImportError as err:
        raise GroupSkipped(f"the tagger (fastner.models.SequenceTagger) is not available "
                           f"({describe_error(err)})") from None
    config = ModelConfig(num_words=NUM_WORDS, num_chars=NUM_CHARS, tags=list(TAGS), scheme="BIOES")
    return SequenceTagger(config).to(device), Batch


def run(ctx: Context, build: Callable = fastner_tagger) -> None:
    """`build(device) -> (model, batch_class)`; the model has loss(batch) and predict(batch)."""
    try:
        from fastner.bench.baselines import torch_baseline
    except ImportError as err:
        raise GroupSkipped(f"the baseline needs pytorch-crf (torchcrf) ({describe_error(err)})") from None
    torch.manual_seed(23)
    model, batch_class = build(ctx.device)
    if torch_baseline(model)[1] == 0:
        raise GroupSkipped("the tagger has no fastner LSTM/GRU/RNN/CRF module to compare against torch")
    ctx.notes.append("pytorch-crf has no transition constraints: the baseline CRF runs unconstrained")
    plan = ctx.plan
    batchings = ("random",) if plan.quick else ("random", "bucketed")
    for batching in batchings:
        for mode, batch_size in (("training", plan.tagger_train_batch),
                                 ("inference", plan.tagger_infer_batch)):
            batches = make_batches(batch_class, plan.tagger_batches, batch_size, batching,
                                   seed=31 + batch_size, device=ctx.device)
            # Fresh copies per row: training rows move the weights, and apart.
            fast = copy.deepcopy(model)
            base, _ = torch_baseline(model)
            _row(ctx, fast, base, mode, batching, batch_size, batches)


def _row(ctx: Context, fast, base, mode: str, batching: str, batch_size: int, batches) -> None:
    sentences = sum(int(b.lengths.numel()) for b in batches)
    tokens = sum(int(b.lengths.sum()) for b in batches)
    padded = sum(int(b.mask.numel()) for b in batches)
    shape = {"batch_size": batch_size, "batches": len(batches), "sentences": sentences,
             "tokens": tokens, "padding": round(1 - tokens / padded, 3), "batching": batching,
             "lengths": LENGTHS_NOTE.replace("longest sentence = T", "T = longest in the batch"),
             "tags": len(TAGS)}
    row = Row(str(ctx.device), "tagger", f"tagger_{mode}", shape)
    row.info["unit"] = "one pass over all batches"
    try:
        row.check = _check(fast, base, batches)
        if mode == "training":
            calls = {"fastner": _training(fast, batches), "torch+pytorch-crf": _training(base, batches)}
            baselines = ["torch+pytorch-crf"]
        else:
            calls = {"fastner": _inference(fast, batches), "torch+pytorch-crf": _inference(base, batches)}
            models, skipped = _quantized_models(fast, base)
            row.info.update(skipped)
            if models:
                check, row.info["relative_error_vs_fp32"] = _precision_check(fast, base, models, batches)
                row.check = check if row.check == "ok" else f"{row.check}; {check}"
            calls.update({name: _inference(model, batches) for name, model in models.items()})
            baselines = ["torch+pytorch-crf", "torch+pytorch-crf.int8"]
        ctx.compare(row, calls, baselines=[b for b in baselines if b in calls])
        for result in row.results:
            result.extra["sentences_per_s"] = sentences / result.stats.median
            result.extra["tokens_per_s"] = tokens / result.stats.median
    except Exception as err:  # a broken implementation is reported in its row, the run goes on
        row.error = describe_error(err)
    ctx.emit(row)


def _quantized_models(fast, base):
    """The reduced-precision models (CPU): fastner's at int8 (and bf16 where its kernels exist:
    fastner.nn.quantize) and the torch model with its nn.LSTM / nn.GRU quantized by torch
    (quantize_dynamic), as {name: model}, and {name: why skipped}."""
    models, skipped = {}, {}
    if next(fast.parameters()).device.type != "cpu":
        return models, {"quantized": "skipped: the int8 / bf16 layers run on the CPU"}
    from fastner.bench.baselines import quantized_torch_baseline
    from fastner.nn import quantize

    models["fastner.int8"] = quantize(copy.deepcopy(fast), torch.qint8)
    try:
        models["fastner.bf16"] = quantize(copy.deepcopy(fast), torch.bfloat16)
    except NotImplementedError as err:
        skipped["fastner.bf16"] = f"skipped: {err}"
    torch_int8, quantized_layers = quantized_torch_baseline(base)
    if quantized_layers == 0:
        raise ValueError("the torch baseline has no nn.LSTM / nn.GRU for quantize_dynamic: its int8 "
                         "model would be the fp32 one")
    models["torch+pytorch-crf.int8"] = torch_int8
    return models, skipped


def _precision_check(fast, base, models, batches):
    """Each reduced-precision model's emission scores against its own fp32 model's (fastner's
    against fastner fp32, torch's int8 against torch fp32) on the row's batches: ("ok" or what is
    wrong, {name: relative Frobenius error}). Wrong: a fastner int8 error over INT8_RTOL, or an
    error of exactly 0, a model that is not running in reduced precision at all (torch's
    quantize_dynamic passing over a layer did that once)."""
    from fastner.bench.rnn_rows import INT8_RTOL

    def emissions(model):
        model.eval()
        with torch.no_grad():
            return torch.cat([model.emissions(b.words, b.chars, b.lengths, b.mask)[b.mask] for b in batches])

    if getattr(fast, "emissions", None) is None:
        return "n/a", {}
    reference = {"fastner": emissions(fast), "torch+pytorch-crf": emissions(base)}
    errors = {}
    for name, model in models.items():
        want = reference[name.rsplit(".", 1)[0]]
        errors[name] = float((emissions(model) - want).norm() / want.norm())
    bad = [f"{name} {err:.2%} (over {INT8_RTOL:.0%})" for name, err in errors.items()
           if name == "fastner.int8" and err > INT8_RTOL]
    bad += [f"{name} equals its fp32 model (not quantized)" for name, err in errors.items() if err == 0.0]
    return ("mismatch: " + ", ".join(bad)) if bad else "ok", errors


def _training(model, batches) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), **SGD)

    def epoch() -> None:
        model.train()
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            model.loss(batch).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
            optimizer.step()
    return epoch


def _inference(model, batches) -> Callable[[], None]:
    def predict_all() -> None:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model.predict(batch)
    return predict_all


def _check(fast, base, batches) -> str:
    """Same weights, same code: the emission scores must agree."""
    emissions = getattr(fast, "emissions", None)
    if emissions is None:
        return "n/a"
    fast.eval()
    base.eval()
    with torch.no_grad():
        for batch in batches:
            args = (batch.words, batch.chars, batch.lengths, batch.mask)
            got, want = fast.emissions(*args), base.emissions(*args)
            if not close(got, want):
                return f"mismatch: emissions differ by up to {float((got - want).abs().max()):.3g}"
    return "ok"


def make_batches(batch_class, count: int, batch_size: int, batching: str, seed: int,
                 device: torch.device) -> List[object]:
    """`count` batches of random sentences: word and char ids random, BIOES tags valid.

    'random' keeps sentences in draw order (each batch padded to its longest); 'bucketed'
    sorts them by length first, like length-bucketed training batches.
    """
    lengths = torch.cat(sentence_batches(count, batch_size, seed=seed))
    if batching == "bucketed":
        lengths = lengths.sort().values
    elif batching != "random":
        raise ValueError(f"batching must be 'random' or 'bucketed', got {batching!r}")
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start:start + batch_size]
        batches.append(_batch(batch_class, chunk, rng, generator).to(device))
    return batches


def _batch(batch_class, lengths: torch.Tensor, rng: random.Random, generator: torch.Generator):
    batch, time_len = len(lengths), int(lengths.max())
    mask = mask_from_lengths(lengths, time_len)  # [B, T]
    words = torch.randint(1, NUM_WORDS, (batch, time_len), generator=generator) * mask
    word_chars = [[_word_length(rng) for _ in range(time_len)] for _ in range(batch)]
    char_len = max(max(row) for row in word_chars)
    char_mask = torch.arange(char_len) < torch.tensor(word_chars).unsqueeze(-1)  # [B, T, C]
    char_mask &= mask.unsqueeze(-1)
    chars = torch.randint(1, NUM_CHARS, (batch, time_len, char_len), generator=generator) * char_mask
    tags = torch.zeros(batch, time_len, dtype=torch.long)
    for index, length in enumerate(lengths.tolist()):
        tags[index, :length] = torch.tensor(_bioes_tags(length, rng))
    return batch_class(words, chars, lengths.clone(), mask, tags, list(range(batch)))


def _word_length(rng: random.Random) -> int:
    return min(MAX_WORD_CHARS, 1 + int(rng.expovariate(1.0 / (MEAN_WORD_CHARS - 1))))


def _bioes_tags(length: int, rng: random.Random) -> List[int]:
    """A valid BIOES sequence (about 1 token in 6 inside an entity, as in CoNLL-2003)."""
    index = {tag: i for i, tag in enumerate(TAGS)}
    out: List[int] = []
    while len(out) < length:
        if rng.random() < 0.9:
            out.append(index["O"])
            continue
        kind = rng.choice(ENTITY_TYPES)
        span = min(length - len(out), rng.choice((1, 1, 2, 2, 3)))
        if span == 1:
            out.append(index[f"S-{kind}"])
        else:
            out += [index[f"B-{kind}"]] + [index[f"I-{kind}"]] * (span - 2) + [index[f"E-{kind}"]]
    return out

