"""Export a trained tagger with torch.export, and tag with the exported program alone.

`fastner export DIR OUT` (or `export_tagger(Tagger.load(DIR), OUT)`) writes the directory OUT:
  program.pt2   torch.export.save of SequenceTagger.infer, the model's one inference method
                (words [B, T], chars [B, T, C], lengths [B]) -> (tags [B, T], log_z [B], emissions [B, T, K])
  export.json   vocabularies, tag scheme, transition scores, padding ids, the graph's shape contract
                and the precision its encoder was exported at (fp32, bf16 or int8: checked at load
                against the weights program.pt2 holds)
  export-pretrained-words.bin  (a model with a frozen pretrained table: format 3) the word of each
                row with the hash table that finds a word's row, fastner.embeddings.WordIndex as
                a saved tagger's pretrained_words.bin holds it: read with no work per word (format
                2 listed GloVe's 400k words in export.json, and each load parsed them and built
                their dict, ~0.2 s of a ~0.75 s load of the CoNLL GloVe export)
`fastner.export.load(OUT)` returns an ExportedTagger whose predict() returns what
Tagger.predict returns; it imports neither the model code (fastner.models) nor the training
code (fastner.train): the weights and the computation live in program.pt2.

The graph takes padded tensors and lengths (no PackedSequence: packing sorts by data-dependent
lengths, which torch.export cannot trace). Where the compiled extension serves the recurrent
layer and the CRF (torch.ops.fastner.rnn_layer_forward, crf_viterbi, crf_forward), those ops
appear in the graph as single nodes, traced through their fake kernels, and the batch and
sequence length are both dynamic (torch.export.Dim). On the reference path the recurrences are
Python loops over time that export unrolls, so there the sequence length is fixed at export
time (`max_length`, the batch stays dynamic): the runtime pads every batch to it and refuses
longer sentences with a clear error.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fastner import _extension
from fastner.embeddings import WordIndex, word_rows
from fastner.program_check import check_program_archive
from fastner.storage import MissingFiles, json_bytes, open_file_set, write_file_set

PROGRAM_FILE = "program.pt2"
META_FILE = "export.json"
MANIFEST_FILE = "export-manifest.json"  # its own name: an export may sit in a tagger's directory
EXPORT_FORMAT = 2  # 2: the graph is SequenceTagger.infer (tags, log_z, emissions)
# 3: format 2 with the pretrained words in PRETRAINED_INDEX_FILE, not export.json; written only
# with a pretrained table, so an older fastner reads every export it can tag with
INDEX_FORMAT = 3
# not the tagger's pretrained_words.bin: an export may sit in a tagger's directory
PRETRAINED_INDEX_FILE = "export-pretrained-words.bin"
DEFAULT_MAX_LENGTH = 64  # the fixed sequence length of a reference-path export
MAX_BATCH = 4096  # the bounds of the dynamic batch and sequence length (the runtime keeps within them)
MAX_TIME = 100_000
# the precisions a tagger's encoder runs in (fastner.tagger.PRECISIONS, Tagger.load(precision=))
# and the dtype of the weights that give each away in a model or program (fp32: neither); an
# export.json written before it recorded "precision" is read as what its program holds
PRECISION_WEIGHTS = {"fp32": None, "bf16": torch.bfloat16, "int8": torch.int8}


# ---- the inference graph ---------------------------------------------------------------------

def fused_paths(device: Union[str, torch.device] = "cpu") -> Dict[str, bool]:
    """Which parts of the graph the compiled extension serves on `device` (and so trace as
    single fastner ops with symbolic shapes)."""
    device = torch.device(device)
    return {
        "rnn": _extension.use_fused("rnn_layer_forward", device),
        "crf": all(_extension.use_fused(op, device) for op in ("crf_viterbi", "crf_forward")),
    }


class InferenceGraph(nn.Module):
    """SequenceTagger.infer as a module to trace: the one inference computation that
    Tagger.predict runs, so the exported program cannot drift from it.

    forward(words [B, T] int64, chars [B, T, C] int64, lengths [B] int64)
      -> tags [B, T] int64 (-1 past each length), log_z [B], emissions [B, T, K] float32
    """

    def __init__(self, model: nn.Module, fused: Optional[Dict[str, bool]] = None):
        super().__init__()
        self.model = model
        self.fused = dict(fused if fused is not None else fused_paths(next(model.parameters()).device))

    def forward(self, words: Tensor, chars: Tensor, lengths: Tensor):
        return self.model.infer(words, chars, lengths)


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
    time = torch.export.Dim("time", min=1, max=MAX_TIME) if dynamic_time else None
    shapes = ({0: batch, 1: time} if time is not None else {0: batch},
              {0: batch, 1: time, 2: char_len} if time is not None else {0: batch, 2: char_len},
              {0: batch})
    with torch.no_grad(), warnings.catch_warnings(), _row_major_buffers(model):
        # torch.nn.RNNBase refreshes its _flat_weights list in forward(); export reports that
        # assignment, but the list only aliases the registered parameters
        warnings.filterwarnings("ignore", message=r"The tensor attributes self\.model\.encoder\._flat_weights")
        program = torch.export.export(graph, (words, chars, lengths), dynamic_shapes=shapes)
    return program, fixed_length


@contextlib.contextmanager
def _row_major_buffers(model: nn.Module):
    """The model's buffers made contiguous while it is traced (and put back after): a column-major
    buffer (a pretrained table mapped from an older pretrained.npy) is stored in program.pt2 as
    a view no saved tensor covers, and torch.export.save warns "No complete tensor found in the
    group!" and saves its whole storage as a flat tensor."""
    replaced = []
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_contiguous():
                replaced.append((module, name, buffer))
    try:
        for module, name, buffer in replaced:
            module._buffers[name] = buffer.contiguous()
        yield
    finally:
        for module, name, buffer in replaced:
            module._buffers[name] = buffer


