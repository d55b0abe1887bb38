"""BiLSTM-CNN-CRF (Ma & Hovy 2016) with a choice of recurrent encoder and of output head.

word embedding (+ char CNN features) -> dropout -> bidirectional LSTM/GRU/RNN -> dropout ->
linear -> CRF (transitions constrained by the tag scheme) or a per-token softmax.

Word embeddings come from two tables (an open vocabulary): the fine-tuned `word_embedding` of
the training vocabulary (ids [0, num_words)) and, when the model was trained with pretrained
vectors, the frozen `pretrained` table of every pretrained word (ids num_words + row). A word
seen in training takes its fine-tuned row; any other word with a pretrained vector keeps that
vector, so names never seen in training still get one. The frozen table is a buffer outside the
state_dict (fastner.Tagger stores it beside the weights, memory-mapped), and gets no gradient:
a training step costs the same whatever its size.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import List, Optional

import torch
from torch import nn

from fastner import nn as fnn
from fastner import ops
from fastner.models.char_cnn import CharCNN
from fastner.models.dropout import Dropout

ENCODERS = {"lstm": fnn.LSTM, "gru": fnn.GRU, "rnn": fnn.RNN}
HEADS = ("crf", "softmax")
RECIPE_OPTIONS = ("char_dim", "char_filters", "char_window", "use_chars", "encoder", "hidden", "layers", "dropout", "head")
# Upper bounds of the sizes, far above any real use, so that a typo is refused at once instead of
# building for minutes or exhausting memory (`train --layers 100000` built modules for minutes).
# Real use: Ma & Hovy's tagger has word 100 (GloVe 50-300, other vectors up to ~4096), char
# 30 x 30 filters of window 3, 200 hidden units, 1 layer; large BiLSTM taggers go to 1024 units
# and 2-4 layers. Each bound is 4-16x the largest of those.
MAX_SIZES = {"word_dim": 16384, "char_dim": 1024, "char_filters": 4096, "char_window": 63, "hidden": 8192,
             "layers": 64}


@dataclass
class ModelConfig:
    num_words: int
    num_chars: int
    tags: List[str]  # tag of each output index, in `scheme`
    scheme: str = "BIOES"
    word_dim: int = 100
    char_dim: int = 30
    char_filters: int = 30
    char_window: int = 3
    use_chars: bool = True
    encoder: str = "lstm"
    hidden: int = 200  # per direction
    layers: int = 1
    dropout: float = 0.5
    head: str = "crf"
    word_pad: int = 0
    char_pad: int = 0
    pretrained_rows: int = 0  # rows of the frozen pretrained table (0: none)

    def __post_init__(self):
        # a config.json read back is checked as strictly as one built here: a string, float or
        # bool where a size belongs would otherwise be coerced (True -> 1, "false" -> true) or
        # fail deep inside torch
        for name in ("num_words", "num_chars", "word_dim", "char_dim", "char_filters", "char_window", "hidden",
                     "layers", "word_pad", "char_pad", "pretrained_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if not isinstance(self.use_chars, bool):
            raise ValueError(f"use_chars must be true or false, got {self.use_chars!r}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {self.encoder!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {list(HEADS)}, got {self.head!r}")
        for name in ("num_words", "num_chars", "word_dim", "char_dim", "char_filters", "char_window", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            if getattr(self, name) > MAX_SIZES.get(name, getattr(self, name)):
                raise ValueError(f"{name} must be <= {MAX_SIZES[name]} (far above any real use), got {getattr(self, name)}")
        if self.use_chars and self.char_window % 2 != 1:
            raise ValueError(f"char_window must be odd (the convolution keeps the word's length), got {self.char_window}")
        if self.pretrained_rows < 0:
            raise ValueError(f"pretrained_rows must be >= 0, got {self.pretrained_rows}")
        if not (0 <= self.word_pad < self.num_words and 0 <= self.char_pad < self.num_chars):
            raise ValueError(f"word_pad and char_pad must be ids of the vocabularies (0 <= word_pad < {self.num_words}, "
                             f"0 <= char_pad < {self.num_chars}), got {self.word_pad} and {self.char_pad}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.tags, list) or not self.tags or not all(isinstance(tag, str) for tag in self.tags):
            raise ValueError(f"tags must be a non-empty list of strings, got {self.tags!r}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def options(cls) -> dict:
        """The architecture choices a training recipe may set, with their defaults (the rest of
        the config comes from the data: vocabulary sizes, tags, padding ids, the vector size)."""
        return {f.name: f.default for f in fields(cls) if f.name in RECIPE_OPTIONS}

    @classmethod
    def check_options(cls, options: dict, word_dim: int) -> None:
        """ValueError unless `options` (a recipe's architecture choices) and `word_dim` make a
        valid config: the same checks as a config built from data, made before any data is
        read, so that a bad recipe is refused up front (and by the file that holds it)."""
        unknown = sorted(set(options) - set(RECIPE_OPTIONS))
        if unknown:
            raise ValueError(f"unknown model options {unknown}; known: {sorted(RECIPE_OPTIONS)}")
        cls(num_words=1, num_chars=1, tags=["O"], word_dim=word_dim, **options)

    @classmethod
    def from_json(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        return cls(**data)


class SequenceTagger(nn.Module):
    def __init__(self, config: ModelConfig, word_weights: Optional[torch.Tensor] = None,
                 pretrained: Optional[torch.Tensor] = None):
        """word_weights: [num_words, word_dim] initial fine-tuned rows; pretrained:
        [pretrained_rows, word_dim] float16/float32 frozen rows (zeros when not given, as
        before a Tagger loads its table)."""
        super().__init__()
        self.config = config
        if config.pretrained_rows:
            shape = (config.pretrained_rows, config.word_dim)
            if pretrained is None:
                pretrained = torch.zeros(shape, dtype=torch.float16)
            if tuple(pretrained.shape) != shape or pretrained.dtype not in (torch.float16, torch.float32):
                raise ValueError(f"pretrained must be a float16/float32 tensor of shape {list(shape)}, "
                                 f"got {pretrained.dtype} {list(pretrained.shape)}")
        elif pretrained is not None:
            raise ValueError("pretrained rows given, but the config has pretrained_rows=0")
        # not in the state_dict: the checkpoint and weights stay small, the table is stored once
        self.register_buffer("pretrained", pretrained, persistent=False)
        self.word_embedding = nn.Embedding(config.num_words, config.word_dim, padding_idx=config.word_pad)
        if word_weights is not None:
            if tuple(word_weights.shape) != (config.num_words, config.word_dim):
                raise ValueError(
                    f"word_weights must be [{config.num_words}, {config.word_dim}], got {tuple(word_weights.shape)}"
                )
            with torch.no_grad():
                self.word_embedding.weight.copy_(word_weights)
        self.char_cnn = (
            CharCNN(config.num_chars, config.char_dim, config.char_filters, config.char_window, config.dropout, config.char_pad)
            if config.use_chars
            else None
        )
        input_dim = config.word_dim + (config.char_filters if config.use_chars else 0)
        self.dropout = Dropout(config.dropout)
        self.encoder = ENCODERS[config.encoder](
            input_dim,
            config.hidden,
            num_layers=config.layers,
            bidirectional=True,
            batch_first=True,
            dropout=config.dropout if config.layers > 1 else 0.0,
        )
        if config.encoder == "lstm":
            # forget-gate bias 1 (Jozefowicz et al. 2015; Ma & Hovy): gates are ordered i, f, g, o
            with torch.no_grad():
                for name, param in self.encoder.named_parameters():
                    if name.startswith("bias_ih"):
                        param[config.hidden : 2 * config.hidden].fill_(1.0)
                    elif name.startswith("bias_hh"):
                        param[config.hidden : 2 * config.hidden].zero_()
        num_tags = len(config.tags)
        self.output = nn.Linear(2 * config.hidden, num_tags)
        if config.head == "crf":
            constraints = fnn.allowed_transitions(config.scheme, config.tags)
            self.crf = fnn.CRF(num_tags, batch_first=True, constraints=constraints)
        else:
            self.crf = None

    def embed_words(self, words: torch.Tensor) -> torch.Tensor:
        """words: [B, T] ids of the open vocabulary (see the module doc) -> [B, T, word_dim]."""
        if self.pretrained is None:
            return self.word_embedding(words)
        fine = words < self.config.num_words  # [B, T]
        tuned = self.word_embedding(words.masked_fill(~fine, self.config.word_pad))
        frozen = self.pretrained[(words - self.config.num_words).clamp(min=0)].to(tuned.dtype)
        return torch.where(fine.unsqueeze(-1), tuned, frozen)

    def emissions(self, words: torch.Tensor, chars: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """words: [B, T], chars: [B, T, C], lengths: [B], mask: [B, T] bool -> emissions [B, T, K]."""
        x = self.embed_words(words)  # [B, T, word_dim]
        if self.char_cnn is not None:
            x = torch.cat([x, self.char_cnn(chars, mask)], dim=-1)
        x = self.dropout(x)
        x, _ = self.encoder(x, lengths=lengths)  # [B, T, 2H], zeros past each length
        return self._project(self.dropout(x), mask)

    def _project(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """self.output over x [B, T, 2H] (zeros past each length) -> [B, T, K]. In eager
        inference (no grad, not traced) one op, ops.masked_linear: the Linear on the tokens'
        rows alone, padding rows get the bias (what a zero row gives): the same values, at a third
        of the work on CoNLL-length batches (465 of 1280 rows at batch 32). torch's way to skip
        those rows (nonzero, index_select, addmm, index_copy_ into a bias-filled output: the
        reference) took 280-410 us a batch of 32 and ~9% of an int8 tagger call (AMD Zen 3, 1
        thread), MKL's product with 17 columns alone 150-210 us; the op made the int8 tagger's
        predict 6-8% faster (benchmarks/masked_linear.py). One sentence alone (no padding, 30
        tokens): 22-28 us, F.linear on its rows 24-26. With grad, under torch.compile / torch.export
        (static shapes), or with an output layer that is not a plain nn.Linear (torch's
        quantized one has no weight tensor): the layer on all rows."""
        if (torch.is_grad_enabled() or torch.compiler.is_compiling() or x.dim() != 3
                or type(self.output) is not nn.Linear):
            return self.output(x)
        return self._masked_linear(x, mask, self.output.weight, self.output.bias)

    # What _project runs in inference; the benchmarks' torch baseline puts torch's ops here.
    _masked_linear = staticmethod(ops.masked_linear)

    def forward(self, words: torch.Tensor, chars: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor,
                tags: torch.Tensor) -> torch.Tensor:
        """The training loss: negative log-likelihood summed over the sentences (token
        cross-entropy summed over tokens for the softmax head). words/tags: [B, T], chars:
        [B, T, C], lengths: [B], mask: [B, T] bool. Being forward(), it is what
        DistributedDataParallel wraps and synchronises."""
        scores = self.emissions(words, chars, lengths, mask)
        if self.crf is not None:
            return -self.crf(scores, tags, mask, reduction="sum")
        return nn.functional.cross_entropy(scores[mask], tags[mask], reduction="sum")

    def loss(self, batch) -> torch.Tensor:
        """forward() of a fastner.data.Batch."""
        if batch.tags is None:
            raise ValueError("the batch has no gold tags to compute a loss against")
        return self(batch.words, batch.chars, batch.lengths, batch.mask, batch.tags)

    def transition_scores(self, dtype: torch.dtype = torch.float32):
        """(transitions [K, K], start [K], end [K]) as decoding uses them: the CRF's, with its
        constraints as -inf; zeros for the softmax head (independent tokens are a CRF without
        transitions, so span probabilities and k-best paths use one computation for both)."""
        if self.crf is not None:
            scores = self.crf._scores(torch.empty(0, dtype=dtype))
            return tuple(t.detach().to(dtype) for t in scores)
        K = len(self.config.tags)
        zeros = self.output.weight.new_zeros(K, dtype=dtype)
        return self.output.weight.new_zeros(K, K, dtype=dtype), zeros, zeros

    def infer(self, words: torch.Tensor, chars: torch.Tensor, lengths: torch.Tensor):
        """The one inference computation (Tagger.predict, the exported program and the server
        all run this): words [B, T], chars [B, T, C], lengths [B] ->
        tags [B, T] int64 (the best path, -1 past each length), log_z [B] (log partition under
        transition_scores()), emissions [B, T, K] float32 (zeros past each length)."""
        from fastner import ops

        mask = torch.arange(words.shape[1], device=words.device).unsqueeze(0) < lengths.unsqueeze(1)  # [B, T]
        emissions = (self.emissions(words, chars, lengths, mask).float() * mask.unsqueeze(-1))
        if self.crf is not None:
            # the ops on the known lengths, not the module's mask checks (data-dependent
            # comparisons torch.export cannot trace)
            scores = self.transition_scores(emissions.dtype)
            tags, _ = ops.crf_viterbi(emissions, lengths, *scores)
            log_z, _ = ops.crf_forward(emissions, None, lengths, *scores)
        else:
            tags = emissions.argmax(dim=-1).masked_fill(~mask, -1)
            log_z = (emissions.logsumexp(dim=-1) * mask).sum(dim=1)
        return tags, log_z, emissions

    @torch.no_grad()
    def predict(self, batch, with_marginals: bool = False):
        """Best tags [B, T] (-1 past each length) and, when asked, marginals [B, T, K]
        (CRF posteriors, or softmax probabilities for the softmax head; zeros on padding)."""
        scores = self.emissions(batch.words, batch.chars, batch.lengths, batch.mask)
        if self.crf is not None:
            tags, _ = self.crf.viterbi(scores, batch.mask)
            marginals = self.crf.marginals(scores, batch.mask) if with_marginals else None
        else:
            tags = scores.argmax(dim=-1).masked_fill(~batch.mask, -1)
            marginals = scores.float().softmax(dim=-1) * batch.mask[..., None] if with_marginals else None
        return tags, marginals

