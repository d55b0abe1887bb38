"""Export a trained tagger with torch.export, and tag with the exported program alone.

`fastner export DIR OUT` (or `export_tagger(Tagger.load(DIR), OUT)`) writes the directory OUT:
  program.pt2   torch.export.save of the inference graph
                (words [B, T], chars [B, T, C], lengths [B]) -> (tags [B, T], confidence [B, T])
  export.json   vocabularies, tag scheme, padding ids and the graph's shape contract
`fastner.export.load(OUT)` returns an ExportedTagger whose predict() returns what
Tagger.predict returns; it imports neither the model code (fastner.models) nor the training
code (fastner.train): the weights and the computation live in program.pt2.

The graph takes padded tensors and lengths (no PackedSequence: packing sorts by data-dependent
lengths, which torch.export cannot trace). Where the compiled extension serves the recurrent
layer and the CRF (torch.ops.fastner.rnn_layer_forward, crf_viterbi, crf_marginals), those ops
appear in the graph as single nodes, traced through their fake kernels, and the batch and
sequence length are both dynamic (torch.export.Dim). On the reference path the recurrences are
Python loops over time that export unrolls, so there the sequence length is fixed at export
time (`max_length`, the batch stays dynamic): the runtime pads every batch to it and refuses
longer sentences with a clear error.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fastner import _extension
from fastner.program_check import check_program_archive
from fastner.storage import MissingFiles, json_bytes, read_file_set, write_file_set

PROGRAM_FILE = "program.pt2"
META_FILE = "export.json"
MANIFEST_FILE = "export-manifest.json"  # its own name: an export may sit in a tagger's directory
EXPORT_FORMAT = 1
DEFAULT_MAX_LENGTH = 64  # the fixed sequence length of a reference-path export
MAX_BATCH = 4096


# ---- the inference graph ---------------------------------------------------------------------

def _reverse_within_lengths(x: Tensor, lengths: Tensor) -> Tensor:
    """x: [B, T, F] -> each sequence's first lengths[b] steps reversed, padding left in place."""
    steps = torch.arange(x.shape[1], device=x.device).unsqueeze(0)  # [1, T]
    reversed_steps = lengths.unsqueeze(1) - 1 - steps  # [B, T]
    index = torch.where(reversed_steps >= 0, reversed_steps, steps)
    return x.gather(1, index.unsqueeze(2).expand(-1, -1, x.shape[2]))


