"""Training: Ma & Hovy's recipe by default, early stopping on dev F1, resumable, reproducible.

Defaults: SGD lr 0.015, momentum 0.9, lr_t = lr / (1 + 0.05 t) per epoch t, batches of 10,
gradient-norm clipping at 5.0, dropout 0.5, BIOES tags, 200 hidden units per direction.

Everything random (initialisation, dropout, batch order) comes from one seed, and the run's
state (weights, optimiser, RNG states, history) is checkpointed after every epoch, so a resumed
run continues exactly as an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastner import distributed
from fastner.data.batching import bucket_batches, encode_sentences, make_batch
from fastner.data.conll import Sentence
from fastner.data.schemes import canonical_scheme, convert_tags, detect_scheme, split_tag
from fastner.data.textfiles import check_data_file
from fastner.data.vocab import Vocab, normalize_digits
from fastner.embeddings import WordIndex, embedding_matrix, frozen_table, load_pretrained
from fastner.models.tagger import ModelConfig, SequenceTagger
from fastner.optim import RowSparseSGD, clip_grad_norm, sparse_rows
from fastner.storage import (MANIFEST_FILE, StorageError, UnsafeTorchFile, json_bytes, read_file_set, torch_bytes,
                             weights_only_load, write_file_set)
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
    """The training recipe: the one place its defaults are defined (the CLI's flags, `--config`
    files and training.json read and write these fields)."""

    epochs: int = 70  # ~15 min for the default model at --threads 2 on the 2-core machine (README: accuracy)
    batch_size: int = 10
    optimizer: str = "sgd"  # or "adam"
    lr: Optional[float] = None  # default 0.015 for SGD, 0.001 for Adam
    momentum: float = 0.9
    lr_decay: float = 0.05
    clip: float = 5.0
    patience: int = 15  # epochs without a better dev F1 before stopping (a best came 13 epochs after the last: README)
    seed: int = 42
    scheme: str = "BIOES"  # the scheme the model predicts in
    embeddings: str = "none"  # 'glove', 'none' or a vectors file
    word_dim: int = 100  # used when embeddings='none'
    digits_to_zero: bool = False
    eval_batch_size: int = 64
    device: str = "cpu"
    model: Dict = field(default_factory=dict)  # ModelConfig.options() overrides: encoder, head, hidden, ...

    def __post_init__(self):
        kinds = {"epochs": int, "batch_size": int, "patience": int, "seed": int, "word_dim": int, "eval_batch_size": int,
                 "momentum": float, "lr_decay": float, "clip": float, "optimizer": str, "scheme": str,
                 "embeddings": str, "device": str, "digits_to_zero": bool}
        for name, kind in kinds.items():
            value = getattr(self, name)
            ok = isinstance(value, bool) if kind is bool else (
                isinstance(value, kind if kind is not float else (int, float)) and not isinstance(value, bool))
            if not ok:
                raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer' if kind is int else kind.__name__}, "
                                 f"got {value!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr is None:
            self.lr = 0.015 if self.optimizer == "sgd" else 0.001
        self.scheme = canonical_scheme(self.scheme)
        for name in ("epochs", "batch_size", "patience", "eval_batch_size"):  # word_dim: ModelConfig's checks
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.clip) and self.clip >= 0):
            raise ValueError(f"clip must be a finite number >= 0 (0: off), got {self.clip}")
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be an object of architecture options, got {self.model!r}")
        # checked here, not when the model is built after the data is read: a bad value in a
        # --config file was reported late and without the file's name
        ModelConfig.check_options(self.model, self.word_dim)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, **overrides) -> "TrainConfig":
        """A recipe from a JSON object (a `--config` file, or the "config" of a training.json),
        then `overrides` (model options merge into the file's)."""
        if not isinstance(data, dict):
            raise ValueError("a training config must be a JSON object of TrainConfig fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known: {sorted(known)}")
        options = dict(data)
        model = dict(options.get("model") or {})
        model.update(overrides.pop("model", None) or {})
        options.update(overrides)
        options["model"] = model
        return cls(**options)


def read_config(path: str) -> dict:
    """The recipe object of a JSON file: a TrainConfig object, or a training.json (its "config")."""
    check_data_file(path, "config file")  # a directory was "not found"
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    # ValueError: JSONDecodeError, an integer of too many digits; RecursionError: nested too deep
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{path}: not a JSON training config: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "history" in data:
        data = data["config"]  # a training.json: reuse the recipe of that run
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a training config must be a JSON object")
    return data


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


def _make_optimizer(parameters, config: TrainConfig) -> torch.optim.Optimizer:
    # fused: one kernel over all the dense parameters instead of several ops per parameter (the
    # same update; -3 to -7% of a default training step on the 2-core AMD machine, 1 and 2 threads)
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, fused=True)
    return torch.optim.Adam(parameters, lr=config.lr, fused=True)


