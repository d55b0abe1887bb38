"""CoNLL data: reading and writing column files, tag schemes, vocabularies and batches."""
from fastner.data.batching import Batch, bucket_batches, encode_sentences, make_batch
from fastner.data.conll import DataFormatError, Sentence, read_conll, write_conll
from fastner.data.schemes import SCHEMES, convert_tags, detect_scheme, spans_to_tags, tags_to_spans
from fastner.data.vocab import Vocab, normalize_digits

__all__ = [
    "Batch",
    "DataFormatError",
    "SCHEMES",
    "Sentence",
    "Vocab",
    "bucket_batches",
    "convert_tags",
    "detect_scheme",
    "encode_sentences",
    "make_batch",
    "normalize_digits",
    "read_conll",
    "spans_to_tags",
    "tags_to_spans",
    "write_conll",
]
