"""Training: Ma & Hovy's recipe by default, early stopping on dev F1, resumable, reproducible.

Defaults: SGD lr 0.015, momentum 0.9, lr_t = lr / (1 + 0.05 t) per epoch t, batches of 10,
gradient-norm clipping at 5.0, dropout 0.5, BIOES tags, 200 hidden units per direction.

Everything random (initialisation, dropout, batch order) comes from one seed, and the run's
state (weights, optimiser, RNG states, history) is checkpointed after every epoch, so a resumed
run continues exactly as an uninterrupted one would.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastner import distributed
from fastner.data.batching import bucket_batches, encode_sentences, make_batch
from fastner.data.conll import Sentence
from fastner.data.schemes import canonical_scheme, convert_tags, detect_scheme, split_tag
from fastner.data.vocab import Vocab, normalize_digits
from fastner.embeddings import embedding_matrix, frozen_table, load_pretrained
from fastner.models.tagger import ModelConfig, SequenceTagger
from fastner.tagger import CONFIG_FILE, Tagger, atomic_torch_save, atomic_write_json

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "training.json"


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 10
    optimizer: str = "sgd"  # or "adam"
    lr: Optional[float] = None  # default 0.015 for SGD, 0.001 for Adam
    momentum: float = 0.9
    lr_decay: float = 0.05
    clip: float = 5.0
    patience: int = 10  # epochs without a better dev F1 before stopping
    seed: int = 42
    scheme: str = "BIOES"  # the scheme the model predicts in
    embeddings: str = "none"  # 'glove', 'none' or a vectors file
    word_dim: int = 100  # used when embeddings='none'
    digits_to_zero: bool = False
    eval_batch_size: int = 64
    device: str = "cpu"
    model: Dict = field(default_factory=dict)  # ModelConfig overrides: encoder, head, hidden, ...

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr is None:
            self.lr = 0.015 if self.optimizer == "sgd" else 0.001
        self.scheme = canonical_scheme(self.scheme)
        for name in ("epochs", "batch_size", "patience"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def tag_vocabulary(sentences: Sequence[Sentence], scheme: str) -> Vocab:
    """'O' then, per entity type (sorted), every prefix of `scheme`: constraints need them all."""
    kinds = sorted({split_tag(t)[1] for s in sentences for t in s.tags} - {""})
    prefixes = {"IOB1": "BI", "IOB2": "BI", "BIOES": "BIES"}[canonical_scheme(scheme)]
    return Vocab(["O"] + [f"{p}-{k}" for k in kinds for p in prefixes], specials=())


def build_vocabularies(train: Sequence[Sentence], scheme: str, digits_to_zero: bool):
    """Words, chars and tags, from the training data alone: dev and test data never shape a model
    (words outside training still get their pretrained vectors, from the frozen table)."""
    norm = normalize_digits if digits_to_zero else (lambda w: w)
    words = Vocab.from_counts(Counter(norm(t) for s in train for t in s.tokens), min_count=0)
    chars = Vocab.from_counts(Counter(c for s in train for t in s.tokens for c in t))
    return words, chars, tag_vocabulary(train, scheme)


class Progress:
    """A one-line progress display on stderr (redrawn on a terminal, occasional lines otherwise)."""

    def __init__(self, stream=None, every_s: float = 0.5):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = every_s if self.tty else 30.0
        self.last = 0.0

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(model.parameters(), lr=config.lr)


def _epoch_lr(config: TrainConfig, epoch: int) -> float:
    if config.optimizer == "sgd":
        return config.lr / (1.0 + config.lr_decay * epoch)
    return config.lr


def evaluate_tagger(tagger: Tagger, sentences: Sequence[Sentence], batch_size: int) -> dict:
    return tagger.evaluate(sentences, batch_size) if sentences else {"f1": 0.0, "precision": 0.0, "recall": 0.0, "accuracy": 0.0}


def train(train_data: Sequence[Sentence], dev_data: Sequence[Sentence], out_dir: str, config: TrainConfig,
          test_data: Optional[Sequence[Sentence]] = None, resume: bool = False,
          log: Optional[Callable[[str], None]] = None, progress: Optional[Progress] = None) -> dict:
    """Train a tagger into `out_dir` (the best dev-F1 model, a Tagger directory) and return the
    summary {'best_epoch', 'best_dev', 'history', 'test' (when test_data)}."""
    if not train_data:
        raise ValueError("the training data holds no sentences")
    output_scheme = detect_scheme(s.tags for s in train_data)
    dist = distributed.setup(config.device)  # torchrun's process group, or a single process
    device = dist.device
    log = (log or (lambda text: print(text, file=sys.stderr, flush=True))) if dist.is_main else (lambda text: None)
    progress = (progress or Progress()) if dist.is_main else Progress(distributed.discard_stream())
    os.makedirs(out_dir, exist_ok=True)
    checkpoint_path = os.path.join(out_dir, CHECKPOINT_FILE)

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    state = None
    if resume:
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {checkpoint_path}")
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        saved = Tagger.load(out_dir, device="cpu") if os.path.isfile(os.path.join(out_dir, CONFIG_FILE)) else None
        if saved is None:
            raise FileNotFoundError(f"--resume: {out_dir} holds a checkpoint but no tagger files")
        words, chars, tags = saved.words, saved.chars, saved.tags
        model, pretrained_words = saved.model, saved.pretrained_words
        model.load_state_dict(state["model"])
    else:
        pretrained = load_pretrained(config.embeddings)
        words, chars, tags = build_vocabularies(train_data, config.scheme, config.digits_to_zero)
        word_dim = pretrained.dim if pretrained is not None else config.word_dim
        init = torch.Generator().manual_seed(config.seed)
        weights, hits = embedding_matrix(words, pretrained, word_dim, init)
        frozen, pretrained_words = (frozen_table(pretrained), pretrained.words) if pretrained is not None else (None, None)
        if pretrained is not None:
            log(f"embeddings: {hits}/{len(words)} training words found in {config.embeddings}; "
                f"{len(pretrained_words)} pretrained vectors kept frozen for every other word")
        model_config = ModelConfig(num_words=len(words), num_chars=len(chars), tags=list(tags.itos), scheme=config.scheme,
                                   word_dim=word_dim, word_pad=words.pad_id, char_pad=chars.pad_id,
                                   pretrained_rows=0 if frozen is None else len(pretrained_words), **config.model)
        model = SequenceTagger(model_config, weights, frozen)
    model.to(device)
    trainer = dist.wrap(model)  # forward(batch tensors) -> loss; DDP when several processes
    tagger = Tagger(model, words, chars, tags, output_scheme, config.digits_to_zero, device, pretrained_words)

    train_tagged = [Sentence(s.tokens, convert_tags(s.tags, config.scheme)) for s in train_data if s.tokens]
    encoded = encode_sentences(train_tagged, words, chars, tags, config.digits_to_zero)
    lengths = [len(e.words) for e in encoded]
    total_tokens = sum(lengths)

    optimizer = _make_optimizer(model, config)
    history: List[dict] = []
    best_f1, best_epoch, bad_epochs, start_epoch = -1.0, -1, 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
        best_f1, best_epoch, bad_epochs = float(state["best_f1"]), int(state["best_epoch"]), int(state["bad_epochs"])
        start_epoch = int(state["epoch"]) + 1
        rng.setstate(_tuples(state["python_rng"]))
        torch.set_rng_state(state["torch_rng"])
        log(f"resuming after epoch {start_epoch} (best dev F1 {best_f1:.2f} at epoch {best_epoch + 1})")

    for epoch in range(start_epoch, config.epochs):
        if bad_epochs >= config.patience:
            break
        lr = _epoch_lr(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        dist.seed_epoch(config.seed, epoch)
        started = time.perf_counter()
        loss_sum, tokens_done = 0.0, 0
        batches = dist.shard(bucket_batches(lengths, config.batch_size, shuffle=True, rng=rng))
        for number, index in enumerate(batches, start=1):
            batch = make_batch(encoded, index, words.pad_id, chars.pad_id).to(device)
            loss = distributed.loss_of(trainer, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            loss_value = loss.item()  # also the sync that keeps the progress line honest
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"epoch {epoch + 1}, batch {number}: the loss is {loss_value}; try a smaller --lr")
            loss_sum += loss_value
            tokens_done += int(batch.lengths.sum())
            elapsed = time.perf_counter() - started
            progress.update(
                f"epoch {epoch + 1}/{config.epochs} [{number}/{len(batches)}] loss {loss_sum / tokens_done:.4f}/token "
                f"{tokens_done / max(elapsed, 1e-9):,.0f} tokens/s",
                force=number == len(batches),
            )
        train_seconds = time.perf_counter() - started
        loss_sum, tokens_done = dist.all_sum([loss_sum, tokens_done])
        # rank 0 evaluates; every rank takes its result, so all decide alike when to stop
        dev = dist.broadcast(evaluate_tagger(tagger, dev_data, config.eval_batch_size) if dist.is_main else None)
        epoch_seconds = time.perf_counter() - started
        improved = dev["f1"] > best_f1
        if improved:
            best_f1, best_epoch, bad_epochs = dev["f1"], epoch, 0
            if dist.is_main:
                tagger.save(out_dir)
        else:
            bad_epochs += 1
        record = {
            "epoch": epoch + 1, "lr": lr, "loss_per_token": loss_sum / max(tokens_done, 1),
            "dev_f1": dev["f1"], "dev_precision": dev["precision"], "dev_recall": dev["recall"],
            "dev_accuracy": dev["accuracy"], "train_seconds": train_seconds,
            "tokens_per_s": total_tokens / max(train_seconds, 1e-9),
            # wall time since the run began, dev evaluation included (summed over resumed parts)
            "elapsed_seconds": (history[-1]["elapsed_seconds"] if history else 0.0) + epoch_seconds,
        }
        history.append(record)
        progress.done(
            f"epoch {epoch + 1}/{config.epochs}: loss {record['loss_per_token']:.4f}/token, "
            f"{record['tokens_per_s']:,.0f} tokens/s, {train_seconds:.1f} s, dev F1 {dev['f1']:.2f}"
            + (" (best)" if improved else f" (best {best_f1:.2f} at epoch {best_epoch + 1})")
        )
        if dist.is_main:
            atomic_torch_save(
                {
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch, "best_f1": best_f1, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                    "history": history, "python_rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                },
                checkpoint_path,
            )
            atomic_write_json({"config": asdict(config), "history": history, "best_epoch": best_epoch + 1,
                               "best_dev_f1": best_f1}, os.path.join(out_dir, HISTORY_FILE))
    if bad_epochs >= config.patience:
        log(f"stopped early: no better dev F1 for {config.patience} epochs")

    summary = {"best_epoch": best_epoch + 1, "best_dev_f1": best_f1, "history": history}
    if test_data:
        best = Tagger.load(out_dir, device=device) if dist.is_main else None
        summary["test"] = dist.broadcast(evaluate_tagger(best, test_data, config.eval_batch_size) if dist.is_main else None)
        log(f"test F1 {summary['test']['f1']:.2f} (best dev epoch {best_epoch + 1})")
    if dist.is_main:
        atomic_write_json({"config": asdict(config), **summary}, os.path.join(out_dir, HISTORY_FILE))
    dist.cleanup()  # waits for rank 0's writes before any rank returns
    return summary


def _tuples(value):
    # torch.load gives lists back where random.getstate() had tuples
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