def _padded_rnn(encoder: nn.RNNBase, x: Tensor, lengths: Tensor) -> Tensor:
    """A batch-first (bidirectional) torch LSTM/GRU/RNN on padded input without packing:
    x: [B, T, F], lengths: [B] -> [B, T, directions * H], zeros past each length.

    The forward direction is causal, so padding at the end cannot reach the valid steps; the
    backward direction runs forward over each sequence reversed within its length."""
    mode = encoder.mode  # 'LSTM', 'GRU', 'RNN_TANH', 'RNN_RELU'
    run = {"LSTM": torch.lstm, "GRU": torch.gru, "RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu}[mode]
    mask = (torch.arange(x.shape[1], device=x.device).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(2)
    batch = x.shape[0]
    for layer in range(encoder.num_layers):
        outputs = []
        for suffix in ([""] + (["_reverse"] if encoder.bidirectional else [])):
            names = [f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}"]
            if encoder.bias:
                names += [f"bias_ih_l{layer}{suffix}", f"bias_hh_l{layer}{suffix}"]
            params = [getattr(encoder, name) for name in names]
            h0 = x.new_zeros(1, batch, encoder.hidden_size)
            source = _reverse_within_lengths(x, lengths) if suffix else x
            hx = (h0, h0) if mode == "LSTM" else h0
            out = run(source, hx, params, encoder.bias, 1, 0.0, False, False, True)[0]  # [B, T, H]
            outputs.append(_reverse_within_lengths(out, lengths) if suffix else out)
        x = torch.cat(outputs, dim=2) * mask
    return x


def fused_paths(device: Union[str, torch.device] = "cpu") -> Dict[str, bool]:
    """Which parts of the graph the compiled extension serves on `device` (and so trace as
    single fastner ops with symbolic shapes)."""
    device = torch.device(device)
    return {
        "rnn": _extension.use_fused("rnn_layer_forward", device),
        "crf": all(_extension.use_fused(op, device) for op in ("crf_viterbi", "crf_marginals")),
    }


class InferenceGraph(nn.Module):
    """The tagger's prediction as one traceable function of padded tensors.

    forward(words [B, T] int64, chars [B, T, C] int64, lengths [B] int64)
      -> tags [B, T] int64 (-1 past each length), confidence [B, T] float32 (the posterior
         marginal, or softmax probability, of each chosen tag; 0 past each length)
    """

    def __init__(self, model: nn.Module, fused: Optional[Dict[str, bool]] = None):
        super().__init__()
        self.model = model
        self.fused = dict(fused if fused is not None else fused_paths(next(model.parameters()).device))

    def forward(self, words: Tensor, chars: Tensor, lengths: Tensor):
        model = self.model
        mask = torch.arange(words.shape[1], device=words.device).unsqueeze(0) < lengths.unsqueeze(1)  # [B, T]
        x = model.embed_words(words)
        if model.char_cnn is not None:
            x = torch.cat([x, model.char_cnn(chars, mask)], dim=-1)
        if self.fused["rnn"]:
            x, _ = model.encoder(x, lengths=lengths)
        else:
            x = _padded_rnn(model.encoder, x, lengths)
        emissions = model.output(x)  # [B, T, K]
        if model.crf is None:
            probabilities = emissions.float().softmax(dim=-1)
            tags = emissions.argmax(dim=-1).masked_fill(~mask, -1)
        elif self.fused["crf"]:
            tags, _ = model.crf.viterbi(emissions, mask)
            probabilities = model.crf.marginals(emissions, mask)
        else:
            from fastner import reference

            # the module's input checks compare tensors (data-dependent): call the math directly
            scores = model.crf._scores(emissions)
            tags, _ = reference.crf_viterbi(emissions, lengths, *scores)
            probabilities = reference.crf_marginals(emissions, lengths, *scores)
        confidence = probabilities.gather(-1, tags.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T]
        return tags, confidence.float() * mask


def export_program(model: nn.Module, max_length: Optional[int] = None,
                   fused: Optional[Dict[str, bool]] = None) -> "tuple[torch.export.ExportedProgram, Optional[int]]":
    """torch.export of InferenceGraph(model) (in eval mode, on the model's device).

    Returns (program, fixed_length): fixed_length None when the sequence length is dynamic,
    else the length every input must be padded to (reference path; max_length or 64)."""
    graph = InferenceGraph(model, fused).eval()
    device = next(model.parameters()).device
    dynamic_time = graph.fused["rnn"] and (model.crf is None or graph.fused["crf"])
    fixed_length = None if dynamic_time else int(max_length or DEFAULT_MAX_LENGTH)
    if fixed_length is not None and fixed_length < 2:
        raise ValueError(f"max_length must be >= 2, got {fixed_length}")
    example_len = 5 if dynamic_time else fixed_length
    # an example of 2 sentences (sizes 0 and 1 would be specialised), 3 chars a word
    words = torch.ones(2, example_len, dtype=torch.long, device=device)
    chars = torch.ones(2, example_len, 3, dtype=torch.long, device=device)
    lengths = torch.tensor([example_len, 1], dtype=torch.long, device=device)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    char_len = torch.export.Dim("chars", min=1, max=1024)
    time = torch.export.Dim("time", min=1, max=100_000) if dynamic_time else None
    shapes = ({0: batch, 1: time} if time is not None else {0: batch},
              {0: batch, 1: time, 2: char_len} if time is not None else {0: batch, 2: char_len},
              {0: batch})
    with torch.no_grad(), warnings.catch_warnings():
        # torch.nn.RNNBase refreshes its _flat_weights list in forward(); export reports that
        # assignment, but the list only aliases the registered parameters
        warnings.filterwarnings("ignore", message=r"The tensor attributes self\.model\.encoder\._flat_weights")
        program = torch.export.export(graph, (words, chars, lengths), dynamic_shapes=shapes)
    return program, fixed_length


def fastner_ops(program: "torch.export.ExportedProgram") -> List[str]:
    """Names of the torch.ops.fastner.* calls in an exported graph (e.g. ['crf_viterbi'])."""
    found = []
    for node in program.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("fastner."):
            found.append(str(node.target).split(".")[1])
    return found


def export_tagger(tagger, out_dir: str, max_length: Optional[int] = None) -> dict:
    """Write `tagger` (a fastner.Tagger) as an exported program directory; return its metadata."""
    import fastner
    from fastner.data.batching import MAX_WORD_CHARS

    model = tagger.model.eval()
    program, fixed_length = export_program(model, max_length)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    meta = {
        "format": EXPORT_FORMAT,
        "fastner_version": fastner.__version__,
        "torch_version": torch.__version__,
        "device": str(tagger.device),
        "fixed_length": fixed_length,
        "max_word_chars": MAX_WORD_CHARS,
        "fastner_ops": sorted(set(fastner_ops(program))),
        "scheme": model.config.scheme,
        "output_scheme": tagger.output_scheme,
        "digits_to_zero": tagger.digits_to_zero,
        "words": tagger.words.to_json(),
        "chars": tagger.chars.to_json(),
        "tags": tagger.tags.to_json(),
        # the frozen table's rows are in the program; its words are needed to find them
        "pretrained_words": tagger.pretrained_words,
    }
    # one set: a kill mid-write leaves the previous export or this one, never a mix
    write_file_set(out_dir, {PROGRAM_FILE: buffer.getvalue(), META_FILE: json_bytes(meta)}, manifest=MANIFEST_FILE)
    return meta


# ---- the runtime -----------------------------------------------------------------------------

class ExportedTagger:
    """Tags with an exported program: no model or training code involved.

    >>> tagger = fastner.export.load("exported/")
    >>> tagger.predict(["Apple hired Tim Cook ."])[0]["tags"]
    """

    def __init__(self, program: "torch.export.ExportedProgram", meta: dict):
        from fastner.data.vocab import Vocab
        from fastner.embeddings import word_rows

        self.program = program
        self.module = program.module()
        self.meta = meta
        self.words = Vocab.from_json(meta["words"])
        self.chars = Vocab.from_json(meta["chars"])
        self.tags = Vocab.from_json(meta["tags"])
        words = meta.get("pretrained_words")
        self.pretrained_index = None if words is None else word_rows(words)
        self.fixed_length: Optional[int] = meta["fixed_length"]
        self.device = torch.device(meta.get("device", "cpu"))

    def _run(self, sentences: Sequence[List[str]], batch_size: int):
        """Per sentence: (tags in the model's scheme, confidence of each tag)."""
        from fastner.predictions import check_batch_size

        check_batch_size(batch_size)
        from fastner.data.batching import encode_sentences, make_batch
        from fastner.data.conll import Sentence

        too_long = [i for i, s in enumerate(sentences) if self.fixed_length is not None and len(s) > self.fixed_length]
        if too_long:
            raise ValueError(f"sentence {too_long[0]} has {len(sentences[too_long[0]])} tokens; this export takes at "
                             f"most {self.fixed_length} (export again with a larger --max-length)")
        order = sorted((i for i, s in enumerate(sentences) if s), key=lambda i: len(sentences[i]))
        encoded = encode_sentences([Sentence(list(s)) for s in sentences], self.words, self.chars,
                                   digits_to_zero=self.meta["digits_to_zero"], pretrained=self.pretrained_index)
        results: List = [([], []) for _ in sentences]
        for begin in range(0, len(order), batch_size):
            index = order[begin : begin + batch_size]
            batch = make_batch(encoded, index, self.words.pad_id, self.chars.pad_id)
            words, chars = batch.words, batch.chars
            if self.fixed_length is not None and words.shape[1] < self.fixed_length:
                pad = self.fixed_length - words.shape[1]
                words = nn.functional.pad(words, (0, pad), value=self.words.pad_id)
                chars = nn.functional.pad(chars, (0, 0, 0, pad), value=self.chars.pad_id)
            with torch.no_grad():
                tags, confidence = self.module(words.to(self.device), chars.to(self.device),
                                               batch.lengths.to(self.device))
            tags, confidence = tags.cpu().tolist(), confidence.cpu().tolist()
            for row, sentence_index in enumerate(index):
                n = len(sentences[sentence_index])
                results[sentence_index] = ([self.tags.itos[t] for t in tags[row][:n]], confidence[row][:n])
        return results

    def tag(self, sentences: Sequence[List[str]], batch_size: int = 64) -> List[List[str]]:
        from fastner.data.schemes import convert_tags

        return [convert_tags(tags, self.meta["output_scheme"]) for tags, _ in self._run(sentences, batch_size)]

    def predict(self, batch: Sequence[Union[str, Sequence[str]]], batch_size: int = 64) -> List[dict]:
        """Like fastner.Tagger.predict: per sentence {'tokens', 'tags', 'spans'}."""
        from fastner.predictions import prediction, token_lists

        sentences = token_lists(batch)
        return [prediction(tokens, model_tags, confidence, self.meta["output_scheme"])
                for tokens, (model_tags, confidence) in zip(sentences, self._run(sentences, batch_size))]


def load(path: str) -> ExportedTagger:
    """Load a directory written by export_tagger() / `fastner export`."""
    program_path, meta_path = os.path.join(path, PROGRAM_FILE), os.path.join(path, META_FILE)
    try:
        contents = read_file_set(path, (PROGRAM_FILE, META_FILE), manifest=MANIFEST_FILE)
    except MissingFiles as err:
        raise FileNotFoundError(f"{path!r} is not a fastner export directory: missing {', '.join(err.missing)} "
                                "(written by `fastner export DIR OUT`)") from None
    try:
        meta = json.loads(contents[META_FILE].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path}: not valid UTF-8 JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path!r} holds export format {found!r}; this fastner reads format {EXPORT_FORMAT}")
    if meta.get("fastner_ops"):
        # the graph calls torch.ops.fastner.*: their kernels come with the compiled extension
        if not _extension.extension_loaded():
            raise RuntimeError(f"{path!r} calls fastner ops {meta['fastner_ops']} but the compiled extension "
                               f"could not be loaded: {_extension.load_error()}")
    # checked in memory, then those same bytes loaded: torch.export.load alone may run code
    # from the archive (see fastner.program_check)
    program_bytes = contents[PROGRAM_FILE]
    check_program_archive(program_bytes, program_path)
    try:
        program = torch.export.load(io.BytesIO(program_bytes))
    except Exception as err:  # a corrupt archive fails deep inside torch's deserializer
        raise ValueError(f"{program_path}: not a loadable torch.export program ({type(err).__name__}: {err})") from None
    return ExportedTagger(program, meta)
