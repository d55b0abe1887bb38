"""Sentences -> id lists -> padded tensors, and length-bucketed batch order."""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from fastner.data.conll import Sentence
from fastner.data.vocab import Vocab, word_lookup

# Longer words are cut for the char CNN: a max-pool over 3-grams gains little past this, and one
# pathological token (a URL) would otherwise widen the whole batch's char tensor.
MAX_WORD_CHARS = 40
# A word's char ids as bytes: int32 in this machine's byte order, 4 bytes an id (Encoded.chars).
_ID_CODEC = "utf-32-le" if sys.byteorder == "little" else "utf-32-be"


@dataclass
class Encoded:
    words: List[int]
    # per word, its characters' ids as int32 bytes in native order (4 bytes an id): one
    # str.translate and one encode a word (Vocab.id_codes), which make_batch joins with the
    # padding as bytes. As lists of Python ints, copying them into the batch (array.extend per
    # word, each int converted) made make_batch 0.053 ms of a served document's 0.67 at batch 16,
    # now 0.022-0.028 (python -m benchmarks.serve_profile --batch 16 --precision int8, AMD EPYC
    # Zen 3, alternating with the old code); the lookup stage itself stayed within its noise.
    chars: List[bytes]
    tags: Optional[List[int]]


@dataclass
class Batch:
    words: torch.Tensor  # [B, T] int64, padding = word pad id
    chars: torch.Tensor  # [B, T, C] int64, padding = char pad id
    lengths: torch.Tensor  # [B] int64
    mask: torch.Tensor  # [B, T] bool, True on real tokens
    tags: Optional[torch.Tensor]  # [B, T] int64 (0 on padding) or None
    index: List[int]  # positions of these sentences in the encoded list

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.words), move(self.chars), move(self.lengths), move(self.mask), move(self.tags), self.index)


class TokenEncoder:
    """A token's ids as a model reads them: (word id by fastner.data.vocab.word_lookup, its
    first MAX_WORD_CHARS characters' ids as int32 bytes, Encoded.chars), each distinct token
    computed once and remembered while fewer than MAX_ENTRIES are (past the cap a new token is
    computed each time it comes, so that text of endless distinct tokens cannot grow a server's
    memory: ~13 MB at the cap). A tagger keeps one (fastner.inference.Analyser): news text repeats
    most of its tokens, and the lookups (the exact form, the lowercase form, the pretrained
    rows; a translate and an encode of the characters) were about a tenth of a served document's
    model call at batch 16. A vocabulary grown after a lookup (Vocab.add) empties the memory."""

    MAX_ENTRIES = 1 << 16

    def __init__(self, words: Vocab, chars: Vocab, digits_to_zero: bool = False,
                 pretrained: Optional[Mapping[str, int]] = None):
        self.words, self.chars = words, chars
        self._word_id = word_lookup(words, pretrained, digits_to_zero)
        self._known: Dict[str, Tuple[int, bytes]] = {}
        self._sizes = (len(words), len(chars))

    def ids(self, tokens: Sequence[str]) -> Tuple[List[int], List[bytes]]:
        """(word ids, char id bytes) of `tokens`."""
        if self._sizes != (len(self.words), len(self.chars)):
            self._known.clear()
            self._sizes = (len(self.words), len(self.chars))
        known = self._known
        pairs = [known.get(token) or self._compute(token) for token in tokens]
        return [pair[0] for pair in pairs], [pair[1] for pair in pairs]

    def _compute(self, token: str) -> Tuple[int, bytes]:
        # "surrogatepass": ids 0xD800-0xDFFF are code points utf-32 refuses without it
        pair = (self._word_id(token),
                self.chars.id_codes(token[:MAX_WORD_CHARS]).encode(_ID_CODEC, "surrogatepass"))
        if len(self._known) < self.MAX_ENTRIES:
            self._known[token] = pair
        return pair


