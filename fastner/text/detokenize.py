"""Tokens -> the text news copy would print: no space before `,` `.` `'s` `%` `n't` and the
like, none after `(` `$`, straight double quotes glued to what they enclose. Used to measure
fastner.text against CoNLL (fastner.text.agreement), to turn CoNLL sentences into JSONL
records (`fastner convert`) and to render the demo's generated articles."""
from __future__ import annotations

from typing import List, Sequence, Tuple

Span = Tuple[int, int]

_NO_SPACE_BEFORE = {",", ".", ";", ":", "!", "?", ")", "]", "}", "%", "''", "...", "n't", "N'T"}
_CLITICS = {"'s", "'S", "'re", "'RE", "'ve", "'VE", "'ll", "'LL", "'d", "'D", "'m", "'M"}
_NO_SPACE_AFTER = {"(", "[", "{", "$", "``", "€", "£", "¥"}


def detokenize(tokens: Sequence[str]) -> Tuple[str, List[Span]]:
    """The text the tokens were cut from, as news copy prints it, and each token's span in it."""
    text = ""
    spans: List[Span] = []
    open_quote = False
    glue_next = True  # no space before the first token
    for token in tokens:
        closing_quote = token == '"' and open_quote
        glue = glue_next or token in _NO_SPACE_BEFORE or token in _CLITICS or closing_quote
        if not glue:
            text += " "
        spans.append((len(text), len(text) + len(token)))
        text += token
        glue_next = token in _NO_SPACE_AFTER
        if token == '"':
            glue_next = not open_quote  # an opening quote glues to the next word
            open_quote = not open_quote
    return text, spans
