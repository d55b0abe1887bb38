"""Training: Ma & Hovy's recipe by default, early stopping on dev F1, resumable, reproducible.

Defaults: SGD lr 0.015, momentum 0.9, lr_t = lr / (1 + 0.05 t) per epoch t, batches of 10,
gradient-norm clipping at 5.0, dropout 0.5, BIOES tags, 200 hidden units per direction.

Everything random (initialisation, dropout, batch order) comes from one seed, and the run's
state (weights, optimiser, RNG states, history) is checkpointed after every epoch, so a resumed
run continues exactly as an uninterrupted one would.
"""
from __future__ import annotations

import io
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
from fastner.embeddings import Pretrained, embedding_matrix, load_pretrained
from fastner.models.tagger import ModelConfig, SequenceTagger
from fastner.storage import MANIFEST_FILE, StorageError, json_bytes, read_file_set, torch_bytes, write_file_set
from fastner.tagger import CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE, Tagger

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "training.json"
# what a directory holds once a run has saved into it: a new run must not overwrite these unasked
RUN_FILES = (CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE, CHECKPOINT_FILE, MANIFEST_FILE)
# settings a resumed run may change: how long it runs and where; every other setting is the
# checkpoint's (a different one would silently be ignored, or would mix two runs' recipes)
RESUMABLE_CHANGES = ("epochs", "patience", "device", "eval_batch_size")


class RunDirectoryError(ValueError):
    """An output directory that would lose a saved run, or a resume that contradicts it."""


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
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.clip) and self.clip >= 0):
            raise ValueError(f"clip must be a finite number >= 0 (0: off), got {self.clip}")


def tag_vocabulary(sentences: Sequence[Sentence], scheme: str) -> Vocab:
    """'O' then, per entity type (sorted), every prefix of `scheme`: constraints need them all."""
    kinds = sorted({split_tag(t)[1] for s in sentences for t in s.tags} - {""})
    prefixes = {"IOB1": "BI", "IOB2": "BI", "BIOES": "BIES"}[canonical_scheme(scheme)]
    return Vocab(["O"] + [f"{p}-{k}" for k in kinds for p in prefixes], specials=())


def build_vocabularies(train: Sequence[Sentence], others: Sequence[Sentence], pretrained: Optional[Pretrained],
                       scheme: str, digits_to_zero: bool):
    """Words: every training word, plus dev/test words that have a pretrained vector (they keep
    their vector instead of falling to <unk>). Chars: from the training words."""
    norm = normalize_digits if digits_to_zero else (lambda w: w)
    counts = Counter(norm(t) for s in train for t in s.tokens)
    if pretrained is not None:
        for s in others:
            for t in s.tokens:
                w = norm(t)
                if w not in counts and w in pretrained:
                    counts[w] = 0
    words = Vocab.from_counts(counts, min_count=0)
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
          test_data: Optional[Sequence[Sentence]] = None, resume: bool = False, overwrite: bool = False,
          log: Optional[Callable[[str], None]] = None, progress: Optional[Progress] = None) -> dict:
    """Train a tagger into `out_dir` (the best dev-F1 model, a Tagger directory) and return the
    summary {'best_epoch', 'best_dev', 'history', 'test' (when test_data)}.

    A directory that holds a saved run is refused unless `resume` (continue it: every setting
    but RESUMABLE_CHANGES must equal the checkpoint's) or `overwrite` (replace it). The tagger,
    checkpoint and history are written as one file set per epoch (fastner.storage), so a kill
    leaves the previous epoch's directory or the new one."""
    if not train_data:
        raise ValueError("the training data holds no sentences")
    if not resume and not overwrite:
        existing = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
        if existing:
            raise RunDirectoryError(
                f"{out_dir} already holds a saved run ({', '.join(existing)}); continue it with --resume, "
                "replace it with --overwrite, or choose another --out")
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
        if not os.path.isfile(checkpoint_path) and not os.path.isdir(os.path.join(out_dir, f".{MANIFEST_FILE}.staging")):
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {checkpoint_path}")
        state = _read_checkpoint(out_dir)
        # read through the file set: the tagger may still sit in a swap a kill cut short
        saved = Tagger.load(out_dir, device="cpu")
        _check_resume_settings(config, state, saved, checkpoint_path)
        words, chars, tags = saved.words, saved.chars, saved.tags
        model = saved.model
        model.load_state_dict(state["model"])
    else:
        pretrained = load_pretrained(config.embeddings)
        others = list(dev_data) + list(test_data or [])
        words, chars, tags = build_vocabularies(train_data, others, pretrained, config.scheme, config.digits_to_zero)
        word_dim = pretrained.dim if pretrained is not None else config.word_dim
        init = torch.Generator().manual_seed(config.seed)
        weights, hits = embedding_matrix(words, pretrained, word_dim, init)
        if pretrained is not None:
            log(f"embeddings: {hits}/{len(words)} words found in {config.embeddings}")
        model_config = ModelConfig(num_words=len(words), num_chars=len(chars), tags=list(tags.itos), scheme=config.scheme,
                                   word_dim=word_dim, word_pad=words.pad_id, char_pad=chars.pad_id, **config.model)
        model = SequenceTagger(model_config, weights)
    model.to(device)
    trainer = dist.wrap(model)  # forward(batch tensors) -> loss; DDP when several processes
    tagger = Tagger(model, words, chars, tags, output_scheme, config.digits_to_zero, device)

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
            # the best tagger (when this epoch is it), the checkpoint and the history: one set
            files = tagger.files() if improved else {}
            files[CHECKPOINT_FILE] = torch_bytes({
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "epoch": epoch, "best_f1": best_f1, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                "history": history, "python_rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                "config": asdict(config),
            })
            files[HISTORY_FILE] = json_bytes({"config": asdict(config), "history": history,
                                              "best_epoch": best_epoch + 1, "best_dev_f1": best_f1})
            write_file_set(out_dir, files)
    if bad_epochs >= config.patience:
        log(f"stopped early: no better dev F1 for {config.patience} epochs")

    summary = {"best_epoch": best_epoch + 1, "best_dev_f1": best_f1, "history": history}
    if test_data:
        best = Tagger.load(out_dir, device=device) if dist.is_main else None
        summary["test"] = dist.broadcast(evaluate_tagger(best, test_data, config.eval_batch_size) if dist.is_main else None)
        log(f"test F1 {summary['test']['f1']:.2f} (best dev epoch {best_epoch + 1})")
    if dist.is_main:
        write_file_set(out_dir, {HISTORY_FILE: json_bytes({"config": asdict(config), **summary})})
    dist.cleanup()  # waits for rank 0's writes before any rank returns
    return summary