def weights_precision(tensors) -> str:
    """The precision (a PRECISION_WEIGHTS name) that `tensors`, the weights of a model or
    program, were quantized to: 'int8' or 'bf16' where weights of that dtype are among them."""
    dtypes = {tensor.dtype for tensor in tensors if isinstance(tensor, Tensor)}
    return next((name for name, dtype in PRECISION_WEIGHTS.items() if dtype in dtypes), "fp32")


def _program_precision(program: "torch.export.ExportedProgram") -> str:
    return weights_precision([*program.state_dict.values(), *program.constants.values()])


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

    from fastner.tagger import _nonfinite

    model = tagger.model.eval()
    broken = _nonfinite(model.state_dict())
    if broken:  # Tagger.save refuses them too: the program would tag every sentence as garbage
        raise ValueError(f"this tagger's weights hold nan or inf values ({broken}): not exported")
    program, fixed_length = export_program(model, max_length)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    index = tagger.word_index()
    meta = {
        "format": EXPORT_FORMAT if index is None else INDEX_FORMAT,
        "fastner_version": fastner.__version__,
        "torch_version": torch.__version__,
        "device": str(tagger.device),
        "precision": weights_precision([*model.parameters(), *model.buffers()]),
        "fixed_length": fixed_length,
        "max_word_chars": MAX_WORD_CHARS,
        "fastner_ops": sorted(set(fastner_ops(program))),
        "scheme": model.config.scheme,
        # span probabilities and k-best paths need the transition scores the graph decoded with
        # (-inf, a forbidden transition, written as null)
        "transition_scores": [_json_floats(t) for t in model.transition_scores()],
        "output_scheme": tagger.output_scheme,
        "digits_to_zero": tagger.digits_to_zero,
        "words": tagger.words.to_json(),
        "chars": tagger.chars.to_json(),
        "tags": tagger.tags.to_json(),
    }
    # the frozen table's rows are in the program; its words are needed to find them (None: an
    # earlier export's index leaves the set)
    files = {PROGRAM_FILE: buffer.getvalue(), META_FILE: json_bytes(meta),
             PRETRAINED_INDEX_FILE: None if index is None else index.to_bytes()}
    # one set: a kill mid-write leaves the previous export or this one, never a mix
    write_file_set(out_dir, files, manifest=MANIFEST_FILE)
    return meta


