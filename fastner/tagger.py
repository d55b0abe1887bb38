"""fastner.Tagger: a trained tagger saved in one directory, loaded back to tag text.

The directory holds config.json (model and data settings), vocab.json (word, char and tag
vocabularies), weights.pt (the model's state_dict, read with torch.load(weights_only=True) and
nothing else) and manifest.json (their hashes: fastner.storage writes the files as one set, so a
kill mid-save leaves the old tagger or the new one, never a mix). A model trained with pretrained
vectors also holds its frozen pretrained table: pretrained.npy (float16 [N, dim], a plain .npy
opened with numpy's memory map, no pickle) and pretrained_words.bin (the word of each row, with
the hash table that finds a word's row: fastner.embeddings.WordIndex), so the directory tags on a
machine without the vectors package. Format 1 held the words as a JSON list, pretrained_words.json
(still read); a tagger without a pretrained table is saved in format 1, as before.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Union

import torch

from fastner.data.conll import Sentence
from fastner.data.schemes import canonical_scheme, convert_tags, detect_scheme
from fastner.data.vocab import PAD, UNK, Vocab
from fastner.embeddings import WordIndex, word_rows
from fastner.models.tagger import ModelConfig, SequenceTagger
from fastner.devices import resolve_device
from fastner.storage import (FileSet, MissingFiles, StorageError, UnsafeTorchFile, json_bytes, open_file_set,
                             torch_bytes, weights_only_load, write_file_set)

if TYPE_CHECKING:  # imported where used: inference imports the model code
    from fastner.inference import Analyser

FORMAT_VERSION = 1
# with a pretrained table: its words in PRETRAINED_INDEX_FILE (format 1: PRETRAINED_WORDS_FILE,
# a JSON list, whose parsing and dict took ~60% of a GloVe model's load)
TABLE_FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "weights.pt"
PRETRAINED_VECTORS_FILE = "pretrained.npy"
PRETRAINED_WORDS_FILE = "pretrained_words.json"
PRETRAINED_INDEX_FILE = "pretrained_words.bin"


# Tagger.load(precision=...): the name and the dtype fastner.nn.quantize gets (None: as trained).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "int8": torch.qint8}


class TaggerLoadError(ValueError):
    """A tagger directory that is missing, incomplete or written by an incompatible version."""


def _json_file(data: bytes, path: str):
    """JSON from `data` (the bytes of `path`); errors name the file and line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise TaggerLoadError(f"{path}:{line}: not UTF-8 (byte {data[err.start]:#04x})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise TaggerLoadError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except (ValueError, RecursionError) as err:  # an integer of too many digits, arrays nested too deep
        raise TaggerLoadError(f"{path}: not valid JSON ({err})") from None


def _state_dict_file(data: bytes, path: str) -> Dict[str, torch.Tensor]:
    """The state dict in weights.pt bytes, read with the weights_only loader (never a fallback)."""
    if not data:
        raise TaggerLoadError(f"{path} is empty (0 bytes): the save that wrote it did not finish")
    try:
        state = weights_only_load(data)
    except UnsafeTorchFile as err:
        raise TaggerLoadError(f"{path} is not a weights file fastner can read safely: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise TaggerLoadError(f"{path} holds a {type(state).__name__}, expected a state dict "
                              "(parameter names to tensors)")
    # training stops at a non-finite loss before it saves, and Tagger.save refuses such weights,
    # so nan/inf weights are a damaged file (read without a manifest): they would tag every
    # sentence as garbage
    damaged = _nonfinite(state)
    if damaged:
        raise TaggerLoadError(f"{path}: {damaged} holds nan or inf values (a damaged weights file)")
    return state


def _nonfinite(state: Dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating tensor of `state` holding a nan or inf, or None."""
    return next((name for name, value in state.items()
                 if value.is_floating_point() and not torch.isfinite(value).all()), None)


class _InitsSkipped(torch.overrides.TorchFunctionMode):
    """nn.init.normal_ (nn.Embedding's init) left out while the meta skeleton is built: on a meta
    tensor it runs torch's Python reference, whose first call imports torch._dynamo (1.3-1.6 s of
    the first load in every process: each `fastner tag`, each server start); initial values mean
    nothing on meta."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.init.normal_:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _load_weights(model: SequenceTagger, state: Dict[str, torch.Tensor], path: str) -> None:
    """model.load_state_dict(state), a mismatch as a TaggerLoadError naming `path`. On a model
    on the meta device this checks the names and shapes alone (copying there is a no-op)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
            model.load_state_dict(state)
    except (RuntimeError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise TaggerLoadError(f"{path}: the weights do not fit the model in {CONFIG_FILE}: {reason[:400]}") from None


class _TableScan:
    """pretrained.npy's header, and whether it holds a nan or inf, found as fastner.storage hashes
    the file (one pass over blocks already in cache: the memory map is not touched at load).

    As for weights.pt: a saved table is finite, and a nan row would tag every sentence with its
    word as garbage. An IEEE float is non-finite iff its exponent bits are all ones, so the check
    is one AND and one max over the raw bits of each block (np.isfinite on the mapped table took
    ~35 ms of a ~0.3 s load for GloVe's 400k rows, most of it faulting in the map)."""

    # float dtype -> (the unsigned view of its bits, its exponent mask)
    EXPONENT = {"f2": ("u2", 0x7C00), "f4": ("u4", 0x7F800000)}

    def __call__(self, offset: int, block: bytes) -> None:
        import numpy as np

        if offset == 0:  # a pass over the file (again, if the set was replaced while read)
            self.header, self.error, self.nonfinite, self.pending = None, None, False, b""
            self.header = self._read_header(block)
            if self.header is None:
                return
            _, _, dtype, start, nbytes = self.header
            bits = self.EXPONENT.get(f"{dtype.kind}{dtype.itemsize}")
            self.bits = None if bits is None else (np.dtype(bits[0]).newbyteorder(dtype.byteorder), bits[1])
            self.scanned, self.end = start, start + nbytes
        if self.header is None or self.bits is None or self.nonfinite:
            return
        # the bytes of the array in this block (past the header, before any trailing bytes),
        # after what a block boundary cut off an element
        data = self.pending + block[max(self.scanned - offset, 0): max(self.end - offset, 0)]
        self.scanned = min(offset + len(block), self.end)
        uint, mask = self.bits
        whole = len(data) - len(data) % uint.itemsize
        self.pending = data[whole:]
        if whole:
            values = np.frombuffer(data, dtype=uint, count=whole // uint.itemsize)
            self.nonfinite = bool((values & mask).max() == mask)

    def _read_header(self, block: bytes):
        """(shape, fortran_order, dtype, data offset, data bytes), or None with self.error."""
        import numpy as np

        stream = io.BytesIO(block)
        try:
            version = np.lib.format.read_magic(stream)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"npy format version {version} is not supported")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(stream)
        except (ValueError, EOFError) as err:
            self.error = str(err)
            return None
        if dtype.hasobject:  # loading it would unpickle
            self.error = "it holds Python objects (an object array), not numbers"
            return None
        count = 1
        for size in shape:
            count *= size
        return shape, fortran, dtype, stream.tell(), count * dtype.itemsize


def _load_pretrained_table(files: FileSet, scan: _TableScan, path: str, config: ModelConfig, version: int):
    """(frozen table [rows, dim] memory-mapped from pretrained.npy, its words: _pretrained_words
    from the file of the tagger format `version`), or (None, None) for a model without one; both
    from `files` (one set, checked against its manifest). ValueError says what is missing or
    does not fit."""
    if not config.pretrained_rows:
        return None, None
    import numpy as np

    damaged = [err for name, err in files.errors.items() if not isinstance(err, MissingFiles)]
    if damaged:
        raise damaged[0]
    words_file = PRETRAINED_INDEX_FILE if version == TABLE_FORMAT_VERSION else PRETRAINED_WORDS_FILE
    missing = [name for name, there in ((PRETRAINED_VECTORS_FILE, PRETRAINED_VECTORS_FILE in files.handles),
                                        (words_file, words_file in files.data)) if not there]
    if missing:
        raise ValueError(f"the model has {config.pretrained_rows} pretrained rows but {', '.join(missing)} "
                         "is missing")
    words = _pretrained_words(files.data[words_file], os.path.join(path, words_file), config.pretrained_rows)
    header = getattr(scan, "header", None)
    if header is None:
        reason = getattr(scan, "error", None) or "the file is empty"
        raise ValueError(f"{PRETRAINED_VECTORS_FILE}: cannot read the pretrained table: {reason}")
    shape, fortran, dtype, start, _ = header
    expected = (config.pretrained_rows, config.word_dim)
    if shape != expected or dtype not in (np.float16, np.float32):
        raise ValueError(f"{PRETRAINED_VECTORS_FILE} holds {dtype} {list(shape)}, expected float16 {list(expected)}")
    if scan.nonfinite:
        raise ValueError(f"{PRETRAINED_VECTORS_FILE} holds nan or inf values (a damaged file)")
    try:
        # the very file checked (a save may have put another in its place since); copy-on-write
        # map: pages are shared with the file until written (never, the table is frozen), and
        # torch gets a writable array
        vectors = np.memmap(files.handles[PRETRAINED_VECTORS_FILE], dtype=dtype, mode="c", offset=start,
                            shape=shape, order="F" if fortran else "C")
    except (OSError, ValueError) as err:  # ValueError: shorter than its header says
        raise ValueError(f"{PRETRAINED_VECTORS_FILE}: cannot read the pretrained table: {err}") from None
    return torch.from_numpy(vectors), words


def _pretrained_words(data: bytes, path: str, rows: int) -> Union[WordIndex, List[str]]:
    """The `rows` words in `data`, the bytes of `path`: the WordIndex in pretrained_words.bin, or
    the list in format 1's pretrained_words.json."""
    name = os.path.basename(path)
    if name == PRETRAINED_INDEX_FILE:
        try:
            words = WordIndex.from_bytes(data)
        except ValueError as err:
            raise ValueError(f"{name}: cannot read the pretrained words: {err}") from None
    else:
        words = _json_file(data, path)
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"{name} must be a list of {rows} strings")
    if len(words) != rows:
        raise ValueError(f"{name} must hold {rows} words, one per pretrained row, got {len(words)}")
    return words


class Tagger:
    """A trained model with its vocabularies.

    >>> tagger = fastner.Tagger.load("runs/conll")
    >>> tagger.predict("Apple hired Tim Cook in Cupertino.")["entities"]
    [{'start': 0, 'end': 5, 'label': 'ORG', 'text': 'Apple', 'score': 0.99}, ...]
    """

    def __init__(self, model: SequenceTagger, words: Vocab, chars: Vocab, tags: Vocab,
                 output_scheme: str = "IOB2", digits_to_zero: bool = False,
                 device: Union[str, torch.device, None] = None,
                 pretrained_words: Union[Sequence[str], WordIndex, None] = None):
        """pretrained_words: the word of each row of model.pretrained (the frozen table), which
        a model trained with pretrained vectors must be given (a list, or their WordIndex)."""
        rows = model.config.pretrained_rows
        if (pretrained_words is None) != (rows == 0) or (pretrained_words is not None and len(pretrained_words) != rows):
            raise ValueError(f"pretrained_words must name each of the model's {rows} pretrained rows, got "
                             f"{'none' if pretrained_words is None else len(pretrained_words)}")
        self.model = model
        self.words, self.chars, self.tags = words, chars, tags
        # word -> row of the frozen table (fastner.data.vocab.word_lookup): a list's dict (a
        # trained model, format 1), else the WordIndex a load read (no dict to build)
        self._pretrained_words: Optional[List[str]] = None
        self.pretrained_index: Union[Dict[str, int], WordIndex, None] = pretrained_words
        if pretrained_words is not None and not isinstance(pretrained_words, WordIndex):
            self._pretrained_words = list(pretrained_words)
            self.pretrained_index = word_rows(self._pretrained_words)
        self.output_scheme = canonical_scheme(output_scheme)
        self.digits_to_zero = digits_to_zero
        self.device = resolve_device(device)
        self.model.to(self.device).eval()

    @property
    def pretrained_words(self) -> Optional[List[str]]:
        """The word of each row of the frozen table (None without one); from a loaded WordIndex
        when first asked for (a load makes no list: GloVe's 400k strings took ~10% of one)."""
        if self._pretrained_words is None and self.pretrained_index is not None:
            self._pretrained_words = self.pretrained_index.words()
        return self._pretrained_words

    @property
    def precision(self) -> str:
        """What the model runs in: "int8" or "bf16" where its recurrent layers were quantized
        (Tagger.load(precision=...), fastner.nn.quantize), else its weights' dtype ("fp32", or
        e.g. "float64" after model.double())."""
        from fastner.nn.quantize import _QUANTIZED, _bf16_classes

        modules = list(self.model.modules())
        if any(isinstance(m, _QUANTIZED) for m in modules):
            return "int8"
        if any(isinstance(m, _bf16_classes()) for m in modules):
            return "bf16"
        dtype = next(self.model.parameters()).dtype
        return "fp32" if dtype == torch.float32 else str(dtype).replace("torch.", "")

    def word_index(self) -> Optional[WordIndex]:
        """The frozen table's words as the WordIndex a save and an export write (None without a
        table): a trained tagger's dict is built into one once, and the index takes its place."""
        if self.pretrained_index is not None and not isinstance(self.pretrained_index, WordIndex):
            self.pretrained_index = WordIndex.build(self.pretrained_words)
        return self.pretrained_index

    # ---- persistence -----------------------------------------------------------------------

    def config_json(self) -> dict:
        import fastner

        return {
            # format 1 where it suffices: an older fastner reads the directory
            "format_version": FORMAT_VERSION if self.pretrained_index is None else TABLE_FORMAT_VERSION,
            "fastner_version": fastner.__version__,
            "model": self.model.config.to_json(),
            "output_scheme": self.output_scheme,
            "digits_to_zero": self.digits_to_zero,
        }

    def files(self, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Optional[bytes]]:
        """The directory's files (name -> bytes; None: a file this tagger has not, which a tagger
        saved there before may have left, fastner.storage.write_file_set). `state_dict`
        overrides the live weights."""
        vocab = {"words": self.words.to_json(), "chars": self.chars.to_json(), "tags": self.tags.to_json()}
        weights = state_dict if state_dict is not None else self.model.state_dict()
        # a bf16 encoder (Tagger.load(precision="bf16")) holds its weights rounded to bf16 and has
        # no float32 copy: saved, they would silently replace the trained weights with rounded
        # ones (int8 keeps the float32 parameters and saves them unchanged)
        rounded = [name for name, value in weights.items() if value.dtype == torch.bfloat16]
        if rounded:
            raise ValueError(f"this tagger holds bfloat16 weights ({rounded[0]}, inference only: precision='bf16'); "
                             "saving them would replace the trained float32 weights with rounded ones: save the "
                             "tagger loaded in fp32")
        broken = _nonfinite(weights)
        if broken:  # saved, the directory would not load (as a damaged file) nor tag anything
            raise ValueError(f"this tagger's weights hold nan or inf values ({broken}): not saved")
        files = {CONFIG_FILE: json_bytes(self.config_json()), VOCAB_FILE: json_bytes(vocab),
                 WEIGHTS_FILE: torch_bytes({k: v.detach().cpu() for k, v in weights.items()})}
        if self.model.pretrained is not None:
            import numpy as np

            buffer = io.BytesIO()
            # row-major: the table may come column-major (GloVe's arrays do), and a mapped table
            # keeps the file's order (torch.export then finds no tensor covering its storage)
            np.save(buffer, np.ascontiguousarray(self.model.pretrained.detach().cpu().numpy()), allow_pickle=False)
            files[PRETRAINED_VECTORS_FILE] = buffer.getvalue()
            files[PRETRAINED_INDEX_FILE] = self.word_index().to_bytes()
        else:  # not an older tagger's table left in the set (read, hashed and copied along with it)
            files[PRETRAINED_VECTORS_FILE] = files[PRETRAINED_INDEX_FILE] = None
        files[PRETRAINED_WORDS_FILE] = None  # format 1's word list, where this overwrites such a tagger
        return files

    def save(self, path: str, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Write the directory as one set (fastner.storage.write_file_set)."""
        write_file_set(path, self.files(state_dict))

    @classmethod
    def load(cls, path: str, device: Union[str, torch.device, None] = None, precision: str = "fp32") -> "Tagger":
        """The tagger saved in `path`, on `device`, its recurrent encoder running in `precision`:
        'fp32' (as trained), 'int8' or 'bf16' (inference only, CPU: fastner.nn.quantize; the
        embeddings, char CNN and CRF stay float32). device None: CUDA when available at fp32,
        the CPU at int8 and bf16."""
        if not isinstance(precision, str) or precision not in PRECISIONS:  # a list: "unhashable type"
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision != "fp32" and device is None:
            # not CUDA by default: on a CUDA machine `fastner tag --precision int8` (no --device)
            # was refused with "runs on the CPU only, got device cuda", a device never asked for
            device = "cpu"
        if precision != "fp32" and resolve_device(device).type != "cpu":
            raise ValueError(f"precision {precision!r} runs on the CPU only, got device {resolve_device(device)}")
        if not os.path.isdir(path):
            raise TaggerLoadError(f"no tagger directory at {path!r}")
        names = (CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE)
        scan = _TableScan()
        try:
            # one set: the pretrained table too comes from the set the weights come from
            opened = open_file_set(path, names,
                                   optional=(PRETRAINED_VECTORS_FILE, PRETRAINED_INDEX_FILE, PRETRAINED_WORDS_FILE),
                                   scan={PRETRAINED_VECTORS_FILE: scan})
        except MissingFiles as err:
            raise TaggerLoadError(
                f"{path!r} is not a complete fastner tagger directory: missing {', '.join(err.missing)} "
                f"(expected {CONFIG_FILE}, {VOCAB_FILE} and {WEIGHTS_FILE}, as written by `fastner train`)"
            ) from None
        except (StorageError, OSError) as err:
            raise TaggerLoadError(str(err)) from None
        with opened:
            return cls._from_files(path, opened, scan, device, precision)

    @classmethod
    def _from_files(cls, path: str, opened: FileSet, scan: _TableScan, device, precision: str) -> "Tagger":
        names = (CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE)
        contents = opened.data
        files = {name: os.path.join(path, name) for name in names}
        config = _json_file(contents[CONFIG_FILE], files[CONFIG_FILE])
        vocab = _json_file(contents[VOCAB_FILE], files[VOCAB_FILE])
        version = config.get("format_version") if isinstance(config, dict) else None
        if isinstance(version, bool) or version not in (FORMAT_VERSION, TABLE_FORMAT_VERSION):
            raise TaggerLoadError(f"{path!r} holds tagger format {version!r}; this fastner reads formats "
                                  f"{FORMAT_VERSION} and {TABLE_FORMAT_VERSION}")
        state = _state_dict_file(contents[WEIGHTS_FILE], files[WEIGHTS_FILE])
        try:
            model_config = ModelConfig.from_json(config["model"])
            words = Vocab.from_json(vocab["words"])
            chars = Vocab.from_json(vocab["chars"])
            tags = Vocab.from_json(vocab["tags"])
            if tags.itos != list(model_config.tags):
                raise ValueError("the tag vocabulary differs from the model's tags")
            if len(words) != model_config.num_words or len(chars) != model_config.num_chars:
                raise ValueError("the vocabulary sizes differ from the model's")
            # the rows the model was trained with as padding and unknown: another order (or none)
            # would silently read every unknown word through the wrong row
            if (words.stoi.get(PAD), chars.stoi.get(PAD)) != (model_config.word_pad, model_config.char_pad):
                raise ValueError(f"the vocabularies' {PAD} ids differ from the model's word_pad and char_pad")
            if words.unk_id is None or chars.unk_id is None:
                raise ValueError(f"the word and char vocabularies must hold the unknown entry {UNK}")
            output_scheme = canonical_scheme(config.get("output_scheme", "IOB2"))
            digits_to_zero = config.get("digits_to_zero", False)
            if not isinstance(digits_to_zero, bool):
                raise ValueError(f"digits_to_zero must be true or false, got {digits_to_zero!r}")
            pretrained, pretrained_words = _load_pretrained_table(opened, scan, path, model_config, version)
        except (KeyError, TypeError, ValueError) as err:
            raise TaggerLoadError(f"{path!r}: incompatible config or vocabulary: {err}") from None
        # checked on the meta device (no memory) before the model is built: sizes in a config
        # that the weights do not back would otherwise be allocated first (a hidden size of 10^9
        # asks for hundreds of GB); a layer has tensors of its own, so more layers than the file
        # holds tensors cannot fit (and would take unbounded time to build even without memory)
        if model_config.layers > len(state):
            raise TaggerLoadError(f"{files[WEIGHTS_FILE]}: the weights do not fit the model in {CONFIG_FILE}: "
                                  f"{model_config.layers} layers, but the file holds {len(state)} tensors")
        try:
            with torch.device("meta"), _InitsSkipped():
                skeleton = SequenceTagger(model_config)
        except (RuntimeError, TypeError, ValueError, OverflowError) as err:  # sizes past what torch can address
            raise TaggerLoadError(f"{files[WEIGHTS_FILE]}: the weights do not fit the model in {CONFIG_FILE}: "
                                  f"its sizes cannot be built ({err})") from None
        _load_weights(skeleton, state, files[WEIGHTS_FILE])
        model = SequenceTagger(model_config, pretrained=pretrained)
        _load_weights(model, state, files[WEIGHTS_FILE])
        if precision != "fp32":
            from fastner.nn.quantize import quantize

            quantize(model, PRECISIONS[precision])
        return cls(model, words, chars, tags, output_scheme, digits_to_zero, device, pretrained_words)

    # ---- tagging ---------------------------------------------------------------------------

    def analyser(self) -> "Analyser":
        """The sentence analyser over this tagger's model (SequenceTagger.infer)."""
        from fastner.inference import Analyser

        self.model.eval()
        return Analyser(self.model.infer, self.words, self.chars, self.tags, self.digits_to_zero,
                        self.model.transition_scores(), self.device,
                        pretrained=self.pretrained_index)

    def tag(self, sentences: Sequence[List[str]], batch_size: int = 64) -> List[List[str]]:
        """Tags only, in the output scheme (the scheme of the training file)."""
        from fastner.documents import token_lists

        analyses = self.analyser().analyse(token_lists(sentences), batch_size, scores=False)
        return [convert_tags(a.tags, self.output_scheme) for a in analyses]

    def predict(self, x, batch_size: int = 64, nbest: Optional[int] = None):
        """Tag raw documents or pre-tokenized sentences (see fastner.documents).

        predict("Apple rose 3% on Monday.") -> {"entities": [{"start", "end", "label", "text",
        "score"}], "sentences": [...]}, character offsets into the document and `score` the
        posterior probability of exactly that span under the model; a list of documents gives a
        list, an iterable (generator, file) a generator with bounded read-ahead; a document may
        also be a record {"text", "tokens": [{"text", "start", "end"}, ...]} (what `fastner
        convert` writes), tagged on exactly its tokens as one sentence; a list of token lists
        gives per sentence {"tokens", "tags", "spans"} as before. nbest=k adds the k best
        analyses of each sentence with their probabilities.
        """
        from fastner.documents import predict

        return predict(self.analyser(), x, self.output_scheme, batch_size, nbest)

    def tag_like_gold(self, sentences: Sequence[Sentence], batch_size: int = 64) -> List[List[str]]:
        """Tags of gold-tagged sentences in the gold's scheme (detect_scheme), not the output
        scheme: compared tag by tag, a BIOES gold file against IOB1 predictions scored the same
        tagging 78.7% token accuracy instead of 99.0%."""
        sentences = _gold_sentences(sentences, "tag_like_gold")
        scheme = detect_scheme(s.tags for s in sentences)
        return [convert_tags(tags, scheme) for tags in self.tag([s.tokens for s in sentences], batch_size)]

    def evaluate(self, sentences: Sequence[Sentence], batch_size: int = 64) -> dict:
        """conlleval() of the predicted tags (in the gold's scheme) against the sentences' gold tags."""
        from fastner.metrics import conlleval

        sentences = _gold_sentences(sentences, "evaluate")
        return conlleval([s.tags for s in sentences], self.tag_like_gold(sentences, batch_size))


def _gold_sentences(sentences, method: str) -> List[Sentence]:
    """The gold sentences as a list (read twice: for the scheme and for the tokens; a generator
    was spent by the first and tag_like_gold returned [] for it), each with tokens and tags; a
    TypeError naming the argument and the first odd item otherwise."""
    from fastner.documents import check_ordered

    argument = f"{method}(sentences)"
    if isinstance(sentences, (str, bytes, bytearray, dict)) or not hasattr(sentences, "__iter__"):
        raise TypeError(f"{argument} takes a list of fastner.data.Sentence (tokens and gold tags), "
                        f"got {type(sentences).__name__}")
    check_ordered(sentences, argument)
    items = list(sentences)
    odd = next((number for number, s in enumerate(items) if not (hasattr(s, "tokens") and hasattr(s, "tags"))), None)
    if odd is not None:
        raise TypeError(f"{argument}: item {odd} is a {type(items[odd]).__name__}, expected a fastner.data.Sentence "
                        "(tokens and gold tags); tag token lists with tag()")
    return items