def _tuples(value):
    # torch.load gives lists back where random.getstate() had tuples
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def saved_settings(out_dir: str) -> Optional[dict]:
    """The TrainConfig (as a dict) of the run saved in `out_dir`, or None when there is none
    (no checkpoint, or one written before checkpoints recorded it)."""
    if not os.path.isfile(os.path.join(out_dir, CHECKPOINT_FILE)):
        return None
    config = _read_checkpoint(out_dir).get("config")
    return config if isinstance(config, dict) else None


def _read_checkpoint(out_dir: str) -> dict:
    """checkpoint.pt of the directory's complete file set, read with the weights_only loader."""
    path = os.path.join(out_dir, CHECKPOINT_FILE)
    try:
        data = read_file_set(out_dir, [CHECKPOINT_FILE])[CHECKPOINT_FILE]
    except StorageError as err:
        raise RunDirectoryError(f"--resume: {err}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # whatever the safe unpickler refuses, a torn or foreign file
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
        raise RunDirectoryError(f"{path} is not a checkpoint fastner can read safely: "
                                f"{reason or type(err).__name__}") from None
    needed = ("model", "optimizer", "epoch", "best_f1", "best_epoch", "bad_epochs", "history", "python_rng", "torch_rng")
    if not isinstance(state, dict) or any(key not in state for key in needed):
        raise RunDirectoryError(f"{path} is not a fastner training checkpoint (expected the keys {', '.join(needed)})")
    return state


def _check_resume_settings(config: TrainConfig, state: dict, saved: Tagger, checkpoint_path: str) -> None:
    """Refuse a resume whose settings differ from the checkpoint's (naming each one)."""
    differences = []
    model_config = saved.model.config.to_json()  # what the saved model is, whatever was asked then
    for name, setting in config.model.items():
        if name in model_config and model_config[name] != setting:
            differences.append(f"{name} {setting!r} (checkpoint: {model_config[name]!r})")
    saved_config = state.get("config")  # absent in checkpoints written before settings were recorded
    if isinstance(saved_config, dict):
        for key, value in asdict(config).items():
            if key not in RESUMABLE_CHANGES and key != "model" and key in saved_config and saved_config[key] != value:
                differences.append(f"{key} {value!r} (checkpoint: {saved_config[key]!r})")
    if differences:
        raise RunDirectoryError(
            f"--resume: these settings differ from the run saved in {checkpoint_path}: {'; '.join(differences)}. "
            f"A resumed run keeps its recipe (only {', '.join(RESUMABLE_CHANGES)} may change); "
            "drop them, or start a new run with --overwrite or another --out")