def _json_floats(tensor: Tensor):
    return [None if v == float("-inf") else v for v in tensor.flatten().tolist()] if tensor.dim() == 1 else \
        [_json_floats(row) for row in tensor]


def _tensor_from_json(values) -> Tensor:
    def fill(v):
        return [fill(x) for x in v] if isinstance(v, list) else (float("-inf") if v is None else float(v))

    return torch.tensor(fill(values), dtype=torch.float32)


# ---- the runtime -----------------------------------------------------------------------------

class ExportedTagger:
    """Tags with an exported program: no model or training code involved.

    >>> tagger = fastner.export.load("exported/")
    >>> tagger.predict(["Apple hired Tim Cook ."])[0]["tags"]
    """

    def __init__(self, program: "torch.export.ExportedProgram", meta: dict,
                 pretrained_index: Optional[WordIndex] = None):
        """pretrained_index: the words of the program's frozen table (format 3); format 2
        lists them as meta["pretrained_words"]."""
        from fastner.data.vocab import Vocab

        self.program = program
        self.module = program.module()
        self.meta = meta
        self.words = Vocab.from_json(meta["words"])
        self.chars = Vocab.from_json(meta["chars"])
        self.tags = Vocab.from_json(meta["tags"])
        words = meta.get("pretrained_words")
        self.pretrained_index: Union[WordIndex, Dict[str, int], None] = \
            pretrained_index if pretrained_index is not None or words is None else word_rows(words)
        self.fixed_length: Optional[int] = meta["fixed_length"]
        # as export_tagger recorded it (fp32, bf16, int8), or as the program's weights show it
        self.precision: str = meta.get("precision") or _program_precision(program)
        self.device = torch.device(meta.get("device", "cpu"))

    def analyser(self):
        from fastner.inference import Analyser

        scores = tuple(_tensor_from_json(t) for t in self.meta["transition_scores"])
        return Analyser(self.module, self.words, self.chars, self.tags, self.meta["digits_to_zero"], scores,
                        self.device, fixed_length=self.fixed_length, pretrained=self.pretrained_index,
                        max_length=MAX_TIME, max_batch=MAX_BATCH)

    def tag(self, sentences: Sequence[List[str]], batch_size: int = 64) -> List[List[str]]:
        from fastner.data.schemes import convert_tags
        from fastner.documents import token_lists

        analyses = self.analyser().analyse(token_lists(sentences), batch_size, scores=False)
        return [convert_tags(a.tags, self.meta["output_scheme"]) for a in analyses]

    def predict(self, x, batch_size: int = 64, nbest: Optional[int] = None):
        """Like fastner.Tagger.predict: raw documents or token lists (see fastner.documents)."""
        from fastner.documents import predict

        return predict(self.analyser(), x, self.meta["output_scheme"], batch_size, nbest)