def encode_sentences(
    sentences: Sequence[Sentence],
    words: Vocab,
    chars: Vocab,
    tags: Optional[Vocab] = None,
    digits_to_zero: bool = False,
    pretrained: Optional[Mapping[str, int]] = None,
) -> List[Encoded]:
    """Id lists per sentence. Words as word_lookup() gives them (`pretrained`: word -> row of
    the model's frozen pretrained table); tags are looked up exactly, an unseen tag is an error
    naming it."""
    return encode_with(TokenEncoder(words, chars, digits_to_zero, pretrained), sentences, tags)


def encode_with(encoder: TokenEncoder, sentences: Sequence[Sentence], tags: Optional[Vocab] = None) -> List[Encoded]:
    """encode_sentences with the token ids from `encoder` (which may remember them across calls)."""
    encoded = []
    for number, sentence in enumerate(sentences):
        word_ids, char_ids = encoder.ids(sentence.tokens)
        tag_ids = None
        if tags is not None and sentence.tags:
            try:
                tag_ids = [tags[t] for t in sentence.tags]
            except KeyError as err:
                raise ValueError(
                    f"sentence {number}: tag {err.args[0]!r} is not one of the model's tags {tags.itos}"
                ) from None
        encoded.append(Encoded(word_ids, char_ids, tag_ids))
    return encoded


def make_batch(encoded: Sequence[Encoded], index: Sequence[int], word_pad: int = 0, char_pad: int = 0) -> Batch:
    items = [encoded[i] for i in index]
    # the checks and the longest length on the Python ints: three torch ops and a host read less
    # (~15 us of a one-sentence served call)
    sizes = [len(item.words) for item in items]
    if not sizes:
        raise ValueError("a batch needs at least one sentence")
    if 0 in sizes:
        raise ValueError("empty sentences cannot be batched")
    lengths = torch.tensor(sizes, dtype=torch.long)
    batch_size, time_len = len(items), max(sizes)
    char_len = max(1, max(len(cs) for item in items for cs in item.chars) // 4)
    # padded Python lists first, one tensor each: far cheaper than a small tensor per token; the
    # chars ([B, T, C], most of the ids) as one byte string of int32 ids joined from the words'
    # bytes and padding, then widened by one tensor op
    pad_id = char_pad.to_bytes(4, sys.byteorder, signed=True)
    char_pads = [pad_id * n for n in range(char_len + 1)]
    word_rows, tag_rows = [], []
    char_parts: List[bytes] = []
    has_tags = all(item.tags is not None for item in items)
    for item in items:
        pad = time_len - len(item.words)
        word_rows.append(item.words + [word_pad] * pad)
        for cs in item.chars:
            char_parts.append(cs)
            char_parts.append(char_pads[char_len - len(cs) // 4])
        char_parts.append(char_pads[char_len] * pad)
        if has_tags:
            tag_rows.append(item.tags + [0] * pad)
    word_ids = torch.tensor(word_rows, dtype=torch.long)  # [B, T]
    # a bytearray: frombuffer warns about a read-only buffer; .long() copies, nothing keeps it
    char_ids = torch.frombuffer(bytearray().join(char_parts), dtype=torch.int32)
    char_ids = char_ids.view(batch_size, time_len, char_len).long()  # [B, T, C]
    tag_ids = torch.tensor(tag_rows, dtype=torch.long) if has_tags else None  # [B, T]
    mask = torch.arange(time_len)[None, :] < lengths[:, None]
    return Batch(word_ids, char_ids, lengths, mask, tag_ids, list(index))


def bucket_batches(lengths: Sequence[int], batch_size: int, shuffle: bool, rng: Optional[random.Random] = None) -> List[List[int]]:
    """Batches of sentences of similar length (little padding), in random order when shuffling.

    Sorting by (length, random key) keeps batches varied between epochs while each stays
    nearly uniform in length; the batch order is then shuffled.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle:
        rng = rng or random.Random()
        keys = [rng.random() for _ in lengths]
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], keys[i]))
    else:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches
