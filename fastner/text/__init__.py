"""Raw English text -> sentences of (token, start, end), CoNLL-2003 conventions.

>>> from fastner.text import tokenize
>>> tokenize("Tesla's shares rose 3% to $250.10.")
[[('Tesla', 0, 5), ("'s", 5, 7), ('shares', 8, 14), ('rose', 15, 19), ('3', 20, 21), ('%', 21, 22), ('to', 23, 25), ('$', 26, 27), ('250.10', 27, 33), ('.', 33, 34)]]
"""
from fastner.text.detokenize import detokenize
from fastner.text.tokenizer import Token, iter_sentences, model_form, own_form, tokenize, working_copy

__all__ = ["Token", "detokenize", "iter_sentences", "model_form", "own_form", "tokenize", "working_copy"]