def _check_meta(meta: dict, meta_path: str) -> None:
    """ValueError naming export.json and the field where a field the runtime reads is missing or
    does not fit the others (a KeyError or TypeError when tagging, or silently wrong tags and
    span probabilities, otherwise)."""
    from fastner.data.schemes import canonical_scheme
    from fastner.data.vocab import Vocab

    def fail(field: str, expected: str):
        found = repr(meta[field])[:80] if field in meta else "nothing"
        return ValueError(f"{meta_path}: {field!r} must be {expected}, got {found}")

    try:
        vocabularies = {name: Vocab.from_json(meta[name]) for name in ("words", "chars", "tags")}
    except (KeyError, ValueError) as err:
        raise ValueError(f"{meta_path}: the vocabularies are missing or invalid ({err})") from None
    if vocabularies["words"].unk_id is None or vocabularies["chars"].unk_id is None:
        raise ValueError(f"{meta_path}: the word and char vocabularies must hold the unknown entry")
    fixed = meta.get("fixed_length", "absent")
    if fixed is not None and (not isinstance(fixed, int) or isinstance(fixed, bool) or fixed < 2):
        raise fail("fixed_length", "null or an integer >= 2")

    def is_row(row, size: int) -> bool:  # of numbers, or null for a forbidden transition (-inf)
        return isinstance(row, list) and len(row) == size and all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in row)

    k = len(vocabularies["tags"])
    scores = meta.get("transition_scores")
    if not (isinstance(scores, list) and len(scores) == 3 and isinstance(scores[0], list) and len(scores[0]) == k
            and all(is_row(row, k) for row in scores[0]) and is_row(scores[1], k) and is_row(scores[2], k)):
        raise fail("transition_scores", f"[transitions [{k}, {k}], start [{k}], end [{k}]] for the {k} tags")
    try:
        canonical_scheme(meta.get("output_scheme"))
    except ValueError:
        raise fail("output_scheme", "a tag scheme") from None
    if not isinstance(meta.get("digits_to_zero"), bool):
        raise fail("digits_to_zero", "true or false")
    words = meta.get("pretrained_words")
    if meta["format"] == INDEX_FORMAT and "pretrained_words" in meta:  # two lists of the words
        raise fail("pretrained_words", f"absent in format {INDEX_FORMAT} (the words are in {PRETRAINED_INDEX_FILE})")
    if words is not None and (not isinstance(words, list) or not all(isinstance(w, str) for w in words)):
        raise fail("pretrained_words", "null or a list of strings")
    if meta.get("precision", "fp32") not in PRECISION_WEIGHTS:
        raise fail("precision", f"one of {', '.join(PRECISION_WEIGHTS)}")
    try:
        device = torch.device(meta.get("device", "cpu"))
    except (RuntimeError, TypeError):
        raise fail("device", "a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{meta_path}: the program was exported on {device}, and this machine has no CUDA device")


def load(path: str) -> ExportedTagger:
    """Load a directory written by export_tagger() / `fastner export`."""
    program_path, meta_path = os.path.join(path, PROGRAM_FILE), os.path.join(path, META_FILE)
    try:
        # one set: the index too comes from the set the program comes from
        with open_file_set(path, (PROGRAM_FILE, META_FILE), optional=(PRETRAINED_INDEX_FILE,),
                           manifest=MANIFEST_FILE) as files:
            contents, damaged = files.data, files.errors.get(PRETRAINED_INDEX_FILE)
    except MissingFiles as err:
        raise _not_an_export(path, err.missing) from None
    try:
        meta = json.loads(contents[META_FILE].decode("utf-8"))
    # ValueError: JSONDecodeError, an integer of too many digits; RecursionError: nested too deep
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{meta_path}: not valid UTF-8 JSON ({err})") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if isinstance(found, bool) or found not in (EXPORT_FORMAT, INDEX_FORMAT):
        raise ValueError(f"{path!r} holds export format {found!r}; this fastner reads formats "
                         f"{EXPORT_FORMAT} and {INDEX_FORMAT}")
    _check_meta(meta, meta_path)
    index = None
    if found == INDEX_FORMAT:
        if PRETRAINED_INDEX_FILE not in contents:
            if damaged is not None and not isinstance(damaged, MissingFiles):
                raise damaged  # altered after it was saved: it failed its manifest check
            raise _not_an_export(path, [PRETRAINED_INDEX_FILE])
        try:
            index = WordIndex.from_bytes(contents[PRETRAINED_INDEX_FILE])
        except ValueError as err:
            raise ValueError(f"{os.path.join(path, PRETRAINED_INDEX_FILE)}: cannot read the pretrained words: "
                             f"{err}") from None
    if meta.get("fastner_ops"):
        # the graph calls torch.ops.fastner.*: their kernels come with the compiled extension
        if not _extension.extension_loaded():
            # no load error: FASTNER_BACKEND=reference, which never loads it (the message said "None")
            why = _extension.load_error() or f"{_extension.ENV_VAR}=reference keeps it unloaded"
            raise RuntimeError(f"{path!r} calls fastner ops {meta['fastner_ops']} but the compiled extension "
                               f"could not be loaded: {why}")
    # checked in memory, then those same bytes loaded: torch.export.load alone may run code
    # from the archive (see fastner.program_check)
    program_bytes = contents[PROGRAM_FILE]
    check_program_archive(program_bytes, program_path)
    with _torch_export_log() as logged:
        try:
            program = torch.export.load(io.BytesIO(program_bytes))
        except Exception as err:  # a corrupt archive fails deep inside torch's deserializer
            # torch logs the first failure (with its traceback) and raises a second error that
            # only says "check the warnings above": the logged one is the cause
            cause = logged[0] if logged else f"{type(err).__name__}: {err}"
            raise ValueError(f"{program_path}: not a loadable torch.export program ({cause})") from None
    _check_fits_program(meta, program, meta_path, index)
    return ExportedTagger(program, meta, index)