def _epoch_lr(config: TrainConfig, epoch: int) -> float:
    if config.optimizer == "sgd":
        return config.lr / (1.0 + config.lr_decay * epoch)
    return config.lr


def evaluate_tagger(tagger: Tagger, sentences: Sequence[Sentence], batch_size: int) -> dict:
    return tagger.evaluate(sentences, batch_size) if sentences else {"f1": 0.0, "precision": 0.0, "recall": 0.0, "accuracy": 0.0}


class Hook:
    """Called by Trainer after each dev evaluation and each checkpoint (on every rank; check
    `trainer.dist.is_main` before writing). Subclass and override what you need."""

    def after_evaluation(self, trainer: "Trainer", record: dict) -> None:
        """`record`: the epoch's history entry (loss, dev scores, timings)."""

    def after_checkpoint(self, trainer: "Trainer", epoch: int) -> None:
        """The checkpoint of `epoch` (0-based) is written (rank 0) and the best model saved."""


class Trainer:
    """Trains a tagger into `out_dir` (the best dev-F1 model as a Tagger directory, plus
    checkpoint.pt and training.json), one epoch at a time: fit() = for each epoch
    train_epoch(), evaluate(), checkpoint(), with the hooks called after the last two.

    Dev data is used for early stopping (and choosing the saved epoch) only: the vocabularies,
    the initialisation and every training step depend on the training data and the seed alone.
    """

    sparse_updates = True  # update the word table's rows sparsely where that equals dense SGD

    def __init__(self, train_data: Sequence[Sentence], dev_data: Sequence[Sentence], out_dir: str,
                 config: TrainConfig, resume: bool = False, overwrite: bool = False,
                 log: Optional[Callable[[str], None]] = None, progress: Optional[Progress] = None,
                 hooks: Sequence[Hook] = ()):
        # sentences without tokens are skipped: a set of only those would train nothing, and a dev
        # set of only those scores every epoch 0, so that the first epoch's model would be kept
        if not any(s.tokens for s in train_data):
            raise ValueError("the training data holds no sentences")
        if not any(s.tokens for s in dev_data):
            raise ValueError("the dev data holds no sentences: early stopping keeps the epoch of the best dev F1")
        if not resume and not overwrite:
            existing = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
            if existing:
                raise RunDirectoryError(
                    f"{out_dir} already holds a saved run ({', '.join(existing)}); continue it with --resume, "
                    "replace it with --overwrite, or choose another --out")
        self.config, self.out_dir, self.dev_data, self.hooks = config, out_dir, dev_data, list(hooks)
        self.output_scheme = detect_scheme(s.tags for s in train_data)
        self.dist = distributed.setup(config.device)  # torchrun's process group, or a single process
        main = self.dist.is_main
        self.log = (log or (lambda text: print(text, file=sys.stderr, flush=True))) if main else (lambda text: None)
        self.progress = (progress or Progress()) if main else Progress(distributed.discard_stream())
        os.makedirs(out_dir, exist_ok=True)
        self.checkpoint_path = os.path.join(out_dir, CHECKPOINT_FILE)

        torch.manual_seed(config.seed)
        self.rng = random.Random(config.seed)
        self.data_digests = {"train": data_digest(train_data), "dev": data_digest(dev_data)}
        state = self._read_checkpoint() if resume else None
        if state is None:
            self.tagger = self._new_tagger(train_data)
        self.model = self.tagger.model
        self.module = self.dist.wrap(self.model)  # forward(batch tensors) -> loss; DDP when several processes

        if state is not None:
            # said per type, not as "sentence 0: tag 'S-MISC' is not one of the model's tags"
            known = {split_tag(t)[1] for t in self.tagger.tags.itos} - {""}
            new = sorted({split_tag(t)[1] for s in train_data for t in s.tags} - known - {""})
            if new:
                raise ValueError(f"the training data has entity types {new} that the saved run's model does not have "
                                 f"({', '.join(sorted(known))}); a resumed run keeps its tag set: start a new run "
                                 "(--overwrite or another --out) to learn them")
        train_tagged = [Sentence(s.tokens, convert_tags(s.tags, config.scheme)) for s in train_data if s.tokens]
        self.encoded = encode_sentences(train_tagged, self.tagger.words, self.tagger.chars, self.tagger.tags,
                                        config.digits_to_zero)
        self.lengths = [len(e.words) for e in self.encoded]
        self.total_tokens = sum(self.lengths)

        # the word table's rows are updated sparsely (fastner.optim) where that equals the dense
        # update: SGD (Adam's moments are not lazily updatable) in one process (DDP all-reduces
        # dense gradients)
        self.word_table: Optional[RowSparseSGD] = None
        if self.sparse_updates and config.optimizer == "sgd" and not self.dist.enabled:
            self.word_table = RowSparseSGD(self.model.word_embedding.weight, config.lr, config.momentum)
            self.model.word_embedding.sparse = True
        self.optimizer = _make_optimizer(self._dense_parameters(), config)
        self.history: List[dict] = []
        self.improved = False  # whether the last evaluated epoch is the best so far
        self.best_f1, self.best_epoch, self.bad_epochs, self.start_epoch = -1.0, -1, 0, 0
        if state is not None:
            try:
                dense_state, table_state = self._optimizer_states(state)
                self.optimizer.load_state_dict(dense_state)
                if self.word_table is not None:
                    self.word_table.load_state_dict(table_state)
                self.history = list(state["history"])
                self.best_f1, self.best_epoch = float(state["best_f1"]), state["best_epoch"]
                self.bad_epochs, self.start_epoch = state["bad_epochs"], state["epoch"] + 1
                self.rng.setstate(_tuples(state["python_rng"]))
                torch.set_rng_state(state["torch_rng"])
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
                raise _unusable_checkpoint(self.checkpoint_path, err) from None
            self.log(f"resuming after epoch {self.start_epoch} (best dev F1 {self.best_f1:.2f} at epoch {self.best_epoch + 1})")

    # ---- set-up ------------------------------------------------------------------------------

    def _optimizer_states(self, state: dict):
        """(torch optimiser state, RowSparseSGD state or None) from a checkpoint, whichever way
        its word table was updated: the table's momentum moves between the two when a run is
        resumed the other way (e.g. a single-process run continued under torchrun)."""
        dense = state["optimizer"]
        was_sparse = bool(state.get("sparse_word_table", False))
        if was_sparse == (self.word_table is not None):
            return dense, state.get("word_table_optimizer")
        table = self.model.word_embedding.weight
        at = next(i for i, p in enumerate(self.model.parameters()) if p is table)  # its index in a dense state
        count = sum(1 for _ in self.model.parameters())
        group = dict(dense["param_groups"][0])
        if was_sparse:  # sparse -> dense: the table's momentum joins the optimiser state at its index
            moved = {(i + 1 if i >= at else i): v for i, v in dense["state"].items()}
            moved[at] = {"momentum_buffer": state["word_table_optimizer"]["momentum_buffer"]}
            group["params"] = list(range(count))
            return {"state": moved, "param_groups": [group]}, None
        entry = dense["state"].get(at, {})  # dense -> sparse: it leaves the optimiser state
        moved = {(i - 1 if i > at else i): v for i, v in dense["state"].items() if i != at}
        group["params"] = list(range(count - 1))
        buffer = entry.get("momentum_buffer")
        return ({"state": moved, "param_groups": [group]},
                {"momentum_buffer": buffer if buffer is not None else torch.zeros_like(table.detach().cpu())})

    def _dense_parameters(self) -> List[torch.nn.Parameter]:
        """What torch's optimiser updates: every parameter but a sparsely updated word table."""
        table = self.model.word_embedding.weight if self.word_table is not None else None
        return [p for p in self.model.parameters() if p is not table]

    def _read_checkpoint(self) -> dict:
        staging = os.path.join(self.out_dir, f".{MANIFEST_FILE}.staging")
        if not os.path.isfile(self.checkpoint_path) and not os.path.isdir(staging):
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {self.checkpoint_path}")
        state = _read_checkpoint(self.out_dir)
        # read through the file set: the tagger may still sit in a swap a kill cut short
        saved = Tagger.load(self.out_dir, device="cpu")
        _check_resume_settings(self.config, state, saved, self.checkpoint_path, self.data_digests)
        try:
            saved.model.load_state_dict(state["model"])
        except (TypeError, ValueError, RuntimeError) as err:
            raise _unusable_checkpoint(self.checkpoint_path, err) from None
        # the index the load read, as it is: its words as a list (saved.pretrained_words) and
        # their dict took ~0.5 s for GloVe, and each save built the index again from the list
        self.tagger = Tagger(saved.model, saved.words, saved.chars, saved.tags, self.output_scheme,
                             self.config.digits_to_zero, self.dist.device, saved.word_index())
        return state

    def _new_tagger(self, train_data: Sequence[Sentence]) -> Tagger:
        config = self.config
        pretrained = load_pretrained(config.embeddings)
        words, chars, tags = build_vocabularies(train_data, config.scheme, config.digits_to_zero)
        word_dim = pretrained.dim if pretrained is not None else config.word_dim
        init = torch.Generator().manual_seed(config.seed)
        weights, hits = embedding_matrix(words, pretrained, word_dim, init)
        frozen, pretrained_words = None, None
        if pretrained is not None:
            # built once, the index the saved tagger stores (pretrained_words.bin): given the
            # list, the tagger built its dict, and every save of an improved epoch the index
            # (~0.4 s for GloVe's 400k words; to_bytes ~0.01 s)
            frozen, pretrained_words = frozen_table(pretrained), WordIndex.build(pretrained.words)
            self.log(f"embeddings: {hits}/{len(words)} training words found in {config.embeddings}; "
                     f"{len(pretrained_words)} pretrained vectors kept frozen for every other word")
        model_config = ModelConfig(num_words=len(words), num_chars=len(chars), tags=list(tags.itos), scheme=config.scheme,
                                   word_dim=word_dim, word_pad=words.pad_id, char_pad=chars.pad_id,
                                   pretrained_rows=0 if frozen is None else len(pretrained_words), **config.model)
        model = SequenceTagger(model_config, weights, frozen)
        return Tagger(model, words, chars, tags, self.output_scheme, config.digits_to_zero, self.dist.device,
                      pretrained_words)

    # ---- the loop ----------------------------------------------------------------------------

    def fit(self, test_data: Optional[Sequence[Sentence]] = None) -> dict:
        """Train until the last epoch or early stop; return {'best_epoch', 'best_dev_f1',
        'history', 'test' (when test_data: the best model's scores, for the record only)}."""
        config, dist = self.config, self.dist
        for epoch in range(self.start_epoch, config.epochs):
            if self.bad_epochs >= config.patience:
                break
            loss_sum, tokens_done, train_seconds, started = self.train_epoch(epoch)
            record = self.evaluate(epoch, loss_sum, tokens_done, train_seconds, started)
            for hook in self.hooks:
                hook.after_evaluation(self, record)
            self.checkpoint(epoch)
            for hook in self.hooks:
                hook.after_checkpoint(self, epoch)
        if self.bad_epochs >= config.patience:
            self.log(f"stopped early: no better dev F1 for {config.patience} epochs")

        summary = {"best_epoch": self.best_epoch + 1, "best_dev_f1": self.best_f1, "history": self.history}
        if test_data:
            best = Tagger.load(self.out_dir, device=dist.device) if dist.is_main else None
            summary["test"] = dist.broadcast(evaluate_tagger(best, test_data, config.eval_batch_size) if dist.is_main else None)
            self.log(f"test F1 {summary['test']['f1']:.2f} (best dev epoch {self.best_epoch + 1})")
        if dist.is_main:
            write_file_set(self.out_dir, {HISTORY_FILE: json_bytes({"config": config.to_json(), **summary})})
        dist.cleanup()  # waits for rank 0's writes before any rank returns
        return summary

    def train_epoch(self, epoch: int):
        """One pass over this rank's share of the training batches: (loss sum, tokens) summed
        over the ranks, the seconds it took, and when it started (perf_counter)."""
        config, dist, model, optimizer = self.config, self.dist, self.model, self.optimizer
        lr = _epoch_lr(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        table = self.word_table
        if table is not None:
            table.lr = lr  # every row is flushed at the end of an epoch, so none lags at the old rate
        dense = self._dense_parameters()
        model.train()
        dist.seed_epoch(config.seed, epoch)
        started = time.perf_counter()
        loss_sum, tokens_done = 0.0, 0
        words, chars = self.tagger.words, self.tagger.chars
        batches = dist.shard(bucket_batches(self.lengths, config.batch_size, shuffle=True, rng=self.rng))
        for number, index in enumerate(batches, start=1):
            batch = make_batch(self.encoded, index, words.pad_id, chars.pad_id).to(dist.device)
            if table is not None:
                table.catch_up(batch.words)  # the rows this forward reads, as the dense update would leave them
            loss = distributed.loss_of(self.module, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            rows = values = None
            if table is not None and table.weight.grad is not None:
                rows, values = sparse_rows(table.weight.grad)
                table.weight.grad = None
            if config.clip > 0:
                clip_grad_norm([p.grad for p in dense], values, config.clip)
            optimizer.step()
            if rows is not None:
                table.step(rows, values)
            loss_value = loss.item()  # also the sync that keeps the progress line honest
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"epoch {epoch + 1}, batch {number}: the loss is {loss_value}; try a smaller --lr")
            loss_sum += loss_value
            tokens_done += int(batch.lengths.sum())
            elapsed = time.perf_counter() - started
            self.progress.update(
                f"epoch {epoch + 1}/{config.epochs} [{number}/{len(batches)}] loss {loss_sum / tokens_done:.4f}/token "
                f"{tokens_done / max(elapsed, 1e-9):,.0f} tokens/s",
                force=number == len(batches),
            )
        if table is not None:
            table.flush()  # before evaluation and saving read the table
        train_seconds = time.perf_counter() - started
        loss_sum, tokens_done = dist.all_sum([loss_sum, tokens_done])
        return loss_sum, tokens_done, train_seconds, started

    def evaluate(self, epoch: int, loss_sum: float, tokens_done: float, train_seconds: float, started: float) -> dict:
        """Dev scores of the epoch's model (rank 0 evaluates, every rank takes its result so all
        decide alike when to stop); saves the model when it is the best so far. Returns the
        epoch's history record."""
        config, dist = self.config, self.dist
        dev = dist.broadcast(evaluate_tagger(self.tagger, self.dev_data, config.eval_batch_size) if dist.is_main else None)
        epoch_seconds = time.perf_counter() - started
        improved = self.improved = dev["f1"] > self.best_f1
        if improved:
            self.best_f1, self.best_epoch, self.bad_epochs = dev["f1"], epoch, 0
        else:
            self.bad_epochs += 1
        record = {
            "epoch": epoch + 1, "lr": _epoch_lr(config, epoch), "loss_per_token": loss_sum / max(tokens_done, 1),
            "dev_f1": dev["f1"], "dev_precision": dev["precision"], "dev_recall": dev["recall"],
            "dev_accuracy": dev["accuracy"], "train_seconds": train_seconds,
            "tokens_per_s": self.total_tokens / max(train_seconds, 1e-9),
            # wall time since the run began, dev evaluation included (summed over resumed parts)
            "elapsed_seconds": (self.history[-1]["elapsed_seconds"] if self.history else 0.0) + epoch_seconds,
        }
        self.history.append(record)
        self.progress.done(
            f"epoch {epoch + 1}/{config.epochs}: loss {record['loss_per_token']:.4f}/token, "
            f"{record['tokens_per_s']:,.0f} tokens/s, {train_seconds:.1f} s, dev F1 {dev['f1']:.2f}"
            + (" (best)" if improved else f" (best {self.best_f1:.2f} at epoch {self.best_epoch + 1})")
        )
        return record

    def checkpoint(self, epoch: int) -> None:
        """Everything a resumed run needs to continue exactly, with the best tagger when this
        epoch is it and the history: one file set (fastner.storage), so a kill leaves the
        previous epoch's directory or this one (rank 0 writes)."""
        if not self.dist.is_main:
            return
        config = self.config.to_json()
        files = self.tagger.files() if self.improved else {}
        files[CHECKPOINT_FILE] = torch_bytes({
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "sparse_word_table": self.word_table is not None,
            **({"word_table_optimizer": self.word_table.state_dict()} if self.word_table is not None else {}),
            "epoch": epoch, "best_f1": self.best_f1, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "history": self.history, "python_rng": self.rng.getstate(), "torch_rng": torch.get_rng_state(),
            "config": config, "data": self.data_digests,
        })
        files[HISTORY_FILE] = json_bytes({"config": config, "history": self.history,
                                          "best_epoch": self.best_epoch + 1, "best_dev_f1": self.best_f1})
        write_file_set(self.out_dir, files)


def train(train_data: Sequence[Sentence], dev_data: Sequence[Sentence], out_dir: str, config: TrainConfig,
          test_data: Optional[Sequence[Sentence]] = None, resume: bool = False, overwrite: bool = False,
          log: Optional[Callable[[str], None]] = None, progress: Optional[Progress] = None,
          hooks: Sequence[Hook] = ()) -> dict:
    """Trainer(...).fit(test_data): see Trainer.

    A directory that holds a saved run is refused unless `resume` (continue it: every setting
    but RESUMABLE_CHANGES must equal the checkpoint's) or `overwrite` (replace it)."""
    return Trainer(train_data, dev_data, out_dir, config, resume, overwrite, log, progress, hooks).fit(test_data)


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
        state = weights_only_load(data)
    except UnsafeTorchFile as err:
        raise RunDirectoryError(f"{path} is not a checkpoint fastner can read safely: {err}") from None
    needed = ("model", "optimizer", "epoch", "best_f1", "best_epoch", "bad_epochs", "history", "python_rng", "torch_rng")
    if not isinstance(state, dict) or any(key not in state for key in needed):
        raise RunDirectoryError(f"{path} is not a fastner training checkpoint (expected the keys {', '.join(needed)})")
    counts = [state[key] for key in ("epoch", "best_epoch", "bad_epochs")]
    if (not all(isinstance(n, int) and not isinstance(n, bool) and n >= -1 for n in counts) or state["epoch"] < 0
            or not isinstance(state["history"], list) or len(state["history"]) != state["epoch"] + 1):
        raise _unusable_checkpoint(path, "its epoch counts and history do not agree")
    return state


def _unusable_checkpoint(path: str, err) -> RunDirectoryError:
    reason = " ".join(str(err).split())
    return RunDirectoryError(f"--resume: {path} holds a checkpoint fastner cannot continue: {reason[:300]}")


def data_digest(sentences: Sequence[Sentence]) -> str:
    """SHA-256 of the sentences' tokens and tags: a resumed run must see the data it was trained on."""
    digest = hashlib.sha256()
    for sentence in sentences:
        digest.update(json.dumps([sentence.tokens, sentence.tags], ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def _check_resume_settings(config: TrainConfig, state: dict, saved: Tagger, checkpoint_path: str,
                           data_digests: Dict[str, str]) -> None:
    """Refuse a resume whose settings or data differ from the checkpoint's (naming each one)."""
    differences = []
    saved_data = state.get("data")  # absent in checkpoints written before the data was recorded
    if isinstance(saved_data, dict):
        # other training data breaks the exact continuation; another dev set compares its F1 with
        # the best F1 of the old one, and so keeps the wrong epoch's model
        differences += [f"the {name} data (other sentences than the run's)"
                        for name, digest in data_digests.items() if saved_data.get(name, digest) != digest]
    model_config = saved.model.config.to_json()  # what the saved model is, whatever was asked then
    for name, setting in config.model.items():
        if name in model_config and model_config[name] != setting:
            differences.append(f"{name} {setting!r} (checkpoint: {model_config[name]!r})")
    saved_config = state.get("config")  # absent in checkpoints written before settings were recorded
    if isinstance(saved_config, dict):
        for key, value in config.to_json().items():
            if key not in RESUMABLE_CHANGES and key != "model" and key in saved_config and saved_config[key] != value:
                differences.append(f"{key} {value!r} (checkpoint: {saved_config[key]!r})")
    if differences:
        raise RunDirectoryError(
            f"--resume: these differ from the run saved in {checkpoint_path}: {'; '.join(differences)}. "
            f"A resumed run keeps its recipe and data (only {', '.join(RESUMABLE_CHANGES)} may change); "
            "drop them and give the run's data files, or start a new run with --overwrite or another --out")