def _not_an_export(path: str, missing: Sequence[str]) -> FileNotFoundError:
    return FileNotFoundError(f"{path!r} is not a fastner export directory: missing {', '.join(missing)} "
                             "(written by `fastner export DIR OUT`)")


# where SequenceTagger keeps the tables the runtime indexes through export.json's vocabularies
_TABLES = {"words": "model.word_embedding.weight", "chars": "model.char_cnn.embedding.weight"}


def _check_fits_program(meta: dict, program: "torch.export.ExportedProgram", meta_path: str,
                        index: Optional[WordIndex] = None) -> None:
    """ValueError where export.json does not describe program.pt2 (the two files of two exports,
    put together by hand): its precision, and the sizes of the vocabularies the program indexes
    and of the tag set it scores (an IndexError or a RuntimeError deep in the graph when
    tagging, otherwise). An export.json without "precision" gets the program's."""
    from fastner.data.vocab import Vocab

    def mismatch(field: str, found, held) -> ValueError:
        return ValueError(f"{meta_path}: {field!r} {found}, but {PROGRAM_FILE} {held} "
                          "(the two files do not belong together)")

    held = _program_precision(program)
    if meta.setdefault("precision", held) != held:
        raise mismatch("precision", f"is {meta['precision']!r}", f"holds {held} weights")
    tensors = {**program.state_dict, **program.constants}
    sizes = {field: tensors[name].shape[0] for field, name in _TABLES.items() if name in tensors}
    output = next(node for node in program.graph.nodes if node.op == "output").args[0]
    emissions = output[2].meta.get("val") if len(output) == 3 and hasattr(output[2], "meta") else None
    if emissions is not None and isinstance(emissions.shape[-1], int):
        sizes["tags"] = emissions.shape[-1]
    for field, size in sizes.items():
        if len(Vocab.from_json(meta[field])) != size:
            raise mismatch(field, f"lists {len(Vocab.from_json(meta[field]))} entries", f"was exported with {size}")
    if _TABLES["words"] in tensors:  # a model of SequenceTagger's: a frozen table, or none
        rows = tensors["model.pretrained"].shape[0] if "model.pretrained" in tensors else 0
        field, words = ("pretrained_words", meta.get("pretrained_words")) if index is None else \
            (PRETRAINED_INDEX_FILE, index)
        if len(words or ()) != rows:
            raise mismatch(field, f"lists {len(words or ())} words", f"holds {rows} pretrained rows")


@contextlib.contextmanager
def _torch_export_log():
    """The messages torch.export logs while loading, kept from the user's stderr: on a corrupt
    archive torch.export.load logs a full traceback as a warning before it raises."""
    logger = logging.getLogger("torch.export")  # the logger of torch.export.load itself
    logged: List[str] = []

    def keep(record: logging.LogRecord) -> bool:  # a logger's filter: kept here, not emitted
        error = record.exc_info[1] if record.exc_info else None
        logged.append(f"{type(error).__name__}: {error}" if error is not None else record.getMessage())
        return False

    logger.addFilter(keep)
    try:
        yield logged
    finally:
        logger.removeFilter(keep)
